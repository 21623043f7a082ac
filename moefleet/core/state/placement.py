"""The placement table: versioned compare-and-set publishes (fenced by the lease),
history, and ``watch_placement`` (pub/sub plus polling, generations followed)."""

from __future__ import annotations

import logging
import operator
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from moefleet.core.placement import Placement
from moefleet.core.state.base import (
    LeaseLostError,
    StaleVersionError,
    StateStoreError,
    StateStoreUnavailable,
    StoreBase,
    _check_positive,
)

if TYPE_CHECKING:
    from moefleet.core.state.store import StateStore

log = logging.getLogger(__name__)

_STOP_LATENCY_S = 0.2
"""Longest a placement watch thread blocks before it notices stop()."""


class PlacementOps(StoreBase):
    """Placement table operations of ``StateStore``."""

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

    def placement_stamp(self) -> tuple[int, str]:
        """``(version, generation)`` of the stored placement in one read: whether it changed, without reading it."""
        return self._version_and_generation()

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
                publish lands only while that holding is current. Without one
                (a fleet publishing its starting placement) it lands only while
                no one holds the lease: a leader's table is written by the
                leader alone.

        Returns:
            The stored placement, with its new version and the table's generation.
        Raises:
            StaleVersionError: the stored version is not ``expected_version``.
            LeaseLostError: ``fence`` was given and no longer holds, or none was
                given and the lease is held.
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
        if ok == -2:
            raise LeaseLostError(
                f"publish_placement: the lease is held by {generation!r}: only the leader publishes (under its fence)"
            )
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
