"""Placement planner: plain data in, a Plan out; no Ray, no Redis."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from moefleet.controller.planner import PlannerKnobs, PlanningError, plan, predict
from moefleet.core.placement import DeviceSpec, Inventory, Placement, spread_placement

NO_HEADROOM = PlannerKnobs(headroom=0.0)


def gpus(n: int, slots: int, *, speed: float = 1.0, prefix: str = "gpu", node: str = "node-0") -> list[DeviceSpec]:
    return [
        DeviceSpec(device_id=f"{prefix}{i}", node_id=node, kind="gpu", memory_bytes=slots, speed=speed)
        for i in range(n)
    ]


def cpu(slots: int, *, speed: float = 0.05, name: str = "cpu0") -> DeviceSpec:
    return DeviceSpec(device_id=name, node_id="cpu-node", kind="cpu", memory_bytes=slots, speed=speed)


def zipf(num_layers: int, num_experts: int, s: float = 1.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, num_experts + 1, dtype=float) ** -s
    return np.stack([rng.permutation(ranks) for _ in range(num_layers)]) * 1000


def used_bytes(placement: Placement, expert_bytes) -> dict[str, int]:
    nbytes = np.broadcast_to(np.asarray(expert_bytes), (64, 64))
    return {d: int(sum(nbytes[layer, e] for layer, e in keys)) for d, keys in placement.assignments.items()}


# --------------------------------------------------------------------------- invariants


@st.composite
def problems(draw):
    num_layers = draw(st.integers(1, 3))
    num_experts = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    load = rng.pareto(1.2, (num_layers, num_experts)) * draw(st.sampled_from([0.0, 1.0, 100.0]))
    nbytes = draw(st.sampled_from(["scalar", "array"]))
    expert_bytes = 10 if nbytes == "scalar" else rng.integers(5, 15, (num_layers, num_experts))
    devices = []
    for i in range(draw(st.integers(1, 5))):
        devices.append(DeviceSpec(device_id=f"g{i}", node_id=f"n{i % 2}", kind="gpu",
                                  memory_bytes=draw(st.integers(10, 80)),
                                  speed=draw(st.sampled_from([0.5, 1.0, 2.0]))))
    if draw(st.booleans()):
        devices.append(cpu(draw(st.integers(10, 400))))
    knobs = PlannerKnobs(
        headroom=draw(st.sampled_from([0.0, 0.1])),
        cpu_tier=draw(st.sampled_from(["off", "overflow", "auto"])),
        max_moves_per_step=draw(st.integers(0, 6)),
    )
    return load, Inventory(devices=devices), expert_bytes, knobs, seed


def _random_current(inventory: Inventory, load: np.ndarray, seed: int) -> Placement:
    rng = np.random.default_rng(seed + 1)
    out: dict[str, list[tuple[int, int]]] = {}
    for d in inventory.devices:
        picks = rng.random(load.shape) < 0.3
        out[d.device_id] = [(int(layer), int(e)) for layer, e in zip(*np.nonzero(picks))]
    return Placement(version=3, assignments=out)


def _check_valid(result, load, inventory, expert_bytes, knobs):
    nbytes = np.broadcast_to(np.asarray(expert_bytes), load.shape)
    specs = inventory.by_id()
    for device_id, keys in result.target.assignments.items():
        spec = specs[device_id]
        assert len(set(keys)) == len(keys), "at most one replica of an expert per device"
        used = sum(int(nbytes[layer, e]) for layer, e in keys)
        assert used <= int(spec.memory_bytes * (1 - knobs.headroom)), device_id
        if spec.kind == "cpu":
            assert knobs.cpu_tier != "off"
    placed = result.target.experts()
    assert placed == {(layer, e) for layer in range(load.shape[0]) for e in range(load.shape[1])}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), incremental=st.booleans())
def test_plan_never_overfills_device_memory(problem, incremental):
    load, inventory, expert_bytes, knobs, seed = problem
    current = _random_current(inventory, load, seed) if incremental else Placement()
    try:
        result = plan(load, inventory, current, knobs, expert_bytes=expert_bytes)
    except PlanningError:
        nbytes = np.broadcast_to(np.asarray(expert_bytes), load.shape)
        usable = [int(d.memory_bytes * (1 - knobs.headroom)) for d in inventory.devices
                  if d.kind == "gpu" or knobs.cpu_tier != "off"]
        if np.ndim(expert_bytes) == 0:  # one size: a slot count decides
            assert sum(u // expert_bytes for u in usable) < load.size, "refused although every expert fits"
        else:
            assert sum(usable) < nbytes.sum() + len(usable) * nbytes.max(), "refused although memory is plentiful"
        return
    _check_valid(result, load, inventory, expert_bytes, knobs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_every_expert_placed_at_least_once(problem):
    load, inventory, expert_bytes, knobs, seed = problem
    inventory = Inventory(devices=[*inventory.devices, *gpus(2, 400, prefix="big")])  # always feasible
    for current in (Placement(), _random_current(inventory, load, seed)):
        result = plan(load, inventory, current, knobs, expert_bytes=expert_bytes)
        _check_valid(result, load, inventory, expert_bytes, knobs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), sigma=st.sampled_from([0.1, 0.5]))
def test_replanning_never_makes_step_time_worse(problem, sigma):
    load, inventory, expert_bytes, knobs, seed = problem
    # a GPU that holds every expert once makes every drawn problem feasible: none is skipped
    total = int(np.broadcast_to(np.asarray(expert_bytes), load.shape).sum())
    inventory = Inventory(devices=[*inventory.devices, *gpus(1, int(total / (1 - knobs.headroom)) + 2, prefix="big")])
    first = plan(load, inventory, Placement(), knobs, expert_bytes=expert_bytes)
    drifted = load * np.random.default_rng(seed).lognormal(0, sigma, load.shape)
    result = plan(drifted, inventory, first.target, knobs, expert_bytes=expert_bytes)
    assert not result.repaired
    assert result.gain >= -1e-9
    assert result.step_time_after <= result.step_time_before * (1 + 1e-9)
    assert result.copies <= knobs.max_moves_per_step


def test_plan_is_deterministic():
    load = zipf(3, 16, 1.1)
    inventory = Inventory(devices=[*gpus(3, 30), *gpus(2, 20, speed=2.0, prefix="fast"), cpu(100)])
    current = plan(load, inventory, Placement(), NO_HEADROOM, expert_bytes=1).target
    drifted = load * np.random.default_rng(5).lognormal(0, 0.3, load.shape)
    a = plan(drifted, inventory, current, NO_HEADROOM, expert_bytes=1)
    b = plan(drifted.copy(), inventory, current.model_copy(deep=True), NO_HEADROOM, expert_bytes=1)
    assert a.model_dump() == b.model_dump()


# --------------------------------------------------------------------------- load following


def test_replicas_follow_load():
    load = np.array([[800.0, 400.0, 200.0, 100.0, 50.0, 25.0, 12.0, 6.0]])
    result = plan(load, Inventory(devices=gpus(4, 4)), Placement(), NO_HEADROOM, expert_bytes=1)
    counts = [len(result.target.replicas()[(0, e)]) for e in range(8)]
    assert sum(counts) == 16, "all free memory holds redundant replicas"
    assert counts == sorted(counts, reverse=True), counts
    assert counts[0] == 4 and counts[-1] == 1
    assert result.balancedness_after > 0.9


def test_replicas_follow_load_when_it_shifts():
    inventory = Inventory(devices=gpus(4, 4))
    load = np.array([[800.0, 10, 10, 10, 10, 10, 10, 10]])
    current = plan(load, inventory, Placement(), NO_HEADROOM, expert_bytes=1).target
    shifted = np.array([[10.0, 10, 10, 10, 10, 10, 10, 800]])
    result = plan(shifted, inventory, current, PlannerKnobs(headroom=0.0, max_moves_per_step=8), expert_bytes=1)
    replicas = result.target.replicas()
    assert len(replicas[(0, 7)]) > len(replicas[(0, 0)])
    assert result.apply and result.gain > 0.3


def test_faster_gpus_get_more_replicas():
    # One replica of each expert on the slow GPUs; room everywhere; budget for three copies.
    load = np.array([[900.0, 700.0, 500.0, 100.0, 100.0, 100.0]])
    inventory = Inventory(devices=[*gpus(2, 6, prefix="slow"), *gpus(2, 6, speed=3.0, prefix="fast")])
    current = Placement(assignments={"slow0": [(0, 0), (0, 2), (0, 4)], "slow1": [(0, 1), (0, 3), (0, 5)]})
    result = plan(load, inventory, current, PlannerKnobs(headroom=0.0, max_moves_per_step=3), expert_bytes=1)
    added = [m.device_id for m in result.moves if m.kind == "add"]
    assert len(added) == 3
    assert all(d.startswith("fast") for d in added), added
    held = {d: len(keys) for d, keys in result.target.assignments.items()}
    tokens = {d: sum(load[0, e] * inventory.by_id()[d].speed / sum(inventory.by_id()[h].speed for h in
                     result.target.replicas()[(0, e)]) for _, e in keys)
              for d, keys in result.target.assignments.items()}
    assert max(tokens, key=tokens.get).startswith("fast")
    assert sum(held.get(f"fast{i}", 0) for i in range(2)) >= 3


def test_faster_gpus_take_more_tokens_from_scratch():
    load = zipf(2, 16, 1.2)
    inventory = Inventory(devices=[*gpus(3, 12, prefix="slow"), *gpus(1, 12, speed=3.0, prefix="fast")])
    result = plan(load, inventory, Placement(), NO_HEADROOM, expert_bytes=1)
    replicas = result.target.replicas()
    speed = {d.device_id: d.speed for d in inventory.devices}
    tokens = dict.fromkeys(speed, 0.0)
    for (layer, e), holders in replicas.items():
        total = sum(speed[h] for h in holders)
        for h in holders:
            tokens[h] += load[layer, e] * speed[h] / total
    assert tokens["fast0"] > 2 * max(tokens[f"slow{i}"] for i in range(3))
    hottest = np.argmax(load, axis=1)
    assert all("fast0" in replicas[(layer, int(hottest[layer]))] for layer in range(2))


# --------------------------------------------------------------------------- CPU tier


def test_cold_experts_offload_to_cpu_when_gpu_memory_short():
    load = np.array([[1000.0 / (k + 1) for k in range(16)]])
    inventory = Inventory(devices=[*gpus(2, 6), cpu(100)])  # GPUs hold 12 of 16 experts
    result = plan(load, inventory, Placement(), NO_HEADROOM, expert_bytes=1)
    on_cpu = sorted(e for _, e in result.target.assignments["cpu0"])
    assert on_cpu == [12, 13, 14, 15], "the four coldest"
    assert all(len(result.target.assignments[f"gpu{i}"]) == 6 for i in range(2))


def test_no_cpu_tier_means_planning_error_when_gpu_memory_short():
    load = np.ones((1, 16))
    inventory = Inventory(devices=[*gpus(2, 6), cpu(100)])
    with pytest.raises(PlanningError, match="not enough device memory"):
        plan(load, inventory, Placement(), PlannerKnobs(headroom=0.0, cpu_tier="off"), expert_bytes=1)


def test_auto_cpu_tier_offloads_cold_experts_to_make_room_for_hot_replicas():
    load = np.array([[1000.0, 1.0, 1.0, 10.0, 10.0, 10.0]])
    inventory = Inventory(devices=[*gpus(2, 3), cpu(100, speed=0.05)])  # GPUs exactly full, no redundancy
    overflow = plan(load, inventory, Placement(), NO_HEADROOM, expert_bytes=1)
    auto = plan(load, inventory, Placement(), PlannerKnobs(headroom=0.0, cpu_tier="auto"), expert_bytes=1)
    assert "cpu0" not in overflow.target.assignments
    assert len(auto.target.replicas()[(0, 0)]) == 2, "the hot expert got a second GPU replica"
    on_cpu = {e for _, e in auto.target.assignments["cpu0"]}
    assert on_cpu and on_cpu <= {1, 2, 3, 4, 5}
    assert auto.step_time_after < 0.6 * overflow.step_time_after


def test_hot_expert_stuck_on_cpu_trades_places_with_a_cold_gpu_expert():
    inventory = Inventory(devices=[*gpus(2, 3), cpu(10)])
    current = Placement(assignments={"gpu0": [(0, 0), (0, 1), (0, 2)], "gpu1": [(0, 3), (0, 4), (0, 5)],
                                     "cpu0": [(0, 6)]})
    load = np.array([[10.0, 10, 10, 10, 10, 1.0, 500.0]])  # expert 6 became hot; 5 is the coldest
    result = plan(load, inventory, current, PlannerKnobs(headroom=0.0, max_moves_per_step=2), expert_bytes=1)
    assert result.target.assignments["cpu0"] == [(0, 5)]
    assert (0, 6) in result.target.assignments["gpu1"]
    assert result.copies == 2 and result.apply


# --------------------------------------------------------------------------- moves, hysteresis, repair


def _drifted_fleet():
    inventory = Inventory(devices=gpus(8, 12))
    load = zipf(4, 16, 1.0, seed=1)
    current = plan(load, inventory, Placement(), NO_HEADROOM, expert_bytes=1).target
    drifted = np.roll(load, 3, axis=1)  # the hot experts changed
    return inventory, current, drifted


def test_moves_are_capped():
    inventory, current, drifted = _drifted_fleet()
    for cap in (0, 1, 3, 10):
        result = plan(drifted, inventory, current, PlannerKnobs(headroom=0.0, max_moves_per_step=cap),
                      expert_bytes=1)
        before = {(d, k) for d, ks in current.assignments.items() for k in ks}
        after = {(d, k) for d, ks in result.target.assignments.items() for k in ks}
        assert result.copies == len(after - before) <= cap
        assert [m for m in result.moves if m.kind == "add"] == result.moves[: result.copies]
        assert {(m.device_id, m.expert) for m in result.moves if m.kind == "remove"} == before - after
    uncapped = plan(drifted, inventory, current, PlannerKnobs(headroom=0.0, max_moves_per_step=1000),
                    expert_bytes=1)
    assert uncapped.copies > 10 and uncapped.balancedness_after > result.balancedness_after


def test_more_moves_buy_more_balance():
    inventory, current, drifted = _drifted_fleet()
    gains = [plan(drifted, inventory, current, PlannerKnobs(headroom=0.0, max_moves_per_step=cap),
                  expert_bytes=1).gain for cap in (0, 2, 8, 32)]
    assert gains[0] == 0.0
    assert gains == sorted(gains) and gains[-1] > gains[1] > 0


def test_plan_not_applied_when_gain_below_threshold():
    inventory, current, drifted = _drifted_fleet()
    nudged = plan(drifted, inventory, current, PlannerKnobs(headroom=0.0, max_moves_per_step=1), expert_bytes=1)
    assert 0 < nudged.gain < 0.5
    strict = PlannerKnobs(headroom=0.0, max_moves_per_step=1, min_gain=nudged.gain + 1e-6)
    result = plan(drifted, inventory, current, strict, expert_bytes=1)
    assert result.moves and not result.apply
    loose = PlannerKnobs(headroom=0.0, max_moves_per_step=1, min_gain=nudged.gain)
    assert plan(drifted, inventory, current, loose, expert_bytes=1).apply


def test_hysteresis_keeps_a_placement_still_when_its_balance_changes_a_little():
    inventory = Inventory(devices=gpus(4, 6))
    load = zipf(2, 8, 0.8)
    first = plan(load, inventory, Placement(), NO_HEADROOM, expert_bytes=1)
    nudged = load.copy()
    nudged[0, 0] *= 1.03  # one expert 3% hotter: the balance changes, and a slightly better placement exists
    still = plan(nudged, inventory, first.target, NO_HEADROOM, expert_bytes=1)  # the default hysteresis
    assert still.moves == [] and not still.apply
    assert still.target.version == first.target.version
    assert still.balancedness_before < first.balancedness_after
    eager = plan(nudged, inventory, first.target, PlannerKnobs(headroom=0.0, hysteresis=0.0), expert_bytes=1)
    assert eager.moves and 0 < eager.gain < NO_HEADROOM.min_gain  # the moves hysteresis held back


def test_version_bumps_when_the_placement_changes():
    inventory, current, drifted = _drifted_fleet()
    current = current.model_copy(update={"version": 41})
    result = plan(drifted, inventory, current, NO_HEADROOM, expert_bytes=1)
    assert result.moves and result.target.version == 42


def test_lost_device_is_repaired_even_past_the_move_cap():
    inventory, current, _ = _drifted_fleet()
    load = zipf(4, 16, 1.0, seed=1)
    smaller = Inventory(devices=inventory.devices[:-1])
    result = plan(load, smaller, current, PlannerKnobs(headroom=0.0, max_moves_per_step=0), expert_bytes=1)
    assert result.repaired and result.apply and result.balancedness_before is None
    assert "gpu7" not in result.target.assignments
    assert result.target.experts() == {(layer, e) for layer in range(4) for e in range(16)}


def test_overfull_device_is_evacuated_when_headroom_grows():
    inventory = Inventory(devices=gpus(4, 10))
    load = zipf(1, 16, 1.0)
    current = plan(load, inventory, Placement(), NO_HEADROOM, expert_bytes=1).target
    result = plan(load, inventory, current, PlannerKnobs(headroom=0.2), expert_bytes=1)
    assert result.repaired
    assert all(used <= 8 for used in used_bytes(result.target, 1).values())
    assert result.target.experts() == {(0, e) for e in range(16)}


def test_not_enough_memory_is_a_planning_error():
    with pytest.raises(PlanningError, match="not enough device memory"):
        plan(np.ones((2, 8)), Inventory(devices=gpus(2, 7)), Placement(), NO_HEADROOM, expert_bytes=1)


def test_headroom_is_kept_free():
    load = zipf(1, 8)
    result = plan(load, Inventory(devices=gpus(2, 100)), Placement(), PlannerKnobs(headroom=0.25),
                  expert_bytes=10)
    assert max(used_bytes(result.target, 10).values()) <= 75


# --------------------------------------------------------------------------- model and inputs


def test_load_rows_map_to_the_given_layer_indices():
    load = zipf(2, 4)
    result = plan(load, Inventory(devices=gpus(2, 8)), Placement(), NO_HEADROOM, expert_bytes=1,
                  layers=[3, 7])
    assert {layer for layer, _ in result.target.experts()} == {3, 7}
    stats = predict(load, Inventory(devices=gpus(2, 8)), result.target, layers=[3, 7])
    assert stats.step_time == pytest.approx(result.step_time_after)


def test_predict_splits_traffic_by_device_speed():
    inventory = Inventory(devices=[*gpus(1, 4, speed=1.0, prefix="slow"), *gpus(1, 4, speed=3.0, prefix="fast")])
    placement = Placement(assignments={"slow0": [(0, 0)], "fast0": [(0, 0), (0, 1)]})
    stats = predict(np.array([[400.0, 30.0]]), inventory, placement)
    # expert 0: 100 tokens to slow (time 100), 300 to fast (time 100); expert 1: 30 tokens on fast (time 10)
    assert stats.device_time == pytest.approx({"slow0": 100.0, "fast0": 110.0})
    assert stats.step_time == pytest.approx(110.0)
    assert stats.balancedness == pytest.approx(105.0 / 110.0)


def test_from_scratch_is_no_worse_than_greedy_replicate_then_pack():
    import torch

    from moefleet.controller.eplb import rebalance_experts

    for s, seed in ((0.6, 0), (1.0, 1), (1.2, 2)):
        load = zipf(2, 32, s, seed)
        num_gpus, slots = 8, 5
        phy2log, _, logcnt = rebalance_experts(torch.from_numpy(load), num_gpus * slots, 1, 1, num_gpus)
        ratio = 0.0
        for layer in range(2):
            per_slot = load[layer, phy2log[layer]] / logcnt[layer, phy2log[layer]].numpy()
            per_gpu = per_slot.reshape(num_gpus, slots).sum(axis=1)
            ratio += per_gpu.max() / per_gpu.mean() / 2
        result = plan(load, Inventory(devices=gpus(num_gpus, 2 * slots)), Placement(), NO_HEADROOM,
                      expert_bytes=1)
        assert 1 / result.balancedness_after <= ratio * 1.01


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("max_moves_per_step", {"max_moves_per_step": -1}),
        ("hysteresis", {"hysteresis": -0.1}),
        ("min_gain", {"min_gain": 1.5}),
        ("headroom", {"headroom": 1.0}),
        ("cpu_tier", {"cpu_tier": "sometimes"}),
        ("max_search_steps", {"max_search_steps": 0}),
        ("bogus", {"bogus": 1}),
    ],
)
def test_bad_knobs_name_the_field(field, kwargs):
    with pytest.raises(ValidationError, match=field):
        PlannerKnobs(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"load": np.ones(4)}, "load"),
        ({"load": -np.ones((1, 4))}, "load"),
        ({"load": np.full((1, 4), np.nan)}, "load"),
        ({"expert_bytes": 0}, "expert_bytes"),
        ({"expert_bytes": np.ones((2, 2))}, "expert_bytes"),
        ({"layers": [0, 0]}, "layers"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, field):
    args = {"load": np.ones((1, 4)), "expert_bytes": 1, "layers": None, **kwargs}
    with pytest.raises(ValueError, match=field):
        plan(args["load"], Inventory(devices=gpus(2, 8)), Placement(), NO_HEADROOM,
             expert_bytes=args["expert_bytes"], layers=args["layers"])


def test_replicas_left_on_a_disallowed_cpu_device_are_removed():
    inventory = Inventory(devices=[*gpus(2, 4), cpu(10)])
    current = Placement(assignments={"gpu0": [(0, 0), (0, 1)], "gpu1": [(0, 2)], "cpu0": [(0, 3), (9, 9)]})
    result = plan(np.ones((1, 4)), inventory, current, PlannerKnobs(headroom=0.0, cpu_tier="off"), expert_bytes=1)
    assert result.repaired and result.apply
    assert "cpu0" not in result.target.assignments
    removes = {(m.device_id, m.expert) for m in result.moves if m.kind == "remove"}
    assert {("cpu0", (0, 3)), ("cpu0", (9, 9))} <= removes
    assert result.target.experts() == {(0, e) for e in range(4)}


# --------------------------------------------------------------------------- replica floor


def test_min_replicas_two_gives_every_expert_two_devices_when_memory_allows():
    load = zipf(2, 8, s=1.2)
    knobs = PlannerKnobs(headroom=0.0, min_replicas=2)
    p = plan(load, Inventory(devices=gpus(4, 8)), Placement(), knobs, expert_bytes=1).target
    assert all(len(ws) >= 2 and len(set(ws)) == len(ws) for ws in p.replicas().values())
    # a running placement under the floor is repaired even with no copy budget
    single = spread_placement([0, 1], 8, [f"gpu{i}" for i in range(4)])
    repaired = plan(load, Inventory(devices=gpus(4, 8)), single, knobs.model_copy(update={"max_moves_per_step": 0}), expert_bytes=1)
    assert repaired.repaired and repaired.apply
    assert all(len(ws) >= 2 for ws in repaired.target.replicas().values())


def test_min_replicas_falls_back_to_one_when_memory_is_short():
    load = zipf(1, 8)
    p = plan(load, Inventory(devices=gpus(2, 5)), Placement(), PlannerKnobs(headroom=0.0, min_replicas=2), expert_bytes=1)
    assert set(p.target.experts()) == {(0, e) for e in range(8)}  # every expert once: 16 copies would not fit in 10


def test_planned_placements_carry_the_device_speeds():
    devices = gpus(2, 8) + gpus(1, 8, speed=3.0, prefix="big")
    p = plan(zipf(1, 8), Inventory(devices=devices), Placement(), NO_HEADROOM, expert_bytes=1).target
    assert p.speeds["big0"] == 3.0 and p.speeds["gpu0"] == 1.0


def test_min_replicas_auto_is_two_where_memory_holds_two_copies_with_the_headroom_and_says_why():
    from moefleet.controller.planner import min_replicas

    knobs = PlannerKnobs(min_replicas="auto")  # headroom 0.1
    roomy = min_replicas(Inventory(devices=gpus(2, 10)), knobs, expert_bytes=1, shape=(1, 8))  # 2 x 9 slots for 16 copies
    assert roomy["setting"] == "auto" and roomy["replicas"] == 2 and "hold 2 copies" in roomy["why"]
    tight = min_replicas(Inventory(devices=gpus(2, 8)), knobs, expert_bytes=1, shape=(1, 8))  # 2 x 7 slots: 14 < 16
    assert tight["replicas"] == 1 and "more than" in tight["why"]
    alone = min_replicas(Inventory(devices=gpus(1, 100)), knobs, expert_bytes=1, shape=(1, 8))
    assert alone["replicas"] == 1 and "1 GPU device" in alone["why"]
    lopsided = min_replicas(Inventory(devices=gpus(1, 100) + gpus(1, 1, prefix="small")), knobs, expert_bytes=1, shape=(1, 8))
    assert lopsided["replicas"] == 1 and "distinct devices" in lopsided["why"]  # 16 copies fit in bytes, not on 2 devices
    # the plan keeps the floor auto resolved to
    p = plan(zipf(1, 8), Inventory(devices=gpus(2, 10)), Placement(), knobs, expert_bytes=1).target
    assert all(len(ws) == 2 for ws in p.replicas().values())
    p = plan(zipf(1, 8), Inventory(devices=gpus(2, 8)), Placement(), knobs, expert_bytes=1).target
    assert min(len(ws) for ws in p.replicas().values()) == 1


def test_the_fleet_controller_plans_with_min_replicas_auto_unless_told_otherwise():
    from moefleet.controller.main import ControllerConfig
    from moefleet.core.config import FleetConfig

    assert ControllerConfig(ray_address=None).planner.min_replicas == "auto"
    assert ControllerConfig(ray_address=None, planner={"headroom": 0.2}).planner.min_replicas == "auto"
    assert ControllerConfig(ray_address=None, planner=PlannerKnobs(headroom=0.2)).planner.min_replicas == "auto"
    assert ControllerConfig(ray_address=None, planner={"min_replicas": 1}).planner.min_replicas == 1
    assert FleetConfig().min_replicas == "auto"
    with pytest.raises(ValidationError, match="min_replicas"):
        FleetConfig(min_replicas=0)
    with pytest.raises(ValidationError):
        PlannerKnobs(min_replicas="twice")
