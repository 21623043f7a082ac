"""What elastic placement is compared with: EPLB on history at equal memory, the planner on history; capacity at an
SLO; traffic that drifts and volume that follows a daily curve."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moefleet.controller.eplb import rebalance_experts
from moefleet.controller.main import ControllerConfig
from moefleet.controller.planner import PlannerKnobs, PlanningError
from moefleet.controller.sim import (
    Diurnal,
    DriftTraffic,
    SimConfig,
    baseline_placement,
    capacity_at_slo,
    eplb_placement,
    eplb_slots,
    parse_traffic,
    topk_inclusion,
)
from moefleet.core.trace import Trace, TraceError

from tests.sim_helpers import EXPERT_BYTES, HEADROOM, devices, steady_trace


def test_eplb_gets_the_slots_equal_memory_allows_and_places_deepseeks_answer():
    load = np.array([[900.0, 50, 40, 30, 20, 10, 5, 1]])
    fleet = devices(4, 3)  # each device holds 3 experts after the headroom: 12 slots for 8 experts
    placement = eplb_placement(load, fleet, EXPERT_BYTES, HEADROOM, [0])
    phy2log, _, logcnt = rebalance_experts(torch.from_numpy(load), 12, 1, 1, 4)
    expected = {f"d{g}": sorted({(0, int(e)) for e in phy2log[0, 3 * g:3 * g + 3].tolist()}) for g in range(4)}
    assert placement.assignments == expected
    replicas = placement.replicas()
    # where EPLB put two slots of an expert on one GPU they serve as one replica
    for e in range(8):
        assert len(replicas[(0, e)]) <= int(logcnt[0, e])
    assert len(replicas[(0, 0)]) >= 2


def test_eplb_on_a_mixed_fleet_cuts_larger_devices_into_ranks():
    assert eplb_slots([4, 4, 4]) == 4  # homogeneous: one rank a GPU
    assert eplb_slots([15, 15, 4, 4]) == 3  # 5 + 5 + 1 + 1 ranks of 3: 36 of 38 slots (4 would use 32)
    fleet = devices(1, 6) + devices(2, 3, prefix="small")  # 6 + 3 + 3 slots: ranks of 3, the large device is two
    load = np.array([[600.0, 100, 90, 80, 70, 60, 50, 40]])
    placement = eplb_placement(load, fleet, EXPERT_BYTES, HEADROOM, [0])
    phy2log, _, _ = rebalance_experts(torch.from_numpy(load), 12, 1, 1, 4)
    ranks = ["d0", "d0", "small0", "small1"]
    expected: dict = {}
    for slot, e in enumerate(phy2log[0].tolist()):
        expected.setdefault(ranks[slot // 3], set()).add((0, e))
    assert placement.assignments == {d: sorted(k) for d, k in expected.items()}


def test_eplb_that_cannot_hold_every_expert_is_a_planning_error():
    with pytest.raises(PlanningError, match="eplb"):
        eplb_placement(np.ones((1, 16)), devices(2, 4), EXPERT_BYTES, HEADROOM, [0])


def _switching_trace() -> Trace:
    """Expert 0 hot for the first 10 s, expert 7 hot after."""
    early = steady_trace([800] + [10] * 7, 20, 10)
    late = steady_trace([10] * 7 + [800], 20, 10)
    return Trace(t=np.concatenate([early.t, late.t + 10]), layer=np.concatenate([early.layer, late.layer]),
                 counts=np.concatenate([early.counts, late.counts]))


@pytest.mark.parametrize("kind", ["history", "eplb"])
def test_baselines_are_planned_on_the_history_window_only(kind):
    trace = _switching_trace()
    # a floor of one copy: every replica past it follows the load (min_replicas auto would give every expert two here)
    config = SimConfig(controller=ControllerConfig(ray_address=None, planner=PlannerKnobs(min_replicas=1)))
    placement = baseline_placement(kind, trace, devices(4, 4), EXPERT_BYTES, config, history_s=8.0)
    replicas = placement.replicas()
    assert len(replicas[(0, 0)]) > len(replicas[(0, 7)])  # expert 0 was the hot one in the first 8 s
    whole = baseline_placement(kind, trace, devices(4, 4), EXPERT_BYTES, config, history_s=20.0).replicas()
    assert len(whole[(0, 7)]) > 1


def test_capacity_is_the_highest_scale_that_meets_the_slo():
    runs = []

    def run(scale):
        runs.append(scale)
        return SimpleNamespace(p99_latency_ms=10.0 * scale)

    cap = capacity_at_slo(run, rate=1000.0, slo_ms=35.0)
    assert cap["scale"] <= 3.5 < cap["scale"] + 4 / 32  # bracketed in [2, 4), bisected five times
    assert cap["capacity_tokens_per_s"] == pytest.approx(cap["scale"] * 1000.0)
    assert cap["runs"] == len(runs) <= 8
    assert capacity_at_slo(lambda s: SimpleNamespace(p99_latency_ms=1e9), 1000.0, 35.0)["scale"] == 0.0


# --------------------------------------------------------------------------- traffic


def test_topk_inclusion_sums_to_top_k_and_caps_at_one():
    p = np.array([[0.7, 0.1, 0.1, 0.05, 0.05]])
    pi = topk_inclusion(p, 2)
    assert pi.sum() == pytest.approx(2.0)
    assert pi[0, 0] == 1.0 and np.all(pi <= 1.0)
    assert np.all(np.diff(pi[0, 1:]) <= 1e-12)  # order kept


def test_drift_popularity_moves_slowly_and_the_mix_turns_over():
    d = DriftTraffic(experts=32, layers=2, duration_s=1200, tau_s=300, mix_tau_s=600, seed=3)
    p = d.popularity()
    assert p.shape == (1200, 2, 32) and np.allclose(p.sum(axis=2), 1.0)
    tv = lambda a, b: 0.5 * np.abs(p[a] - p[b]).sum(axis=1).mean()  # noqa: E731
    assert tv(0, 1) < 0.01  # a second later: almost the same
    assert tv(0, 1) < tv(0, 60) < tv(0, 1199)  # and further with time
    assert np.array_equal(p, DriftTraffic(experts=32, layers=2, duration_s=1200, tau_s=300, mix_tau_s=600,
                                          seed=3).popularity())
    no_drift = DriftTraffic(experts=32, layers=2, duration_s=300, sigma=0.0, mix_sigma=0.0, seed=3).popularity()
    assert np.allclose(no_drift[0], no_drift[-1])


def test_drift_trace_counts_follow_its_popularity():
    d = DriftTraffic(experts=16, layers=1, top_k=2, duration_s=60, tokens_per_call=4096, seed=1)
    trace = d.trace(rate=50000)
    expected = topk_inclusion(d.popularity(), 2)[:, 0].mean(axis=0) * 4096
    assert trace.counts.mean(axis=0) == pytest.approx(expected, rel=0.05)
    assert isinstance(parse_traffic("drift:experts=16,tau=30"), DriftTraffic)
    with pytest.raises(TraceError, match="drift: workloads must be >= 1"):
        DriftTraffic(workloads=0)


def test_diurnal_keeps_calls_by_the_daily_curve():
    trace = steady_trace([10] * 8, 1000, 100)
    daily = Diurnal(ratio=5.0).apply(trace)
    per_s = np.bincount(daily.t.astype(int), minlength=100)
    assert per_s[:5].mean() == pytest.approx(200, rel=0.15)  # the trough: a fifth
    assert per_s[48:53].mean() == pytest.approx(1000, rel=0.1)  # the peak, half way through
    assert np.array_equal(daily.counts[0], trace.counts[0])  # a call keeps its own counts
