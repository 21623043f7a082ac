"""Shared state in Redis: the one package that talks to Redis.

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

Modules, one per concern: ``base`` (errors, key names, the connection and the
store's clock), ``scripts`` (the Lua scripts every atomic step runs),
``placement`` (the table and its watch), ``load`` (load windows and totals),
``lease`` (the leader lease and its fencing tokens), ``records`` (records,
counters, the worker registry and events); ``store`` puts them together as
``StateStore``.
"""

from moefleet.core.state.base import (
    StateKeys,
    StateStoreError,
    StateStoreUnavailable,
    LeaseLostError,
    StaleVersionError,
    resolve_redis_url,
)
from moefleet.core.state.lease import LeaseRecord
from moefleet.core.state.placement import PlacementWatch
from moefleet.core.state.records import Event, WorkerRecord
from moefleet.core.state.store import StateStore

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
    "resolve_redis_url",
]
