"""What the telemetry snapshot reads from the fleet's store: ``FleetInputs``, once (``read_inputs``) or again
and again, keeping what has not changed (``InputsReader``, the telemetry endpoint's)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moefleet.core.placement import ExpertKey, Placement

if TYPE_CHECKING:
    from .telemetry import TelemetryConfig

REBALANCE_COUNTERS = "rebalance"
"""Name of the store's counter hash that rebalances add to (``StateStore.add_counters``)."""

@dataclass
class FleetInputs:
    """What the store holds about the fleet at one moment (plain data; ``read_inputs`` fills it)."""

    now: float
    placement: Placement | None = None
    windows: list[tuple[float, dict[ExpertKey, int]]] = field(default_factory=list)  # oldest first, current last
    totals: dict[ExpertKey, int] = field(default_factory=dict)
    heartbeats: dict[str, dict] = field(default_factory=dict)  # "worker:<device>" / "router:<id>" -> info
    events: list[dict] = field(default_factory=list)  # {"kind", "at", "data"}, oldest first
    controller: dict | None = None  # the controller's record
    rebalance: dict | None = None  # the rebalance in progress (record)
    counters: dict[str, float] = field(default_factory=dict)  # REBALANCE_COUNTERS
    leader: str | None = None


def read_inputs(store, config: TelemetryConfig) -> FleetInputs:
    """Read everything a snapshot needs from ``store`` (a ``StateStore``) once; a few round trips."""
    return InputsReader(store, config).read(totals=True)


class InputsReader:
    """``read_inputs`` for a reader that samples again and again (the telemetry endpoint): what has not changed
    since its last read is kept, not read again.

    - the placement (126 kB at 58 x 256 experts on 32 devices) is read only when its version or generation moved;
    - load windows two or more behind the current one are read once (``StateStore.read_windows``' cache);
    - events: only those written since the newest one held (the stream read whole again after a store reset);
    - the per-expert totals (a hash of L x E counters) only when asked (``totals=True``): the snapshot's other
      figures do not use them; the endpoint reads them when ``/metrics`` is scraped.

    Each read gives the same ``FleetInputs`` ``read_inputs`` gives at that moment (totals empty unless asked).
    """

    def __init__(self, store, config: TelemetryConfig):
        self.store = store
        self.config = config
        self._placement: Placement | None = None
        self._windows: dict = {}
        self._events: list = []  # Event records, oldest first, at most config.events
        self._stamp: tuple[int, str] | None = None
        self._lock = threading.Lock()  # one read at a time: the caches are shared between reads

    def placement(self) -> Placement | None:
        stamp = self.store.placement_stamp()
        if stamp != self._stamp or (self._placement is None and stamp[0]):
            self._placement = self.store.get_placement()
            p = self._placement
            self._stamp = stamp if p is None else (p.version, p.generation)  # a publish in between: read again next time
        return self._placement

    def events(self) -> list:
        count = self.config.events
        if self._events:
            new, follows = self.store.events_after(self._events[-1].id, count)
            self._events = (self._events + new)[-count:] if follows else self.store.events(count)
        else:
            self._events = self.store.events(count)
        return self._events

    def read(self, totals: bool = False) -> FleetInputs:
        with self._lock:
            return self._read(totals)

    def _read(self, totals: bool) -> FleetInputs:
        store, config = self.store, self.config
        now = store.time()
        return FleetInputs(
            now=now,
            placement=self.placement(),
            windows=store.read_windows(now, config.window_s, config.recent_windows + 1, cache=self._windows),
            totals=store.load_totals() if totals else {},
            heartbeats=store.workers(now),
            events=[e.model_dump(exclude={"id"}) for e in self.events()],
            controller=store.get_record("controller"),
            rebalance=store.get_record("rebalance"),
            counters=store.counters(REBALANCE_COUNTERS),
            leader=store.lease_holder(),
        )
