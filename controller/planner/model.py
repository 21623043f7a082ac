"""The planner's load and fleet model: one planning problem as arrays, and a placement being edited.

Load model (what "balanced" means here)
---------------------------------------
* ``load[i, e]`` is the (decayed) token count routed to expert ``e`` of the
  i-th MoE layer; row ``i`` is layer ``layers[i]`` (``layers`` defaults to
  ``range(L)``), so the placement's ``ExpertKey`` is ``(layers[i], e)``.
* Routing: the router sends each token of an expert to one of its replicas
  with probability proportional to the speed of the replica's device. With
  ``holder_speed[i, e]`` the sum of the speeds of the devices holding expert ``(i, e)``,
  a replica on device ``d`` gets ``load * speed[d] / holder_speed`` tokens and
  spends ``load / holder_speed`` time on them: every replica of an expert takes the same time.
* Device time per layer: ``device_time[i, d] = sum over experts on d of load / holder_speed``
  (time = tokens / speed). A MoE layer call waits for its slowest device (the
  router dispatches one layer at a time), so a layer costs ``max_d device_time[i, d]``
  and the **step time** is ``sum_i max_d device_time[i, d]`` over all devices, CPU ones
  included: a cold expert offloaded to a slow CPU device must not become the
  layer's bottleneck.
* **Balancedness** = ``sum_i mean_{GPU d} device_time[i, d] / step time`` (in (0, 1];
  1.0 is perfect). With one layer and no CPU bottleneck it is the mean/max of
  GPU device time. The predicted **gain** of a plan is the relative cut in
  step time, ``1 - after / before``.
* Memory: a device holds at most ``memory_bytes * (1 - headroom)`` bytes of
  expert weights; a replica costs ``expert_bytes`` (one value or one per
  expert). A device holds at most one replica of an expert (a second copy on
  the same device cannot take traffic off it).
* Assumed, not modelled here: the cost of a weight copy beyond counting it
  (``gate.py`` prices a plan's moves for the controller's cost-benefit gate),
  the routers' per-replica batching effects, and network transfer time.
"""

from __future__ import annotations

import numpy as np

from moefleet.core.placement import DeviceId, ExpertKey, Inventory, Placement

from .schema import PlacementStats, PlannerKnobs, PlanningError

__all__ = ["Fleet", "PlacementState", "placement_stats", "replica_floor"]


def _gib(b: int) -> str:
    if b >= 2**26:
        return f"{b / 2**30:.4g} GiB"
    return f"{b / 2**20:.3g} MiB" if b >= 2**20 else f"{b} bytes"


def replica_floor(min_replicas: int | str, capacities, replica_bytes) -> tuple[int, str]:
    """Replicas every expert keeps, and why: ``(floor, reason)``.

    min_replicas: the knob (an integer, or 'auto': 2 where memory allows).
    capacities: bytes of expert weights each GPU device may hold (its memory less the headroom).
    replica_bytes: bytes of one replica of each expert (any shape).
    A floor of ``n`` needs ``n`` copies of every expert on distinct devices: room
    for them in all (``n`` x one copy of everything) and in slots (each device
    holds ``capacity // largest replica`` experts, at most one copy of each).
    """
    want = 2 if min_replicas == "auto" else int(min_replicas)
    setting = "auto" if min_replicas == "auto" else str(want)
    caps = [int(c) for c in capacities]
    sizes = np.asarray(replica_bytes, dtype=np.int64).ravel()
    if want <= 1:
        return 1, f"min_replicas {setting}"
    floor = min(want, len(caps))
    if floor < 2:
        return 1, f"min_replicas {setting}: {len(caps)} GPU device(s), so one copy of each expert"
    need, have = floor * int(sizes.sum()), sum(caps)
    if need > have:
        return 1, (f"min_replicas {setting}: {floor} copies of every expert take {_gib(need)}, more than the "
                   f"{_gib(have)} the GPU devices hold beside the headroom")
    slots = sum(min(c // max(1, int(sizes.max())), sizes.size) for c in caps)
    if slots < floor * sizes.size:
        return 1, (f"min_replicas {setting}: the GPU devices have room for {slots} experts, not {floor} copies of "
                   f"each of {sizes.size} on distinct devices")
    return floor, (f"min_replicas {setting}: the GPU devices hold {floor} copies of every expert ({_gib(need)} of "
                   f"{_gib(have)} beside the headroom)")


class Fleet:
    """The static side of one planning problem, as arrays indexed by device d, layer row l, expert e."""

    def __init__(self, load, inventory: Inventory, knobs: PlannerKnobs, expert_bytes, layers):
        tokens = np.asarray(load, dtype=np.float64)
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"load: expected a non-empty [L, E] array, got shape {tokens.shape}")
        if not np.all(np.isfinite(tokens)) or np.any(tokens < 0):
            raise ValueError("load: token counts must be finite and >= 0")
        num_layers, num_experts = tokens.shape
        self.load = tokens  # [L, E] tokens per (layer row, expert)
        self.layers = list(range(num_layers)) if layers is None else [int(x) for x in layers]
        if len(self.layers) != num_layers or len(set(self.layers)) != num_layers:
            raise ValueError(f"layers: need {num_layers} distinct layer indices (one per load row), got {layers!r}")
        nbytes = np.asarray(expert_bytes)
        if nbytes.ndim == 0:
            nbytes = np.full(tokens.shape, nbytes)
        if nbytes.shape != tokens.shape or not np.all(np.isfinite(nbytes)) or np.any(nbytes <= 0):
            raise ValueError(f"expert_bytes: expected a positive number or a positive [L, E] = {tokens.shape} array")
        self.replica_bytes = np.ceil(nbytes).astype(np.int64)  # [L, E] bytes of one replica
        if not inventory.devices:
            raise PlanningError("inventory: no devices to place experts on")
        devs = inventory.devices
        self.device_ids = [d.device_id for d in devs]
        self.speed = np.array([d.speed for d in devs], dtype=np.float64)  # [D] tokens per unit time
        self.is_gpu = np.array([d.kind == "gpu" for d in devs])  # [D]
        # [D] bytes of expert weights each device may hold (its memory less the headroom)
        self.capacity = np.array([int(d.memory_bytes * (1.0 - knobs.headroom)) for d in devs], dtype=np.int64)
        cpu_on = knobs.cpu_tier != "off"
        self.may_host = self.is_gpu | cpu_on  # [D] may hold replicas at all
        self.cpu_tier = ~self.is_gpu & cpu_on  # [D] CPU devices that may take (cold) experts
        self.row_of = {layer: i for i, layer in enumerate(self.layers)}
        # replicas every expert keeps: min_replicas where GPU memory holds every expert that often
        self.replica_floor, self.replica_floor_why = replica_floor(knobs.min_replicas, self.capacity[self.is_gpu], self.replica_bytes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.device_ids), *self.load.shape)

    def matrix(self, placement: Placement) -> tuple[np.ndarray, bool, list[tuple[DeviceId, ExpertKey]]]:
        """Placement -> bool ``[D, L, E]`` over inventory devices.

        Also returns whether anything had to be left out (devices not in the
        inventory, unknown experts, CPU devices with the CPU tier off,
        duplicates) and the left-out replicas on inventory devices, which the
        plan removes.
        """
        held = np.zeros(self.shape, dtype=bool)
        index = {d: i for i, d in enumerate(self.device_ids)}
        dropped = False
        stale: list[tuple[DeviceId, ExpertKey]] = []
        for device_id, keys in placement.assignments.items():
            d = index.get(device_id)
            if d is None:
                dropped = dropped or bool(keys)
                continue
            for layer, e in keys:
                row = self.row_of.get(int(layer))
                if row is None or not 0 <= int(e) < self.load.shape[1] or not self.may_host[d]:
                    dropped = True
                    stale.append((device_id, (int(layer), int(e))))
                elif held[d, row, int(e)]:
                    dropped = True  # listed twice
                else:
                    held[d, row, int(e)] = True
        return held, dropped, stale

    def placement(self, held: np.ndarray, version: int) -> Placement:
        """Bool ``[D, L, E]`` -> the ``Placement`` it describes (with the devices' speeds)."""
        out: dict[DeviceId, list[ExpertKey]] = {}
        for d, device_id in enumerate(self.device_ids):
            rows, experts = np.nonzero(held[d])
            if len(rows):
                out[device_id] = [(self.layers[r], int(e)) for r, e in zip(rows, experts)]
        speeds = {device_id: float(self.speed[d]) for d, device_id in enumerate(self.device_ids) if device_id in out}
        return Placement(version=version, assignments=out, speeds=speeds)


class PlacementState:
    """A placement being edited, with its derived load.

    ``held[d, l, e]``: device d holds a replica of expert e of layer row l;
    ``start``: the same for the placement the plan starts from (what is
    already loaded: a replica in ``held`` that ``start`` lacks is a weight copy);
    ``replicas[l, e]``: how many devices hold it; ``holder_speed[l, e]``: the
    sum of their speeds; ``replica_time[l, e] = load / holder_speed``: the time
    each of its replicas spends; ``device_time[l, d]``: device d's time in
    layer l, the sum of the replica times of what it holds; ``used[d]``:
    bytes held; ``copies``: weight copies made so far.
    """

    def __init__(self, fleet: Fleet, start: np.ndarray, held: np.ndarray):
        self.fleet = fleet
        self.start = start
        self.held = held
        self.used = np.einsum("dle,le->d", held.astype(np.int64), fleet.replica_bytes)
        self.copies = int((held & ~start).sum())
        num_layers = fleet.load.shape[0]
        self.replicas = np.zeros(fleet.load.shape, dtype=np.int64)
        self.holder_speed = np.zeros(fleet.load.shape)
        self.replica_time = np.zeros(fleet.load.shape)
        self.device_time = np.zeros((num_layers, len(fleet.device_ids)))
        for l in range(num_layers):
            self._refresh(l)

    def _refresh(self, l: int) -> None:
        col = self.held[:, l, :]
        self.replicas[l] = col.sum(0)
        self.holder_speed[l] = self.fleet.speed @ col
        speed = self.holder_speed[l]
        self.replica_time[l] = np.divide(self.fleet.load[l], speed, out=np.zeros_like(speed), where=speed > 0)
        self.device_time[l] = col @ self.replica_time[l]

    def apply(self, ops) -> None:
        for sign, d, l, e in ops:
            self.held[d, l, e] = sign > 0
            self.used[d] += sign * self.fleet.replica_bytes[l, e]
            self.copies += sign * (not self.start[d, l, e])
        for l in {op[2] for op in ops}:
            self._refresh(l)

    def evaluate(self, ops, focus: int, bottleneck_time: float) -> tuple[float, int, float] | None:
        """Exact effect of ``ops`` (list of ``(+1 add | -1 drop, d, l, e)``).

        Returns ``(relief, copies, spread)`` where relief is how far the highest
        new time among the focus layer's changed devices stays below ``bottleneck_time``
        (the bottleneck) and spread is the sum of squares of the changed
        devices' new times (a tie-breaker: lower is more even); None when the
        ops are invalid, give no relief, or raise another layer's step time.
        """
        fleet = self.fleet
        cols: dict[tuple[int, int], np.ndarray] = {}
        mem: dict[int, int] = {}
        cost = 0
        for sign, d, l, e in ops:
            col = cols.get((l, e))
            if col is None:
                col = cols[(l, e)] = self.held[:, l, e].copy()
            if sign > 0:
                if col[d] or not fleet.may_host[d]:
                    return None
                col[d] = True
                cost += not self.start[d, l, e]
            else:
                if not col[d]:
                    return None
                col[d] = False
                cost -= not self.start[d, l, e]
            mem[d] = mem.get(d, 0) + sign * int(fleet.replica_bytes[l, e])
        for d, delta in mem.items():
            if delta > 0 and self.used[d] + delta > fleet.capacity[d]:
                return None
        delta_t: dict[int, np.ndarray] = {}
        touched: dict[int, np.ndarray] = {}
        for (l, e), col in cols.items():
            if not col.any():
                return None
            c_new = fleet.load[l, e] / fleet.speed[col].sum()
            old = self.held[:, l, e]
            delta_t[l] = delta_t.get(l, 0.0) + col * c_new - old * self.replica_time[l, e]
            touched[l] = touched.get(l, False) | (col != old)
        relief, spread = None, 0.0
        for l, dt in delta_t.items():
            new_t = self.device_time[l] + dt
            # devices whose time changes (a swap of equal-speed replicas leaves other holders alone)
            changed = touched[l] | (np.abs(dt) > 1e-12 * max(float(self.device_time[l].max()), 1e-300))
            spread += float((new_t[changed] ** 2).sum())
            if l == focus:
                relief = bottleneck_time - new_t[changed].max()
                if relief <= 0:
                    return None
            else:
                up = changed & (new_t > self.device_time[l])
                if up.any() and new_t[up].max() >= self.device_time[l].max():
                    return None
        if relief is None:
            return None
        return relief, cost, spread


def placement_stats(fleet: Fleet, device_time: np.ndarray) -> PlacementStats:
    """The figures of a placement from its ``[L, D]`` device times."""
    layer_time = device_time.max(axis=1)
    step = float(layer_time.sum())
    gpu = fleet.is_gpu if fleet.is_gpu.any() else np.ones_like(fleet.is_gpu)
    mean = float(device_time[:, gpu].mean(axis=1).sum())
    return PlacementStats(
        step_time=step,
        balancedness=1.0 if step <= 0 else mean / step,
        layer_time=[float(v) for v in layer_time],
        device_time={device_id: float(v) for device_id, v in zip(fleet.device_ids, device_time.sum(axis=0))},
    )
