"""Dispatch planning: how an expert's rows split among its replicas, against the planner's load model."""

import numpy as np
import pytest

from moefleet.controller.planner import PlannerKnobs, plan, predict
from moefleet.core.placement import DeviceSpec, Inventory, Placement
from moefleet.router_service.dispatch import NoReplicaError, plan_dispatch, split_rows


def test_rows_split_in_proportion_to_speed_with_no_outstanding_work():
    rng = np.random.default_rng(0)
    total = np.zeros(2)
    for _ in range(200):
        parts = split_rows(30, ["fast", "slow"], {"fast": 3.0, "slow": 1.0}, None, rng)
        assert sum(parts) == 30
        total += parts
    assert total[0] / total.sum() == pytest.approx(0.75, abs=0.01)


def test_outstanding_work_is_filled_first():
    # "a" has 40 rows in flight at equal speed: the first 40 of 60 new rows go to "b", the rest split evenly
    parts = split_rows(60, ["a", "b"], None, {"a": 40.0}, np.random.default_rng(0))
    assert parts == [10, 50]
    # so much in flight on "a" that everything goes to "b"
    assert split_rows(10, ["a", "b"], None, {"a": 100.0}) == [0, 10]


def test_a_single_row_is_not_always_sent_to_the_same_replica():
    rng = np.random.default_rng(1)
    got = [split_rows(1, ["a", "b"], None, None, rng) for _ in range(400)]
    share_a = sum(p[0] for p in got) / len(got)
    assert 0.4 < share_a < 0.6


def test_each_worker_gets_one_batch_with_each_expert_once():
    ids = np.array([[0, 1]] * 40)
    w = np.ones_like(ids, dtype=np.float32)
    batches = plan_dispatch(ids, w, {0: ["a", "b"], 1: ["a", "b"]}, rng=np.random.default_rng(0))
    assert sorted(b.worker for b in batches) == ["a", "b"]
    for b in batches:
        assert b.experts == sorted(set(b.experts))
    served = sorted((int(r), e) for b in batches for r, e in zip(b.rows, np.repeat(b.experts, b.counts)))
    assert served == sorted((t, e) for t in range(40) for e in (0, 1))  # every assignment exactly once
    rows = {b.worker: b.num_rows for b in batches}
    assert rows["a"] == rows["b"] == 40


def test_an_expert_without_replicas_is_named():
    with pytest.raises(NoReplicaError, match="expert 3"):
        plan_dispatch(np.array([[3, 0]]), np.ones((1, 2), np.float32), {0: ["a"], 3: []})


def test_achieved_device_load_matches_the_planners_prediction():
    """Skewed load on a mixed-speed fleet: rows dispatched per device / speed within 10% of the plan's device time."""
    num_experts, top_k, tokens = 16, 2, 256
    rng = np.random.default_rng(7)
    probs = 1.0 / np.arange(1, num_experts + 1) ** 1.2
    probs /= probs.sum()
    devices = [
        DeviceSpec(device_id=f"d{i}", node_id="n", kind="gpu", memory_bytes=8, speed=s)
        for i, s in enumerate([1.0, 1.0, 2.0, 0.5])
    ]
    inventory = Inventory(devices=devices)
    load = (probs * tokens * top_k * 200)[None, :]  # the window the planner sees: 200 calls
    target = plan(load, inventory, Placement(), PlannerKnobs(headroom=0.0), expert_bytes=1).target
    assert max(len(v) for v in target.replicas().values()) > 1  # hot experts were replicated
    predicted = predict(load, inventory, target).device_time
    replicas = {e: ws for (_, e), ws in target.replicas().items()}
    achieved = {d.device_id: 0.0 for d in devices}
    for _ in range(200):
        ids = np.stack([rng.choice(num_experts, top_k, replace=False, p=probs) for _ in range(tokens)])
        for b in plan_dispatch(ids, np.ones(ids.shape, np.float32), replicas, speeds=target.speeds, rng=rng):
            achieved[b.worker] += b.num_rows / target.speed(b.worker)
    for d in achieved:
        assert achieved[d] == pytest.approx(predicted[d], rel=0.10), (d, achieved, predicted)


def test_many_replicas_with_uneven_queues_finish_together():
    # a hot expert on a large fleet: 200 replicas of mixed speeds and queues; those that get rows all end at one level
    rng = np.random.default_rng(7)
    workers = [f"w{i}" for i in range(200)]
    speeds = {w: float(rng.choice([1.0, 0.25, 0.025])) for w in workers}
    outstanding = {w: float(rng.integers(0, 400)) for w in workers}
    parts = split_rows(50_000, workers, speeds, outstanding, np.random.default_rng(0))
    assert sum(parts) == 50_000 and min(parts) >= 0
    finish = [(outstanding[w] + n) / speeds[w] for w, n in zip(workers, parts) if n > 0]
    idle = [outstanding[w] / speeds[w] for w, n in zip(workers, parts) if n == 0]
    assert max(finish) - min(finish) <= 2 / min(speeds.values())  # equal up to rounding a row or two
    assert not idle or min(idle) >= min(finish) - 2 / min(speeds.values())  # no idle replica would finish sooner
