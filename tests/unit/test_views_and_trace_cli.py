"""`moe-fleet status` and the demo in 100 columns for a 58-layer x 256-expert model; `moe-fleet trace` without a fleet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rich.console import Console

from moefleet.cli import main
from moefleet.controller.telemetry import FleetInputs, TelemetryConfig, build_snapshot
from moefleet.core.placement import Placement
from moefleet.core.trace import TraceLine, read_trace, write_trace
from moefleet.views import demo_view, status_view

L, E, D = 58, 256, 8


def _big_snapshot() -> dict:
    rng = np.random.default_rng(0)
    layers = list(range(3, 3 + L))
    assignments = {f"node-{d // 4}/gpu{d % 4}": [] for d in range(D)}
    devices = list(assignments)
    for i, layer in enumerate(layers):
        for e in range(E):
            assignments[devices[(e + i) % D]].append((layer, e))
    load = {(layer, e): int(n) for layer in layers for e, n in enumerate(rng.zipf(1.3, E).clip(max=10_000))}
    heartbeats = {
        f"worker:{d}": {"kind": "worker", "memory_bytes": 40 << 30, "reserved_bytes": 60 << 30, "queue_depth": 2,
                        "tokens_total": 10, "cpus": [], "backend": "triton", "device": "cuda",
                        "accelerator": {"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 << 30},
                        "recent_tokens": {"window_s": 5.0, "layers": {str(layer): int(rng.integers(1, 1000)) for layer in layers}}}
        for d in devices
    }
    heartbeats["router:r0"] = {"kind": "router", "model": {"family": "deepseek_v3", "moe_layers": layers, "num_experts": E,
                                                          "top_k": 8}, "stats": {"codes": {"OK": 5}, "tokens_computed": 50}}
    inputs = FleetInputs(now=100.0, placement=Placement(version=7, assignments=assignments), windows=[(95.0, load), (96.0, {})],
                         totals=load, heartbeats=heartbeats)
    return build_snapshot(inputs, TelemetryConfig())


def _render(renderable) -> list[str]:
    console = Console(width=100, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text().splitlines()


def test_status_of_a_big_model_fits_100_columns_and_summarises_instead_of_listing():
    snap = _big_snapshot()
    lines = _render(status_view(snap))
    assert max(len(x) for x in lines) <= 100
    assert any("the 16 least balanced of 58" in x for x in lines)
    assert len(lines) < 80, "summarised: per-layer rows for the least balanced, the hottest experts, one row per device"
    assert sum("node-" in x for x in lines) == D
    assert any("deepseek_v3, 58 MoE layers × 256 experts, top-8" in x for x in lines)
    all_rows = _render(status_view(snap, all_layers=True))
    assert len(all_rows) > len(lines) + 40  # --all-layers lists every layer


def test_status_says_how_many_replicas_every_expert_keeps_and_why():
    from moefleet.controller.planner import PlannerKnobs, min_replicas
    from moefleet.core.placement import DeviceSpec, Inventory

    devices = Inventory(devices=[DeviceSpec(device_id=f"g{i}", node_id="n", kind="gpu", memory_bytes=80 << 30) for i in range(8)])
    # DeepSeek-V3's routed experts (58 x 256, 44 MiB each in fp8) twice take 1276 GiB: eight H100s hold one copy
    floor = min_replicas(devices, PlannerKnobs(min_replicas="auto"), expert_bytes=44 << 20, shape=(L, E))
    assert floor["replicas"] == 1
    snap = _big_snapshot()
    snap["controller"]["last_report"] = {"min_replicas": floor}
    lines = _render(status_view(snap))
    assert max(len(x) for x in lines) <= 100
    text = " ".join(x.strip() for x in lines)
    assert "replicas per expert: at least 1 (min_replicas auto: 2 copies of every expert take 1276 GiB, more than the 576 GiB" in text


def test_demo_view_fits_100_columns():
    snap = _big_snapshot()
    rows = [{"at_s": 12.0, "version": 7, "planned": "0.55 → 0.97", "measured_before": 0.52, "measured_after": 0.91,
             "copies": 6, "bytes": 3 << 20, "seconds": 0.4}]
    view = demo_view(snap, {"tokens_per_s": 12000.0, "p50_s": 0.004, "p99_s": 0.02}, elapsed_s=12.0, duration_s=30.0,
                     driving=[3, 4, 5], shift_s=10.0, history=[0.5, 0.6, None, 0.9], rebalances=rows)
    lines = _render(view)
    assert max(len(x) for x in lines) <= 100
    assert any("0.55 → 0.97" in x and "0.52 → 0.91" in x for x in lines)


def test_demo_header_names_the_hot_set_driven_and_the_one_the_table_shows():
    snap = _big_snapshot()
    for st in snap["layer_stats"]:  # the routers counted experts 7, 8, 9 hottest in every layer
        st["hot"] = [{"expert": e, "tokens": 100 - e, "share": 0.2, "replicas": 1} for e in (7, 8, 9)] + st["hot"][3:]
    view = demo_view(snap, {}, elapsed_s=12.0, duration_s=30.0, driving=[3, 4, 5], shift_s=10.0, history=[0.5],
                     rebalances=[])
    text = " ".join(_render(view))
    assert "shift 2: traffic leans on experts [3, 4, 5] for 2s" in text
    assert "still [7, 8, 9], not yet [3, 4, 5]" in text
    caught_up = demo_view(snap, {}, elapsed_s=12.0, duration_s=30.0, driving=[7, 8, 9], shift_s=10.0, history=[0.5],
                          rebalances=[])
    assert "not yet" not in " ".join(_render(caught_up))


def test_time_weighted_balancedness_holds_each_sample_until_the_next():
    from moefleet.demo import time_weighted

    samples = [(0.0, 0.5), (2.0, 1.0), (10.0, None), (11.0, 0.9), (12.0, None)]
    out = time_weighted(samples)  # 0.5 for 2 s, 1.0 for 8 s, 0.9 for 1 s; the None second left out
    assert out["seconds"] == pytest.approx(11.0)
    assert out["mean"] == pytest.approx((1.0 + 8.0 + 0.9) / 11.0)
    assert out["p10"] == 0.5  # the lowest 10% of the time (1.1 s of 11) is at 0.5
    assert time_weighted([(0.0, 0.5), (1.0, 1.0), (11.0, None)])["p10"] == 1.0  # 0.5 held for under 10% of the time
    assert time_weighted([(0.0, None), (1.0, None)])["mean"] is None


def _write(tmp_path, windows: int = 8) -> str:
    """Expert 0 of each layer turns hot at window 2 and stays hot."""
    lines = []
    for k in range(windows):
        for layer in (1, 2, 3):
            counts = [10] * 16
            counts[0] += 2000 if k >= 2 else 0
            lines.append(TraceLine(float(k), layer, tuple(counts)))
    return str(write_trace(tmp_path / "t.jsonl", lines))


def test_trace_replay_prints_each_windows_decision_as_json(tmp_path, capsys):
    path = _write(tmp_path)
    # one copy floor: with every expert on both devices (min_replicas auto, memory for two copies) nothing would move
    assert main(["trace", "replay", path, "--devices", "2", "--min-replicas", "1", "--json"]) == 0  # sizes: built-in model
    out = json.loads(capsys.readouterr().out)
    assert [w["t"] for w in out["windows"]] == [float(k) for k in range(8)]
    assert [w["tokens"] for w in out["windows"]] == [3 * 160 + (3 * 2000 if k >= 2 else 0) for k in range(8)]
    applied = [w for w in out["windows"] if w["decision"] == "applied"]
    assert len(applied) == 1 and all(w["bytes"] == w["copies"] * out["expert_bytes"] for w in applied)
    # the plan is held while it confirms (three steps in a row by default), then applied once
    decisions = [w["decision"] for w in out["windows"]]
    assert decisions[decisions.index("applied") - 2:decisions.index("applied")] == ["held: confirming"] * 2
    assert all(w["balancedness_after"] >= w["balancedness_before"] for w in applied)
    assert main(["trace", "replay", path, "--devices", "2", "--min-replicas", "1"]) == 0
    table = capsys.readouterr().out
    assert "applied" in table and "8 windows" in table


def test_trace_import_reads_an_sglang_expert_distribution_dump(tmp_path, capsys):
    counts = torch.zeros(4, 3, 16)  # [steps, layers, experts], SGLang's logical_count in stat mode
    counts[:, :, 0] = 100
    torch.save({"logical_count": counts}, tmp_path / "expert_distribution_recorder_1.pt")
    out = tmp_path / "imported.jsonl"
    assert main(["trace", "import", str(tmp_path / "expert_distribution_recorder_1.pt"), "--out", str(out),
                 "--layers", "1,2,3", "--period", "0.5"]) == 0
    trace = read_trace(out)
    assert trace.layers == [1, 2, 3] and trace.num_experts == 16 and len(trace) == 12
    assert trace.load()[:, 0].tolist() == [400, 400, 400]
    capsys.readouterr()
    assert main(["trace", "replay", str(tmp_path / "expert_distribution_recorder_1.pt"), "--json"]) == 0  # dumps replay directly
    assert len(json.loads(capsys.readouterr().out)["windows"]) == 4


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["trace", "replay", "/no/such/trace.jsonl"], "no trace file /no/such/trace.jsonl: record one with"),
        (["status"], "no local fleet is running: start one with 'moe-fleet up'"),
        (["trace", "record", "--out", "x.jsonl", "--duration", "5"], "no local fleet is running: start one with 'moe-fleet up'"),
        (["trace", "record", "--out", "x.jsonl", "--duration", "0"], "--duration must be > 0"),
    ],
)
def test_cli_errors_say_what_is_wrong_and_what_to_do(argv, says, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOEFLEET_CACHE", str(tmp_path))  # no local fleet here
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert says in str(e.value)


def test_a_malformed_trace_is_named_by_line_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 0, "layer": 1, "counts": [1, 2]}\n{"t": 1, "layer": 1, "counts": [1, -2]}\n')
    assert main(["trace", "replay", str(bad), "--expert-bytes", "1000"]) == 2
    assert "bad trace: line 2: counts[1] must be an int >= 0" in capsys.readouterr().err
    eight = write_trace(tmp_path / "e8.jsonl", [TraceLine(0.0, 1, (5,) * 8)])  # the built-in model has 16 experts
    with pytest.raises(SystemExit, match="the trace has 8 experts per layer, the model .* 16: pass the trace's --checkpoint"):
        main(["trace", "replay", str(eight)])


def test_replay_decides_as_the_controller_from_the_decayed_load_of_the_last_windows():
    from moefleet.controller.main import ControllerConfig
    from moefleet.controller.traces import replay
    from moefleet.core.placement import DeviceSpec, Inventory
    from moefleet.core.trace import Trace

    lines = [TraceLine(float(k), 1, (400, 0, 0, 0) if k >= 2 else (5, 5, 5, 5)) for k in range(6)]
    inventory = Inventory(devices=[DeviceSpec(device_id=f"d{i}", node_id="n", kind="gpu", memory_bytes=1 << 30) for i in range(2)])
    cfg = ControllerConfig(ray_address=None, load_windows=3, load_half_life_s=1.0, min_tokens=50, planner={"min_replicas": 1})
    steps = replay(Trace.from_lines(lines), inventory, expert_bytes=1 << 20, config=cfg)
    assert [s.tokens for s in steps] == [20, 20, 400, 400, 400, 400]
    # each step reads at its window's end: a window weighs 0.5 ** (age of its middle / half-life)
    assert steps[1].estimate_tokens == pytest.approx(20 * 0.5**0.5 + 20 * 0.5**1.5)
    assert steps[4].estimate_tokens == pytest.approx(400 * (0.5**0.5 + 0.5**1.5 + 0.5**2.5))  # the last 3 windows
    assert steps[0].decision == "skipped: too little load to plan from" and steps[0].version == 1
    assert [s.decision for s in steps[2:4]] == ["held: confirming"] * 2  # it must win three steps in a row
    assert steps[4].decision == "applied" and steps[4].copies >= 1 and steps[4].bytes == steps[4].copies << 20
    assert steps[4].balancedness_after > steps[4].balancedness_before and steps[4].version == 2
