"""The fleet snapshot, from plain store contents: balancedness, entropy and collapse, rates, Prometheus families."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moefleet.controller.telemetry import (
    REBALANCE_BUCKETS_S,
    FleetInputs,
    TelemetryConfig,
    balancedness,
    build_snapshot,
    histogram_quantile,
    metric_families,
    normalised_entropy,
    rates,
    rebalance_increments,
)
from moefleet.core.placement import Placement
from moefleet.core.recent import RecentCounts
from moefleet.core.request_stats import LATENCY_BUCKETS_S, observe_request

LAYERS, E = [1, 2], 4


def _worker(device: str, recent: dict[int, int], served: dict[str, int], memory: int = 1000) -> dict:
    return {"kind": "worker", "worker_id": device, "queue_depth": 0, "tokens_total": sum(served.values()), "memory_bytes": memory,
            "reserved_bytes": 2 * memory, "experts": [], "device": "cpu", "backend": "torch", "cpus": [0],
            "accelerator": {"name": "cpu", "memory_bytes": None},
            "recent_tokens": {"window_s": 5.0, "layers": {str(k): v for k, v in recent.items()}}}


def _router(codes: dict[str, int], latency: dict[str, dict], tokens: int) -> dict:
    return {"kind": "router", "address": "127.0.0.1:1", "placement_version": 3,
            "model": {"family": "mixtral", "moe_layers": LAYERS, "num_experts": E, "top_k": 2},
            "stats": {"requests": sum(codes.values()), "tokens_computed": tokens, "codes": codes, "layer_latency": latency}}


def _inputs(**over) -> FleetInputs:
    placement = Placement(version=3, assignments={"w0": [(1, 0), (1, 1), (2, 0), (2, 1)], "w1": [(1, 2), (1, 3), (2, 2), (2, 3), (1, 0)]})
    windows = [(0.0, {(1, 0): 90, (1, 1): 10}), (1.0, {(1, 0): 60, (2, 3): 40}), (2.0, {(1, 0): 1000})]  # last one filling
    base = dict(
        now=2.5, placement=placement, windows=windows, totals={(1, 0): 5000, (2, 3): 7},
        heartbeats={"worker:w0": _worker("w0", {1: 300, 2: 100}, {"1:0": 300, "2:0": 100}),
                    "worker:w1": _worker("w1", {1: 100, 2: 100}, {"1:2": 200}),
                    "router:r0": _router({"OK": 10, "UNAVAILABLE": 2}, {}, 640)},
        events=[], counters={}, leader="ctl-a",
    )
    base.update(over)
    return FleetInputs(**base)


def test_snapshot_sums_only_complete_windows_and_counts_replicas():
    snap = build_snapshot(_inputs(), TelemetryConfig())
    assert snap["layers"] == LAYERS and snap["num_experts"] == E
    assert snap["recent_s"] == 2.0  # two complete windows of 1 s
    assert snap["load"] == [[150, 10, 0, 0], [0, 0, 0, 40]]  # the filling window's 1000 is not counted
    assert snap["replicas"] == [[2, 1, 1, 1], [1, 1, 1, 1]]
    assert snap["expert_tokens_total"][0][0] == 5000 and snap["expert_tokens_total"][1][3] == 7
    hot = snap["layer_stats"][0]["hot"]
    assert [(h["expert"], h["replicas"]) for h in hot] == [(0, 2), (1, 1)]
    assert hot[0]["share"] == pytest.approx(150 / 160)
    assert snap["hottest"][0] == {"layer": 1, "expert": 0, "tokens": 150, "share": pytest.approx(150 / 160), "replicas": 2}


def test_balancedness_is_mean_over_max_of_what_devices_measured():
    snap = build_snapshot(_inputs(), TelemetryConfig())
    by_layer = {s["layer"]: s["balancedness"] for s in snap["layer_stats"]}
    assert by_layer[1] == pytest.approx((300 + 100) / 2 / 300)  # device loads 300 and 100
    assert by_layer[2] == pytest.approx(1.0)
    assert snap["balancedness"] == pytest.approx((by_layer[1] + by_layer[2]) / 2)
    assert balancedness([0.0, 0.0]) is None and balancedness([5.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)


def test_entropy_is_one_for_uniform_routing_and_log_k_over_log_e_when_every_token_picks_the_same_k():
    assert normalised_entropy([10, 10, 10, 10]) == pytest.approx(1.0)
    assert normalised_entropy([50, 50, 0, 0, 0, 0, 0, 0]) == pytest.approx(math.log(2) / math.log(8))
    assert normalised_entropy([0, 0]) is None and normalised_entropy([7]) is None


def test_collapse_warning_fires_on_routing_to_one_expert_and_not_on_uniform_routing():
    cfg = TelemetryConfig(collapse_min_tokens=100)
    one = _inputs(windows=[(0.0, {(1, 2): 500, (2, 0): 125, (2, 1): 125, (2, 2): 125, (2, 3): 125}), (1.0, {})])
    snap = build_snapshot(one, cfg)
    stats = {s["layer"]: s for s in snap["layer_stats"]}
    assert stats[1]["collapsed"] and stats[1]["entropy"] == pytest.approx(0.0)
    assert not stats[2]["collapsed"] and stats[2]["entropy"] == pytest.approx(1.0)
    assert len(snap["warnings"]) == 1 and "layer 1: routing collapsed onto experts [2]" in snap["warnings"][0]
    few = _inputs(windows=[(0.0, {(1, 2): 50}), (1.0, {})])  # below collapse_min_tokens: not judged
    assert not build_snapshot(few, cfg)["warnings"]


def test_a_placed_device_without_heartbeat_is_reported_down():
    inputs = _inputs()
    del inputs.heartbeats["worker:w1"]
    snap = build_snapshot(inputs, TelemetryConfig())
    w1 = next(d for d in snap["devices"] if d["id"] == "w1")
    assert not w1["live"] and w1["in_placement"] and w1["experts"] == 5
    assert any("device w1: no heartbeat" in w for w in snap["warnings"])


def test_snapshot_without_model_facts_infers_layers_and_experts_from_the_placement():
    inputs = _inputs(heartbeats={})
    snap = build_snapshot(inputs, TelemetryConfig())
    assert snap["layers"] == [1, 2] and snap["num_experts"] == 4 and snap["model"] is None
    empty = build_snapshot(FleetInputs(now=1.0), TelemetryConfig())
    assert empty["layers"] == [] and empty["balancedness"] is None and empty["warnings"] == []


def test_histogram_quantile_interpolates_within_buckets():
    bounds = [0.01, 0.1, 1.0]
    assert histogram_quantile(0.5, bounds, [0, 10, 0, 0]) == pytest.approx(0.055)
    assert histogram_quantile(0.99, bounds, [0, 0, 0, 4]) == 1.0  # +Inf bucket answers the largest bound
    assert histogram_quantile(0.5, bounds, [0, 0, 0, 0]) is None


def test_rates_between_two_snapshots_count_router_deltas_and_read_a_drop_as_a_reset():
    codes, lat = {}, {}
    for s in (0.004, 0.004, 0.2):
        observe_request(codes, lat, "OK", 1, s)
    observe_request(codes, lat, "INVALID_ARGUMENT", None, 0.001)
    assert codes == {"OK": 3, "INVALID_ARGUMENT": 1} and sum(lat["1"]["counts"]) == 3
    assert len(lat["1"]["counts"]) == len(LATENCY_BUCKETS_S) + 1
    before = build_snapshot(_inputs(heartbeats={"router:r0": _router({}, {}, 0)}), TelemetryConfig())
    after = build_snapshot(_inputs(now=4.5, heartbeats={"router:r0": _router(codes, lat, 600)}), TelemetryConfig())
    r = rates(before, after)
    assert r["tokens_per_s"] == pytest.approx(300) and r["requests_per_s"] == pytest.approx(2) and r["errors_per_s"] == 0.5
    assert 0.002 <= r["p50_s"] <= 0.005 and 0.15 <= r["p99_s"] <= 0.2
    restarted = build_snapshot(_inputs(now=6.5, heartbeats={"router:r0": _router({"OK": 1}, {}, 10)}), TelemetryConfig())
    assert rates(after, restarted)["tokens_per_s"] == pytest.approx(5)


def test_rebalance_increments_fill_cumulative_histogram_buckets():
    inc = rebalance_increments(0.3, loads=6, bytes_moved=600)
    assert inc["count"] == 1 and inc["seconds"] == 0.3 and inc["bytes"] == 600 and inc["loads"] == 6
    assert [b for b in REBALANCE_BUCKETS_S if f"le:{b!r}" in inc] == [b for b in REBALANCE_BUCKETS_S if b >= 0.3]
    assert rebalance_increments(None, loads=2, bytes_moved=200) == {"loads": 2, "bytes": 200}


def _exposition(snap: dict, cfg: TelemetryConfig) -> dict:
    class C:
        def collect(self):
            return metric_families(snap, cfg)

    reg = CollectorRegistry(auto_describe=False)
    reg.register(C())
    text = generate_latest(reg).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}, text


def test_prometheus_exposition_has_every_metric_the_readme_names():
    counters = {"count": 2, "seconds": 0.9, "bytes": 4096, "loads": 4, **{f"le:{b!r}": 2 for b in REBALANCE_BUCKETS_S[2:]}}
    codes, lat = {}, {}
    observe_request(codes, lat, "OK", 2, 0.02)
    prediction = {"at": 2.0, "version": 3, "measured": 0.91, "predicted": 0.97, "error": -0.06, "miss": False}
    inputs = _inputs(counters=counters, controller={"prediction": prediction})
    inputs.heartbeats["router:r0"] = _router(codes, lat, 64)
    families, text = _exposition(build_snapshot(inputs, TelemetryConfig()), TelemetryConfig())
    for name in ("moefleet_expert_tokens", "moefleet_expert_replicas", "moefleet_layer_balancedness", "moefleet_device_tokens",
                 "moefleet_device_memory_bytes", "moefleet_rebalances", "moefleet_rebalance_seconds", "moefleet_weight_bytes_moved",
                 "moefleet_requests", "moefleet_layer_latency_seconds", "moefleet_routing_entropy", "moefleet_prediction_error"):
        assert name in families, name
    assert "moefleet_prediction_error -0.06" in text
    assert "moefleet_prediction_error" not in _exposition(build_snapshot(_inputs(), TelemetryConfig()), TelemetryConfig())[1]
    assert 'moefleet_expert_tokens_total{expert="0",layer="1"} 5000.0' in text
    assert 'moefleet_expert_replicas{expert="0",layer="1"} 2.0' in text
    assert "moefleet_rebalances_total 2.0" in text and "moefleet_weight_bytes_moved_total 4096.0" in text
    assert 'moefleet_rebalance_seconds_bucket{le="+Inf"} 2.0' in text and "moefleet_rebalance_seconds_sum 0.9" in text
    assert 'moefleet_requests_total{code="OK"} 1.0' in text
    assert 'moefleet_layer_latency_seconds_count{layer="2"} 1.0' in text
    assert 'moefleet_device_tokens_total{device="w0"} 400.0' in text


def test_per_expert_series_can_be_switched_off_and_per_layer_ones_stay():
    cfg = TelemetryConfig(expert_metrics=False)
    families, _ = _exposition(build_snapshot(_inputs(), cfg), cfg)
    assert "moefleet_expert_tokens" not in families and "moefleet_expert_replicas" not in families
    assert "moefleet_layer_balancedness" in families and "moefleet_routing_entropy" in families


def test_recent_counts_cover_exactly_the_complete_buckets_of_the_window():
    r = RecentCounts(window_s=5.0, bucket_s=1.0)
    r.add(1, 10, now=10.2)
    r.add(1, 5, now=14.9)
    r.add(2, 7, now=15.1)  # bucket 15 is still filling at now=15.5
    assert r.totals(now=15.5) == {1: 15}
    assert r.totals(now=16.0) == {1: 5, 2: 7}
    assert r.totals(now=30.0) == {}
    with pytest.raises(ValueError, match="window_s"):
        RecentCounts(window_s=0.5, bucket_s=1.0)


def test_routers_transport_bytes_and_call_overhead_reach_the_snapshot_the_metrics_and_status():
    from moefleet.core.stages import StageHistograms
    from moefleet.views import router_table

    st = StageHistograms()
    for s in (0.001, 0.002, 0.003):
        st.observe("call_overhead", s)
    emb = {**_router({"OK": 3}, {}, 30), "kind": "embedded",
           "transport": {"kind": "compiled_graph", "graph": {"id": "g"},
                         "bytes": {"to_workers:shared_memory": 4096, "from_workers:shared_memory": 2048, "to_workers:rows": 512}},
           "call_overhead": st.totals()["call_overhead"], "call_overhead_buckets": st.cumulative("call_overhead")}
    inputs = _inputs()
    inputs.heartbeats["router:e1"] = emb
    snap = build_snapshot(inputs, TelemetryConfig())
    assert snap["transport"]["bytes"] == {"to_workers": {"shared_memory": 4096, "rows": 512}, "from_workers": {"shared_memory": 2048}}
    assert snap["transport"]["calls"] == 3 and snap["transport"]["call_overhead_mean_s"] == pytest.approx(0.002)
    row = next(r for r in snap["routers"] if r["id"] == "e1")
    assert row["kind"] == "embedded" and row["graph"] and row["transport"] == "compiled_graph"
    families, text = _exposition(snap, TelemetryConfig())
    assert 'moefleet_transport_bytes_total{direction="to_workers",router="e1",transport="rows"} 512.0' in text
    assert 'moefleet_call_overhead_seconds_count{router="e1"} 3.0' in text
    assert "moefleet_call_overhead_seconds_sum" in text
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(router_table(snap))
    shown = console.export_text()
    assert "e1" in shown and "embedded" in shown and "compiled_graph (graph)" in shown and "4.5 KiB" in shown and "2.0 ms" in shown
