"""``StateStore``: the operations of every concern over one connection."""

from __future__ import annotations

import threading

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from moefleet.core.secrets import redact_url
from moefleet.core.state import scripts
from moefleet.core.state.base import StateKeys, StateStoreError, _check_positive
from moefleet.core.state.lease import LeaseOps
from moefleet.core.state.load import LoadOps
from moefleet.core.state.placement import PlacementOps, PlacementWatch
from moefleet.core.state.records import RecordOps


class StateStore(PlacementOps, LoadOps, LeaseOps, RecordOps):
    """Typed access to MoE Fleet's shared state in one Redis namespace.

    Thread-safe (redis-py's client is). Every Redis failure surfaces as
    ``StateStoreUnavailable`` (cannot connect) or ``StateStoreError``; there is
    no in-memory fallback. ``ping()`` is the one method that answers False
    instead of raising.

    Args:
        url: ``redis://host:port/db`` of the server.
        namespace: prefix of every key, so several fleets (or tests) share a server.
        placement_history_size: published placements kept in ``ns:placement:history``.
        load_retention_s: how long a load window lives after its last write (Redis TTL).
        events_maxlen: approximate cap of the event stream (``XADD MAXLEN ~``).
        worker_forget_after_s: registry entries expired longer than this are deleted
            on the next ``register_worker``.
        socket_timeout_s: connect and read timeout of each Redis call.
    """

    def __init__(
        self,
        url: str,
        namespace: str = "moefleet",
        *,
        placement_history_size: int = 16,
        load_retention_s: float = 600.0,
        events_maxlen: int = 1000,
        worker_forget_after_s: float = 600.0,
        socket_timeout_s: float = 5.0,
    ):
        if not namespace or any(c.isspace() for c in namespace):
            raise ValueError(f"namespace: must be non-empty without whitespace, got {namespace!r}")
        if placement_history_size < 1:
            raise ValueError(f"placement_history_size: must be >= 1, got {placement_history_size}")
        if events_maxlen < 1:
            raise ValueError(f"events_maxlen: must be >= 1, got {events_maxlen}")
        self.url = url
        self.namespace = namespace
        self.keys = StateKeys(namespace)
        self.placement_history_size = int(placement_history_size)
        self.load_retention_s = _check_positive("load_retention_s", load_retention_s)
        self.events_maxlen = int(events_maxlen)
        self.worker_forget_after_s = _check_positive("worker_forget_after_s", worker_forget_after_s)
        self._safe_url = redact_url(url)
        self._closed = False
        self._watches: list[PlacementWatch] = []
        self._lock = threading.Lock()
        try:
            # One quick retry covers a pooled connection broken by a server restart.
            # Retries make writes at-least-once: a reconnect may double-count a
            # record_load, or turn a publish that did land into a StaleVersionError.
            self._client = redis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1),
            )
        except ValueError as exc:
            raise StateStoreError(f"state store URL {self._safe_url!r} is invalid: {exc}") from exc
        self._publish_script = self._client.register_script(scripts.PUBLISH_PLACEMENT)
        self._acquire_script = self._client.register_script(scripts.ACQUIRE_LEASE)
        self._renew_script = self._client.register_script(scripts.RENEW_LEASE)
        self._release_script = self._client.register_script(scripts.RELEASE_LEASE)
        self._register_script = self._client.register_script(scripts.REGISTER_WORKER)
        self._record_load_script = self._client.register_script(scripts.RECORD_LOAD)
        self._check_fence_script = self._client.register_script(scripts.CHECK_FENCE)
        self._put_record_fenced = self._client.register_script(scripts.PUT_RECORD_FENCED)
        self._emit_event_fenced = self._client.register_script(scripts.EMIT_EVENT_FENCED)
        self._add_counters_fenced = self._client.register_script(scripts.ADD_COUNTERS_FENCED)

    def __repr__(self) -> str:
        return f"StateStore({self._safe_url!r}, namespace={self.namespace!r})"

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
