"""Shared state in Redis: the one module that talks to Redis.

Routers, workers and the controller share five kinds of state through a
``StateStore``; nothing else in the project imports ``redis``.

placement table
    The current ``Placement`` (versioned), the last few published versions for
    inspection, and a pub/sub channel announcing each new version. Writers
    compare-and-set on the version; readers follow it with ``watch_placement``.
load windows
    Token counts per ``(layer, expert)`` in fixed windows of ``window_s``
    seconds (window index ``int(now // window_s)``). Routers add to them, the
    controller reads a decayed sum. Windows expire after ``load_retention_s``.
    Beside them, a never-expiring running total per ``(layer, expert)`` (the
    ``moefleet_expert_tokens_total`` counter).
leader lease
    One controller at a time holds the lease; it lapses in Redis (PX expiry)
    when its holder stops renewing.
records and workers
    Named JSON records for the controller's own state, and a worker registry
    whose entries count only while their heartbeat is fresh.
events
    A capped stream of what the controller did, for operators.
counters
    Named hashes of fleet-wide running totals that only grow (rebalances,
    their durations as histogram buckets, weight bytes moved), for the
    telemetry endpoint.

Time: every decision that depends on time uses the ``now`` passed in
(seconds, float), so tests drive a fake clock. ``now=None`` means the store's
own clock (Redis ``TIME``): routers, workers and controllers on different hosts
pass None, so heartbeats, leases and load windows are judged on one clock
whatever the skew between hosts. Redis expiry (PX, PEXPIRE) is used only to
free memory and to let a dead leader's lease lapse.

Generations: the placement table carries a generation id, minted when the
table is created (the publish of version 1). A Redis that lost its data starts
a new generation, so a router holding version 7 of the old table follows
version 1 of the new one instead of ignoring it as older.

Fencing: each lease acquisition hands out a fencing token larger than any
before it (Redis time in microseconds, and past the last one). A publish made
with ``fence=(holder, token)`` lands only while that lease is still held with
that token, so a leader that lost its lease (paused, partitioned) cannot
publish over its successor; workers refuse load/unload commands carrying an
older token than one they have seen.

Key layout (``ns`` is the namespace)::

    ns:placement                      string  JSON Placement (current)
    ns:placement:version              string  int, current version (absent = 0)
    ns:placement:generation           string  id minted when the table is (re)created at version 1
    ns:placement:history              list    JSON Placement, newest first, capped
    ns:placement:updates              channel pub/sub, message = new version
    ns:load:<window_s>:<index>        hash    "layer:expert" -> tokens, PEXPIRE retention
    ns:load:<window_s>:<index>:sources hash   source -> tokens, PEXPIRE retention
    ns:load:total                     hash    "layer:expert" -> tokens since the store began (no expiry)
    ns:lease                          string  JSON LeaseRecord, PX ttl
    ns:lease:token                    string  last fencing token handed out
    ns:record:<name>                  string  JSON object
    ns:workers                        hash    worker id -> JSON WorkerRecord
    ns:workers:expiry                 zset    worker id, score = expires_at (for pruning)
    ns:events                         stream  field "event" = JSON (kind, at, data), MAXLEN ~
    ns:counters:<name>                hash    field -> running total (HINCRBYFLOAT)
"""

from __future__ import annotations

import json
import os
import logging
import math
import operator
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from pydantic import BaseModel, ConfigDict, Field
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from moefleet.core.placement import ExpertKey, Placement
from moefleet.core.secrets import redact_url

log = logging.getLogger(__name__)

_STOP_LATENCY_S = 0.2
"""Longest a placement watch thread blocks before it notices stop()."""

__all__ = [
    "Event",
    "LeaseLostError",
    "LeaseRecord",
    "PlacementWatch",
    "StaleVersionError",
    "StateKeys",
    "StateStore",
    "StateStoreError",
    "StateStoreUnavailable",
    "WorkerRecord",
]


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


# --------------------------------------------------------------------------- records


class LeaseRecord(BaseModel):
    """The leader lease as stored under ``ns:lease``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    holder: str = Field(description="Id of the lease holder (a controller instance).")
    expires_at: float = Field(description="`now` + ttl when the lease lapses (the store's clock unless a `now` was given).")
    token: int = Field(default=0, description="Fencing token of this holding; larger than every earlier holding's.")


class WorkerRecord(BaseModel):
    """One worker's registry entry as stored in ``ns:workers``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    worker_id: str = Field(description="Unique worker id.")
    info: dict[str, Any] = Field(description="What the worker reported about itself (JSON object).")
    heartbeat_at: float = Field(description="`now` of the last heartbeat.")
    expires_at: float = Field(description="Heartbeat `now` + ttl; the worker counts while now < expires_at.")


class Event(BaseModel):
    """One entry of the event stream."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(default="", description="Redis stream id ('' before it is written).")
    kind: str = Field(min_length=1, description="What happened, e.g. 'placement_published'.")
    at: float = Field(description="`now` when the event was emitted.")
    data: dict[str, Any] = Field(default_factory=dict, description="Details (JSON object).")


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


# --------------------------------------------------------------------------- Lua

# KEYS: placement, version, history, generation, lease.
# ARGV: expected version, new JSON, history size, channel, generation for a new table,
#       fence holder ('' = unfenced), fence token.
# Returns {1, new_version, generation} on success, {0, current_version, ''} when the
# version moved, {-1, 0, ''} when the fence (lease holder and token) does not hold.
_PUBLISH_PLACEMENT = """
if ARGV[6] ~= '' then
  local cur = redis.call('GET', KEYS[5])
  if not cur then
    return {-1, 0, ''}
  end
  local rec = cjson.decode(cur)
  if rec.holder ~= ARGV[6] or string.format('%d', rec.token or 0) ~= ARGV[7] then
    return {-1, 0, ''}
  end
end
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local expected = tonumber(ARGV[1])
if current ~= expected then
  return {0, current, ''}
end
local generation = redis.call('GET', KEYS[4])
if expected == 0 or not generation then
  generation = ARGV[5]
  redis.call('SET', KEYS[4], generation)
end
local new_version = expected + 1
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], new_version)
redis.call('LPUSH', KEYS[3], ARGV[2])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
redis.call('PUBLISH', ARGV[4], new_version)
return {1, new_version, generation}
"""

# KEYS: lease, last token. ARGV: holder, now, expires_at, ttl ms, token candidate (Redis time, us).
# Free, lapsed (by `now`) or already ours: take it. A new holding gets a token past every
# earlier one; re-acquiring your own keeps its token. Returns the token, or 0.
_ACQUIRE_LEASE = """
local cur = redis.call('GET', KEYS[1])
local token = nil
if cur then
  local rec = cjson.decode(cur)
  if rec.holder ~= ARGV[1] and tonumber(rec.expires_at) > tonumber(ARGV[2]) then
    return 0
  end
  if rec.holder == ARGV[1] and tonumber(rec.expires_at) > tonumber(ARGV[2]) and rec.token then
    token = tonumber(rec.token)
  end
end
if not token then
  local last = tonumber(redis.call('GET', KEYS[2]) or '0')
  token = math.max(tonumber(ARGV[5]), last + 1)
  redis.call('SET', KEYS[2], string.format('%d', token))
end
local rec = '{"holder":' .. cjson.encode(ARGV[1]) .. ',"expires_at":' .. ARGV[3] .. ',"token":' .. string.format('%d', token) .. '}'
redis.call('SET', KEYS[1], rec, 'PX', ARGV[4])
return token
"""

# KEYS: lease. ARGV: holder, now, expires_at, ttl ms, token ('' = any).
# Only a current (by `now`) holder renews, keeping its token. Returns the token, or 0.
_RENEW_LEASE = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  return 0
end
local rec = cjson.decode(cur)
if rec.holder ~= ARGV[1] or tonumber(rec.expires_at) <= tonumber(ARGV[2]) then
  return 0
end
local token = tonumber(rec.token or 0)
if ARGV[5] ~= '' and string.format('%d', token) ~= ARGV[5] then
  return 0
end
local out = '{"holder":' .. cjson.encode(ARGV[1]) .. ',"expires_at":' .. ARGV[3] .. ',"token":' .. string.format('%d', token) .. '}'
redis.call('SET', KEYS[1], out, 'PX', ARGV[4])
return math.max(token, 1)
"""

# KEYS: lease. ARGV: holder.
_RELEASE_LEASE = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  return 0
end
if cjson.decode(cur).holder ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: workers hash, expiry zset. ARGV: id, JSON, expires_at, prune entries expired before this.
_REGISTER_WORKER = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4], 'LIMIT', 0, 100)
for _, id in ipairs(old) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
return #old
"""


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


class StateStore:
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
        self._publish_script = self._client.register_script(_PUBLISH_PLACEMENT)
        self._acquire_script = self._client.register_script(_ACQUIRE_LEASE)
        self._renew_script = self._client.register_script(_RENEW_LEASE)
        self._release_script = self._client.register_script(_RELEASE_LEASE)
        self._register_script = self._client.register_script(_REGISTER_WORKER)

    def __repr__(self) -> str:
        return f"StateStore({self._safe_url!r}, namespace={self.namespace!r})"

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    # ---------------------------------------------------------------- placement

    def get_placement(self) -> Placement | None:
        """The current placement (with its generation), or None if none was ever published."""
        with self._redis("get_placement") as r:
            raw, generation = r.mget(self.keys.placement, self.keys.placement_generation)
        if raw is None:
            return None
        return Placement.model_validate_json(raw).model_copy(update={"generation": generation or ""})

    def placement_version(self) -> int:
        """Version of the current placement; 0 if none was published."""
        with self._redis("placement_version") as r:
            raw = r.get(self.keys.placement_version)
        return 0 if raw is None else int(raw)

    def _version_and_generation(self) -> tuple[int, str]:
        with self._redis("placement_version") as r:
            raw, generation = r.mget(self.keys.placement_version, self.keys.placement_generation)
        return (0 if raw is None else int(raw)), generation or ""

    def placement_generation(self) -> str:
        """Generation id of the placement table ('' before the first publish)."""
        with self._redis("placement_generation") as r:
            return r.get(self.keys.placement_generation) or ""

    def publish_placement(
        self, placement: Placement, expected_version: int, *, fence: tuple[str, int] | None = None
    ) -> Placement:
        """Store ``placement`` as version ``expected_version + 1`` if the stored version is ``expected_version``.

        Atomic (one Lua script): on success the placement, its version, the
        history entry and the pub/sub announcement happen together. The
        ``version`` and ``generation`` fields of ``placement`` are ignored and
        replaced: publishing version 1 starts a new generation.

        Args:
            fence: ``(holder, token)`` of the lease this write is made under; the
                publish lands only while that holding is current.

        Returns:
            The stored placement, with its new version and the table's generation.
        Raises:
            StaleVersionError: the stored version is not ``expected_version``.
            LeaseLostError: ``fence`` was given and no longer holds.
        """
        import uuid

        expected = operator.index(expected_version)
        if expected < 0:
            raise ValueError(f"expected_version: must be >= 0, got {expected}")
        stored = placement.model_copy(update={"version": expected + 1, "generation": ""})
        payload = stored.model_dump_json(exclude={"generation"})
        k = self.keys
        holder, token = ("", 0) if fence is None else (str(fence[0]), int(fence[1]))
        with self._redis("publish_placement") as r:
            ok, version, generation = self._publish_script(
                keys=[k.placement, k.placement_version, k.placement_history, k.placement_generation, k.lease],
                args=[expected, payload, self.placement_history_size, k.placement_channel, uuid.uuid4().hex[:12], holder, token],
                client=r,
            )
        if ok == -1:
            raise LeaseLostError(f"publish_placement: lease holder {holder!r} with token {token} no longer holds the lease")
        if not ok:
            raise StaleVersionError(expected, int(version))
        return stored.model_copy(update={"generation": generation})

    def placement_history(self, n: int = 10) -> list[Placement]:
        """Up to ``n`` most recently published placements, newest (the current one) first.

        At most ``placement_history_size`` are kept.
        """
        if n < 1:
            return []
        with self._redis("placement_history") as r:
            raws = r.lrange(self.keys.placement_history, 0, n - 1)
        return [Placement.model_validate_json(raw) for raw in raws]

    def watch_placement(
        self,
        callback: Callable[[Placement], None],
        poll_interval_s: float = 0.1,
        *,
        since_version: int | None = None,
        generation: str | None = None,
    ) -> "PlacementWatch":
        """Call ``callback(placement)`` from a background thread whenever the version advances.

        Pub/sub wakes the thread at once; independently it re-reads the version
        every ``poll_interval_s``, so a lost message (reconnect, writer that did
        not publish) delays an update by at most one interval and never loses it.
        Versions that were superseded before the thread read them are skipped:
        the callback always receives the newest placement, with strictly
        increasing versions, except after the table was reset (the stored
        version went back, e.g. Redis restarted without data): that is logged
        and the watch follows the new versions from 1.

        Args:
            callback: receives each newer placement; exceptions are logged and
                counted in ``PlacementWatch.callback_errors``, and the version is
                not re-delivered.
            poll_interval_s: the fallback polling period.
            since_version: deliver placements newer than this; None means newer
                than the version stored now (read before this returns). Pass the
                version of a placement you already hold to close the gap between
                reading it and watching.
            generation: the generation of the placement you hold (default: the
                stored one); a table of another generation is delivered from its
                first version on.
        """
        _check_positive("poll_interval_s", poll_interval_s)
        version, stored_generation = self._version_and_generation()
        start = version if since_version is None else operator.index(since_version)
        watch = PlacementWatch(self, callback, poll_interval_s, start, stored_generation if generation is None else generation)
        with self._lock:
            self._watches = [w for w in self._watches if w.is_alive()]
            self._watches.append(watch)
        watch._start()
        return watch

    # ---------------------------------------------------------------- load windows

    @staticmethod
    def _window_index(now: float, window_s: float) -> int:
        return int(now // window_s)

    def record_load(
        self,
        counts: Mapping[ExpertKey, int],
        now: float | None,
        window_s: float = 1.0,
        source: str = "",
    ) -> None:
        """Add token counts per ``(layer, expert)`` to the window ``int(now // window_s)``.

        One round trip (a MULTI/EXEC pipeline of HINCRBYs and PEXPIREs). Zero
        counts are skipped; a call with nothing to add sends nothing. With
        ``source`` (e.g. a router id) the call's total is also added to the
        window's per-source tally (``load_sources``). The same counts are added
        to the never-expiring totals (``load_totals``) in the same pipeline.
        """
        window_s = _check_positive("window_s", window_s)
        fields: dict[str, int] = {}
        for key, tokens in counts.items():
            field = _expert_field(key)
            n = operator.index(tokens)
            if n < 0:
                raise ValueError(f"counts: {n} tokens for {key!r} is negative")
            if n:
                fields[field] = fields.get(field, 0) + n
        if not fields:
            return
        index = self._window_index(self._now(now), window_s)
        key = self.keys.load_window(window_s, index)
        ttl_ms = math.ceil(max(self.load_retention_s, window_s) * 1000)
        with self._redis("record_load") as r:
            pipe = r.pipeline(transaction=True)
            for field, n in fields.items():
                pipe.hincrby(key, field, n)
                pipe.hincrby(self.keys.load_total, field, n)
            pipe.pexpire(key, ttl_ms)
            if source:
                skey = self.keys.load_sources(window_s, index)
                pipe.hincrby(skey, source, sum(fields.values()))
                pipe.pexpire(skey, ttl_ms)
            pipe.execute()

    def _read_hashes(self, op: str, keys: list[str]) -> list[dict[str, str]]:
        with self._redis(op) as r:
            pipe = r.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            return pipe.execute()

    def read_windows(self, now: float | None, window_s: float, num_windows: int) -> list[tuple[float, dict[ExpertKey, int]]]:
        """Raw counts of the last ``num_windows`` windows, the current one included, oldest first.

        Returns ``[(window_start_s, {(layer, expert): tokens}), ...]`` with exactly
        ``num_windows`` entries; windows with no traffic (or already expired)
        have an empty dict. One round trip.
        """
        window_s = _check_positive("window_s", window_s)
        if num_windows < 1:
            return []
        current = self._window_index(self._now(now), window_s)
        indices = list(range(current - num_windows + 1, current + 1))
        hashes = self._read_hashes("read_windows", [self.keys.load_window(window_s, i) for i in indices])
        return [
            (i * window_s, {_parse_expert_field(f): int(v) for f, v in h.items()})
            for i, h in zip(indices, hashes)
        ]

    def read_load(self, now: float | None, window_s: float, num_windows: int, half_life_s: float) -> dict[ExpertKey, float]:
        """Exponentially decayed token counts per ``(layer, expert)`` over the last ``num_windows`` windows.

        A window's age is counted in whole windows from the current one
        (``age_s = (current_index - index) * window_s``), and its counts weigh
        ``0.5 ** (age_s / half_life_s)``: the current, partial window weighs 1.
        ``half_life_s=math.inf`` gives a plain sum. Experts with no tokens are absent.
        """
        if not half_life_s > 0:
            raise ValueError(f"half_life_s: must be > 0, got {half_life_s}")
        windows = self.read_windows(now, window_s, num_windows)
        out: dict[ExpertKey, float] = {}
        for age, (_, counts) in enumerate(reversed(windows)):
            weight = 0.5 ** (age * window_s / half_life_s)
            for key, tokens in counts.items():
                out[key] = out.get(key, 0.0) + weight * tokens
        return out

    def load_totals(self) -> dict[ExpertKey, int]:
        """Tokens routed to each ``(layer, expert)`` since the store began (what ``record_load`` ever added)."""
        with self._redis("load_totals") as r:
            raw = r.hgetall(self.keys.load_total)
        return {_parse_expert_field(f): int(v) for f, v in raw.items()}

    def load_sources(self, now: float, window_s: float, num_windows: int) -> dict[str, int]:
        """Tokens per ``source`` over the last ``num_windows`` windows (who has been reporting)."""
        window_s = _check_positive("window_s", window_s)
        if num_windows < 1:
            return {}
        current = self._window_index(now, window_s)
        keys = [self.keys.load_sources(window_s, i) for i in range(current - num_windows + 1, current + 1)]
        out: dict[str, int] = {}
        for h in self._read_hashes("load_sources", keys):
            for source, v in h.items():
                out[source] = out.get(source, 0) + int(v)
        return out

    # ---------------------------------------------------------------- leader lease

    def _lease_args(self, holder: str, ttl_s: float, now: float | None) -> list[Any]:
        if not holder:
            raise ValueError("holder: must be a non-empty id")
        ttl_s = _check_positive("ttl_s", ttl_s)
        now = self._now(now)
        return [holder, repr(float(now)), repr(float(now) + ttl_s), max(1, math.ceil(ttl_s * 1000))]

    def try_acquire_lease(self, holder: str, ttl_s: float, now: float | None = None) -> int:
        """Take the lease for ``ttl_s`` if it is free, lapsed by ``now``, or already ``holder``'s.

        Redis expires the key after ``ttl_s`` (PX), so a dead holder's lease
        lapses without anyone writing. Returns the holding's fencing token
        (> 0, truthy) if ``holder`` now holds it, else 0. ``now=None``: the
        store's clock.
        """
        args = self._lease_args(holder, ttl_s, now)
        with self._redis("try_acquire_lease") as r:
            candidate = int(self._server_time(r) * 1e6)
            return int(self._acquire_script(keys=[self.keys.lease, self.keys.lease_token], args=[*args, candidate], client=r))

    def renew_lease(self, holder: str, ttl_s: float, now: float | None = None, *, token: int | None = None) -> int:
        """Extend ``holder``'s lease to ``now + ttl_s``; 0 if it is not (or no longer, by ``now``) the holder.

        With ``token``, renews only the holding that token was handed out for.
        Returns the holding's fencing token (truthy) on success. A holder that
        gets 0 has lost leadership and must stop acting as leader (it may try
        to acquire again, under a new token).
        """
        args = self._lease_args(holder, ttl_s, now)
        with self._redis("renew_lease") as r:
            return int(self._renew_script(keys=[self.keys.lease], args=[*args, "" if token is None else str(int(token))], client=r))

    def lease(self) -> LeaseRecord | None:
        """The lease record as stored (None when no one holds it)."""
        with self._redis("lease") as r:
            raw = r.get(self.keys.lease)
        return None if raw is None else LeaseRecord.model_validate_json(raw)

    def release_lease(self, holder: str) -> bool:
        """Give the lease up; False (and nothing changes) if ``holder`` does not hold it."""
        with self._redis("release_lease") as r:
            return bool(self._release_script(keys=[self.keys.lease], args=[holder], client=r))

    def lease_holder(self, now: float | None = None) -> str | None:
        """Who holds the lease: None if the key lapsed in Redis, or (given ``now``) if it lapsed by ``now``."""
        with self._redis("lease_holder") as r:
            raw = r.get(self.keys.lease)
        if raw is None:
            return None
        record = LeaseRecord.model_validate_json(raw)
        if now is not None and record.expires_at <= now:
            return None
        return record.holder

    # ---------------------------------------------------------------- records

    def put_record(self, name: str, value: dict[str, Any]) -> None:
        """Store a JSON object under ``name`` (replacing any previous value)."""
        if not name:
            raise ValueError("name: must be non-empty")
        if not isinstance(value, dict):
            raise TypeError(f"record {name!r}: value must be a dict, got {type(value).__name__}")
        payload = _dumps(f"record {name!r}", value)
        with self._redis("put_record") as r:
            r.set(self.keys.record(name), payload)

    def get_record(self, name: str) -> dict[str, Any] | None:
        """The JSON object stored under ``name``, or None."""
        with self._redis("get_record") as r:
            raw = r.get(self.keys.record(name))
        return None if raw is None else json.loads(raw)

    # ---------------------------------------------------------------- counters

    def add_counters(self, name: str, increments: Mapping[str, float]) -> None:
        """Add to the running totals of counter hash ``name`` (one round trip; totals only grow).

        A negative or non-finite increment is refused: counters are exported
        as Prometheus counters, which never go down.
        """
        if not name:
            raise ValueError("name: must be non-empty")
        values = {}
        for field, v in increments.items():
            v = float(v)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"counter {name!r}: increment {v} for {field!r} must be finite and >= 0")
            if v:
                values[str(field)] = v
        if not values:
            return
        with self._redis("add_counters") as r:
            pipe = r.pipeline(transaction=True)
            for field, v in values.items():
                pipe.hincrbyfloat(self.keys.counters(name), field, v)
            pipe.execute()

    def counters(self, name: str) -> dict[str, float]:
        """The running totals of counter hash ``name`` (empty when nothing was added)."""
        with self._redis("counters") as r:
            raw = r.hgetall(self.keys.counters(name))
        return {f: float(v) for f, v in raw.items()}

    # ---------------------------------------------------------------- workers

    def register_worker(self, worker_id: str, info: dict[str, Any], now: float | None, ttl_s: float) -> None:
        """Register or heartbeat a worker: it counts in ``workers(t)`` while ``t < now + ttl_s``.

        Also deletes entries that expired more than ``worker_forget_after_s`` before ``now``.
        """
        if not worker_id:
            raise ValueError("worker_id: must be non-empty")
        ttl_s = _check_positive("ttl_s", ttl_s)
        _dumps(f"worker {worker_id!r} info", info)
        now = self._now(now)
        record = WorkerRecord(worker_id=worker_id, info=info, heartbeat_at=now, expires_at=now + ttl_s)
        k = self.keys
        with self._redis("register_worker") as r:
            self._register_script(
                keys=[k.workers, k.workers_expiry],
                args=[worker_id, record.model_dump_json(), repr(record.expires_at), repr(now - self.worker_forget_after_s)],
                client=r,
            )

    def deregister_worker(self, worker_id: str) -> bool:
        """Remove a worker from the registry at once; False if it was not there."""
        with self._redis("deregister_worker") as r:
            pipe = r.pipeline(transaction=True)
            pipe.hdel(self.keys.workers, worker_id)
            pipe.zrem(self.keys.workers_expiry, worker_id)
            removed, _ = pipe.execute()
        return bool(removed)

    def worker_records(self, now: float | None = None) -> dict[str, WorkerRecord]:
        """Registry entries whose heartbeat has not expired by ``now`` (None: the store's clock)."""
        now = self._now(now)
        with self._redis("workers") as r:
            raw = r.hgetall(self.keys.workers)
        records = (WorkerRecord.model_validate_json(v) for v in raw.values())
        return {rec.worker_id: rec for rec in records if now < rec.expires_at}

    def workers(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """``{worker_id: info}`` of the workers whose heartbeat has not expired by ``now``."""
        return {wid: rec.info for wid, rec in self.worker_records(now).items()}

    # ---------------------------------------------------------------- events

    def emit_event(self, kind: str, data: dict[str, Any], now: float | None = None) -> str:
        """Append an event to the capped stream (``XADD MAXLEN ~ events_maxlen``); returns its id."""
        event = Event(kind=kind, at=self._now(now), data=data)
        payload = _dumps(f"event {kind!r} data", event.model_dump(exclude={"id"}))
        with self._redis("emit_event") as r:
            return r.xadd(self.keys.events, {"event": payload}, maxlen=self.events_maxlen, approximate=True)

    def events(self, count: int = 100) -> list[Event]:
        """The last ``count`` events, oldest first."""
        if count < 1:
            return []
        with self._redis("events") as r:
            entries = r.xrevrange(self.keys.events, count=count)
        return [Event.model_validate({**json.loads(fields["event"]), "id": eid}) for eid, fields in reversed(entries)]


# --------------------------------------------------------------------------- watch


class PlacementWatch:
    """Handle of a ``StateStore.watch_placement`` thread; ``stop()`` ends it."""

    def __init__(
        self, store: StateStore, callback: Callable[[Placement], None], poll_interval_s: float, since: int, generation: str = ""
    ):
        self._store = store
        self._callback = callback
        self._poll = poll_interval_s
        self.last_version = since
        self.last_generation = generation
        """Generation of the table ``last_version`` belongs to ('' until known)."""
        """Version of the last placement delivered (or the starting point)."""
        self.callback_errors = 0
        """Callbacks that raised (each logged with its traceback)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moefleet-placement-watch", daemon=True)

    def _start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and wait (up to ``timeout_s``) for it to end. Idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _check(self) -> None:
        version, generation = self._store._version_and_generation()
        if generation and self.last_generation and generation != self.last_generation:
            # A new table (Redis lost its data, or the table was flushed): follow it from its start.
            log.warning("placement table at %s has a new generation (%s, was %s): following it",
                        self._store._safe_url, generation, self.last_generation)
            self.last_version = 0
        elif version < self.last_version:
            # Versions only grow within a table, so the table was lost: follow whatever is published from now on.
            log.warning("placement version went back from %d to %d at %s: the placement table was reset",
                        self.last_version, version, self._store._safe_url)
            self.last_version = 0
        if generation:
            self.last_generation = generation
        if version <= self.last_version:
            return
        placement = self._store.get_placement()
        if placement is None or placement.version <= self.last_version:
            return
        self.last_version = placement.version
        self.last_generation = placement.generation
        try:
            self._callback(placement)
        except Exception:  # the callback's failure must not end the watch; surfaced in the log and counter
            self.callback_errors += 1
            log.exception("placement watch callback failed on version %d", placement.version)

    def _run(self) -> None:
        pubsub = None
        backoff = self._poll
        next_poll = 0.0  # monotonic time of the next fallback version check
        woken = False  # a message (or subscribe confirmation) arrived since the last check
        try:
            while not self._stop.is_set():
                try:
                    if pubsub is None:
                        pubsub = self._store._client.pubsub(ignore_subscribe_messages=True)
                        pubsub.subscribe(self._store.keys.placement_channel)
                        woken = True  # check right after (re)subscribing: covers the gap
                    if woken or time.monotonic() >= next_poll:
                        self._check()
                        next_poll = time.monotonic() + self._poll
                    # Wait for a message, in short slices so stop() is prompt whatever the poll interval.
                    wait = min(max(0.0, next_poll - time.monotonic()), _STOP_LATENCY_S)
                    woken = pubsub.get_message(timeout=wait) is not None
                    backoff = self._poll
                except (StateStoreUnavailable, redis.ConnectionError, redis.TimeoutError) as exc:
                    log.warning("placement watch: Redis at %s unavailable (%s); retrying in %.2fs",
                                self._store._safe_url, exc, backoff)
                    if pubsub is not None:
                        pubsub.close()
                        pubsub = None
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                except (StateStoreError, ValueError) as exc:  # bad reply or record: keep watching, say so
                    log.error("placement watch: cannot read the placement at %s: %s; retrying in %.2fs",
                              self._store._safe_url, exc, backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            if pubsub is not None:
                pubsub.close()
