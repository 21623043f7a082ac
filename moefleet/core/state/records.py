"""Records, counters, the worker registry and the event stream."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from moefleet.core.state.base import Fence, LeaseLostError, StoreBase, _check_positive, _dumps, _fence_args


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



def _stream_id(eid: str) -> tuple[int, int]:
    """A stream id ``"<ms>-<seq>"`` as a comparable pair."""
    ms, _, seq = str(eid).partition("-")
    return int(ms), int(seq or 0)


class RecordOps(StoreBase):
    """Record, counter, registry and event operations of ``StateStore``."""

    def put_record(self, name: str, value: dict[str, Any], *, fence: Fence | None = None) -> None:
        """Store a JSON object under ``name`` (replacing any previous value).

        fence: ``(holder, token)`` of the lease a leader writes under: the write
        lands only while that holding is current (``LeaseLostError`` otherwise).
        """
        if not name:
            raise ValueError("name: must be non-empty")
        if not isinstance(value, dict):
            raise TypeError(f"record {name!r}: value must be a dict, got {type(value).__name__}")
        payload = _dumps(f"record {name!r}", value)
        with self._redis("put_record") as r:
            if fence is None:
                r.set(self.keys.record(name), payload)
                return
            ok = self._put_record_fenced(keys=[self.keys.lease, self.keys.record(name)], args=[*_fence_args(fence), payload], client=r)
        if ok == -1:
            raise LeaseLostError(f"put_record {name!r}: {fence[0]!r} with token {fence[1]} no longer holds the lease")

    def get_record(self, name: str) -> dict[str, Any] | None:
        """The JSON object stored under ``name``, or None."""
        with self._redis("get_record") as r:
            raw = r.get(self.keys.record(name))
        return None if raw is None else json.loads(raw)

    # ---------------------------------------------------------------- counters

    def add_counters(self, name: str, increments: Mapping[str, float], *, fence: Fence | None = None) -> None:
        """Add to the running totals of counter hash ``name`` (one round trip; totals only grow).

        A negative or non-finite increment is refused: counters are exported
        as Prometheus counters, which never go down. ``fence``: as ``put_record``.
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
            if fence is not None:
                pairs = [str(x) for field, v in values.items() for x in (field, repr(v))]
                ok = self._add_counters_fenced(keys=[self.keys.lease, self.keys.counters(name)],
                                               args=[*_fence_args(fence), *pairs], client=r)
                if ok == -1:
                    raise LeaseLostError(f"add_counters {name!r}: {fence[0]!r} with token {fence[1]} no longer holds the lease")
                return
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

    def worker_records(self, now: float | None = None, *, lapsed_within_s: float = 0.0) -> dict[str, WorkerRecord]:
        """Registry entries whose heartbeat has not expired by ``now`` (None: the store's clock).

        lapsed_within_s: also those that expired less than this long before
        ``now`` (a process that may still run but cannot reach the store).
        """
        now = self._now(now)
        with self._redis("workers") as r:
            raw = r.hgetall(self.keys.workers)
        records = (WorkerRecord.model_validate_json(v) for v in raw.values())
        return {rec.worker_id: rec for rec in records if now < rec.expires_at + max(0.0, lapsed_within_s)}

    def workers(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """``{worker_id: info}`` of the workers whose heartbeat has not expired by ``now``."""
        return {wid: rec.info for wid, rec in self.worker_records(now).items()}

    def alive_keys(self, keys: list[str]) -> set[str]:
        """Which registry ``keys`` (``worker:<id>``, ``router:<id>``) have an unexpired heartbeat, by the store's clock.

        Reads only their expiry times (one ``ZMSCORE``), not their records."""
        if not keys:
            return set()
        with self._redis("alive_keys") as r:
            now = self._server_time(r)
            expiries = r.zmscore(self.keys.workers_expiry, keys)
        return {k for k, e in zip(keys, expiries) if e is not None and now < float(e)}

    # ---------------------------------------------------------------- events

    def emit_event(self, kind: str, data: dict[str, Any], now: float | None = None, *, fence: Fence | None = None) -> str:
        """Append an event to the capped stream (``XADD MAXLEN ~ events_maxlen``); returns its id.

        fence: as ``put_record`` (a leader's events are written under its lease).
        """
        event = Event(kind=kind, at=self._now(now), data=data)
        payload = _dumps(f"event {kind!r} data", event.model_dump(exclude={"id"}))
        with self._redis("emit_event") as r:
            if fence is None:
                return r.xadd(self.keys.events, {"event": payload}, maxlen=self.events_maxlen, approximate=True)
            eid = self._emit_event_fenced(keys=[self.keys.lease, self.keys.events],
                                          args=[*_fence_args(fence), self.events_maxlen, payload], client=r)
        if eid == -1:
            raise LeaseLostError(f"emit_event {kind!r}: {fence[0]!r} with token {fence[1]} no longer holds the lease")
        return eid

    def events_after(self, after_id: str, count: int = 100) -> tuple[list[Event], bool]:
        """The newest ``count`` events written after the one with id ``after_id`` (oldest first), and whether the
        stream still follows on from it (False: the stream is empty or its newest event is older than ``after_id``,
        a store that was reset; re-read with ``events``). One round trip; nothing is sent that was read before."""
        if count < 1:
            return [], True
        with self._redis("events") as r:
            pipe = r.pipeline(transaction=True)
            pipe.xrevrange(self.keys.events, count=count, min=f"({after_id}")
            pipe.xrevrange(self.keys.events, count=1)
            entries, newest = pipe.execute()
        follows = bool(newest) and _stream_id(newest[0][0]) >= _stream_id(after_id)
        return [Event.model_validate({**json.loads(fields["event"]), "id": eid}) for eid, fields in reversed(entries)], follows

    def events(self, count: int = 100) -> list[Event]:
        """The last ``count`` events, oldest first."""
        if count < 1:
            return []
        with self._redis("events") as r:
            entries = r.xrevrange(self.keys.events, count=count)
        return [Event.model_validate({**json.loads(fields["event"]), "id": eid}) for eid, fields in reversed(entries)]

