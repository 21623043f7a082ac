"""The base of the state store: errors, key names, argument helpers, the Redis URL,
and ``StoreBase`` (the connection, error translation and the store's clock) that
each concern's operations build on."""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis

from moefleet.core.placement import ExpertKey
from moefleet.core.secrets import redact_url

if TYPE_CHECKING:
    from moefleet.core.state.placement import PlacementWatch

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- errors


class StateStoreError(RuntimeError):
    """A state store operation failed (bad reply, closed store, bad argument)."""


class StateStoreUnavailable(StateStoreError):
    """Redis could not be reached; the message names the URL."""


class LeaseLostError(StateStoreError):
    """A fenced write was refused: the writer no longer holds the lease with its token."""


class StaleVersionError(StateStoreError):
    """``publish_placement`` lost a compare-and-set: someone published first."""

    def __init__(self, expected: int, actual: int):
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"placement version is {actual}, expected {expected}: another writer published first; "
            "re-read the placement and plan again"
        )



# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class StateKeys:
    """The Redis key names of one namespace (see the module docstring)."""

    namespace: str

    @property
    def placement(self) -> str:
        return f"{self.namespace}:placement"

    @property
    def placement_version(self) -> str:
        return f"{self.namespace}:placement:version"

    @property
    def placement_generation(self) -> str:
        return f"{self.namespace}:placement:generation"

    @property
    def placement_history(self) -> str:
        return f"{self.namespace}:placement:history"

    @property
    def placement_channel(self) -> str:
        return f"{self.namespace}:placement:updates"

    def load_window(self, window_s: float, index: int) -> str:
        return f"{self.namespace}:load:{float(window_s)!r}:{index}"

    def load_sources(self, window_s: float, index: int) -> str:
        return f"{self.load_window(window_s, index)}:sources"

    @property
    def load_total(self) -> str:
        return f"{self.namespace}:load:total"

    def counters(self, name: str) -> str:
        return f"{self.namespace}:counters:{name}"

    @property
    def lease(self) -> str:
        return f"{self.namespace}:lease"

    @property
    def lease_token(self) -> str:
        return f"{self.namespace}:lease:token"

    def record(self, name: str) -> str:
        return f"{self.namespace}:record:{name}"

    @property
    def workers(self) -> str:
        return f"{self.namespace}:workers"

    @property
    def workers_expiry(self) -> str:
        return f"{self.namespace}:workers:expiry"

    @property
    def events(self) -> str:
        return f"{self.namespace}:events"


# --------------------------------------------------------------------------- helpers


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}: must be finite and > 0, got {value}")
    return value


def _expert_field(key: ExpertKey) -> str:
    try:
        layer, expert = (operator.index(k) for k in key)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"counts: key {key!r} is not a (layer, expert) pair of ints") from exc
    if layer < 0 or expert < 0:
        raise ValueError(f"counts: key {key!r} has a negative index")
    return f"{layer}:{expert}"


def _parse_expert_field(field: str) -> ExpertKey:
    layer, expert = field.split(":")
    return int(layer), int(expert)


def _dumps(what: str, value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what}: not JSON-serialisable: {exc}") from exc


# --------------------------------------------------------------------------- store


def resolve_redis_url(url: str | None, environ=None) -> str:
    """The Redis URL to use: ``url``, else ``$MOEFLEET_REDIS_URL``.

    When the URL has no password, one is added from ``$REDIS_PASSWORD`` or the
    file named by ``$MOEFLEET_REDIS_PASSWORD_FILE`` (a mounted secret). Schemes:
    ``redis://``, ``rediss://`` (TLS; ``?ssl_ca_certs=PATH`` names the CA) and
    ``unix://``. Errors name the variable, never the password.
    """
    from urllib.parse import quote

    from moefleet.core.secrets import read_secret_file

    environ = os.environ if environ is None else environ
    url = url or environ.get("MOEFLEET_REDIS_URL")
    if not url:
        raise ValueError("redis_url: not set and MOEFLEET_REDIS_URL is empty")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"redis_url: {redact_url(url)!r} is not a redis://, rediss:// or unix:// URL")
    password = environ.get("REDIS_PASSWORD")
    if not password and environ.get("MOEFLEET_REDIS_PASSWORD_FILE"):
        password = read_secret_file(environ["MOEFLEET_REDIS_PASSWORD_FILE"], "MOEFLEET_REDIS_PASSWORD_FILE")
    if password and urlsplit(url).password is None and scheme != "unix":
        userinfo, at, hostpart = rest.rpartition("@")
        user = userinfo if at else ""
        url = f"{scheme}://{user}:{quote(password, safe='')}@{hostpart}"
    return url


class StoreBase:
    """The connection of a ``StateStore`` and what every concern's operations share."""

    url: str
    namespace: str
    keys: StateKeys
    _safe_url: str
    _closed: bool
    _client: redis.Redis
    _lock: threading.Lock
    _watches: list["PlacementWatch"]

    def __repr__(self) -> str:
        return f"StateStore({self._safe_url!r}, namespace={self.namespace!r})"

    @contextmanager
    def _redis(self, op: str) -> Iterator[redis.Redis]:
        """Yield the client; translate redis-py errors into ours, naming ``op`` and the URL."""
        if self._closed:
            raise StateStoreError(f"{op}: {self!r} is closed")
        try:
            yield self._client
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StateStoreUnavailable(f"{op}: Redis at {self._safe_url} is unavailable: {exc}") from exc
        except redis.RedisError as exc:
            raise StateStoreError(f"{op}: Redis at {self._safe_url} failed: {exc}") from exc

    # ---------------------------------------------------------------- lifecycle

    def ping(self) -> bool:
        """True if Redis answers, False if it cannot be reached (never raises for that)."""
        try:
            with self._redis("ping") as r:
                return bool(r.ping())
        except StateStoreUnavailable:
            return False

    @staticmethod
    def _server_time(r: redis.Redis) -> float:
        seconds, micros = r.time()
        return seconds + micros / 1e6

    def time(self) -> float:
        """The store's clock (Redis ``TIME``), in seconds: the one clock every host's liveness is judged by."""
        with self._redis("time") as r:
            return self._server_time(r)

    def _now(self, now: float | None) -> float:
        return self.time() if now is None else float(now)

    def close(self) -> None:
        """Stop this store's placement watches and close its connections. Idempotent."""
        with self._lock:
            watches, self._watches = self._watches, []
        for w in watches:
            w.stop()
        if not self._closed:
            self._closed = True
            self._client.close()

