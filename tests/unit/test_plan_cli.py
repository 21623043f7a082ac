"""``moe-fleet plan``: the simulator's elastic vs static comparison from the command line (no Ray)."""

import json

import numpy as np
import pytest

from moefleet.cli import main
from moefleet.core.trace import Trace, write_trace

SMALL = "zipf:s=1.2,experts=16,layers=2,top_k=2,duration=10,shift=5,tokens=2048"
MODEL = ["--model", "mixtral-8x7b", "--moe-layers", "2"]  # the simulated layers get all the memory


def _json(capsys, argv):
    rc = main(["plan", *argv, "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


FIGURES = {"tokens_per_s", "max_over_mean", "p99_ms", "bytes_moved", "p99_latency_ms", "plans_applied",
           "plans_skipped", "device_hours"}


def test_plan_json_compares_elastic_with_eplb_on_history_by_default(capsys):
    rc, out = _json(capsys, ["--trace", SMALL + ",rate=300000", "--fleet", "h100:2,l4:2", *MODEL, "--history-s", "4"])
    assert rc == 0
    assert set(out) == {"baseline", "history_s", "elastic", "static"}
    assert out["baseline"] == "eplb" and out["history_s"] == 4
    for side in ("elastic", "static"):
        assert set(out[side]) == FIGURES
        assert out[side]["tokens_per_s"] > 0 and out[side]["max_over_mean"] >= 1.0
    assert out["static"]["bytes_moved"] == 0 and out["static"]["plans_applied"] == 0
    # static is the whole fleet all the time, over the 6 s after the history window the strategies are measured on
    assert out["static"]["device_hours"] == pytest.approx(4 * 6 / 3600, rel=0.05)


@pytest.mark.parametrize("baseline", ["first", "history", "eplb"])
def test_every_baseline_runs(capsys, baseline):
    rc, out = _json(capsys, ["--trace", SMALL + ",rate=300000", "--fleet", "h100:4", *MODEL, "--baseline", baseline])
    assert rc == 0 and out["baseline"] == baseline and out["static"]["bytes_moved"] == 0


def test_slo_adds_capacity_so_a_fleet_with_spare_capacity_does_not_read_one(capsys):
    argv = ["--trace", SMALL + ",rate=20000,duration=6", *MODEL, "--slo-p99", "300"]
    rc, small = _json(capsys, [*argv, "--fleet", "l4:2"])
    rc2, large = _json(capsys, [*argv, "--fleet", "l4:4"])
    assert rc == rc2 == 0 and small["slo_p99_ms"] == 300
    for out in (small, large):
        for side in ("elastic", "static"):
            assert out[side]["slo_met_fraction"] is not None and 0 <= out[side]["slo_met_fraction"] <= 1
    # the offered volume is served either way, but twice the devices sustain about twice the tokens/s
    assert large["static"]["tokens_per_s"] == pytest.approx(small["static"]["tokens_per_s"], rel=0.02)
    ratio = large["static"]["capacity_tokens_per_s"] / small["static"]["capacity_tokens_per_s"]
    assert 1.6 < ratio < 2.4
    assert small["static"]["capacity_tokens_per_s"] > small["static"]["tokens_per_s"]


def test_drift_and_diurnal_traces_run(capsys):
    drift = "drift:experts=16,layers=2,top_k=2,duration=20,tokens=2048,rate=200000"
    rc, out = _json(capsys, ["--trace", drift, "--fleet", "h100:2", *MODEL])
    assert rc == 0 and out["elastic"]["tokens_per_s"] > 0
    rc, daily = _json(capsys, ["--trace", "diurnal:ratio=5:" + drift, "--fleet", "h100:2", *MODEL])
    assert rc == 0
    # thinned to between 1/5 and all of the calls: about 60% on average over one period
    assert 0.45 < daily["static"]["tokens_per_s"] / out["static"]["tokens_per_s"] < 0.75


def test_plan_reads_a_jsonl_trace_file(tmp_path, capsys):
    t = np.arange(0, 5, 0.01)
    counts = np.tile([400, 50, 50, 50, 50, 50, 50, 50], (len(t), 1))
    path = write_trace(tmp_path / "trace.jsonl", Trace(t=t, layer=np.zeros(len(t), dtype=int), counts=counts))
    rc, out = _json(capsys, ["--trace", str(path), "--fleet", "h100:4", "--top-k", "2", *MODEL])
    assert rc == 0
    # 100 calls/s x 750 rows, top-2, one layer: 37,500 tokens/s offered, easily served by 4 H100s
    assert out["elastic"]["tokens_per_s"] == pytest.approx(37500, rel=0.02)


def test_plan_prints_a_table(capsys):
    assert main(["plan", "--trace", SMALL + ",rate=100000", "--fleet", "h100:2", *MODEL]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "elastic / baseline" in out and "EPLB on first 30 s" in out
    assert "max/mean busy time" in out and "device-hours" in out


def test_target_p99_finds_a_smaller_fleet_that_meets_it(capsys):
    rc, out = _json(capsys, ["--trace", SMALL + ",rate=200000", "--fleet", "h100:4", *MODEL, "--target-p99", "50"])
    assert rc == 0 and out["met"]
    best = int(out["fleet"].split(":")[1])
    assert 1 <= best < 4
    by_fleet = {c["fleet"]: c for c in out["candidates"]}
    assert by_fleet[out["fleet"]]["p99_ms"] <= 50
    assert not by_fleet.get(f"h100:{best - 1}", {"met": False})["met"]
    assert out["elastic"]["p99_ms"] <= 50


def test_target_p99_that_no_fleet_meets_exits_1(capsys):
    rc, out = _json(capsys, ["--trace", SMALL + ",rate=900000", "--fleet", "h100:1", *MODEL, "--target-p99", "0.001"])
    assert rc == 1 and out["met"] is False and out["fleet"] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trace", SMALL, "--fleet", "h100:x"], "fleet: count in 'h100:x' must be an integer"),
        (["--trace", SMALL, "--fleet", "tpu:4"], "fleet: unknown device type 'tpu'"),
        (["--trace", SMALL, "--fleet", "h100:2", "--target-p99", "-3"], "target-p99: must be > 0"),
        (["--trace", SMALL, "--fleet", "h100:2", "--target-p99", "30"], "trace: with --target-p99"),
        (["--trace", "zipf:s=x", "--fleet", "h100:2"], "trace: zipf s must be float"),
        (["--trace", "/nonexistent/t.jsonl", "--fleet", "h100:2"], "trace: cannot read"),
        (["--trace", SMALL, "--fleet", "h100:2", "--model", "gpt"], "model: unknown 'gpt'"),
        (["--trace", SMALL, "--fleet", "h100:2", "--efficiency", "2"], "efficiency: must be in"),
        (["--trace", SMALL + ",experts=4096", "--fleet", "l4:1", *MODEL, "--baseline", "history"],
         "fleet: inventory: not enough"),
        (["--trace", SMALL, "--fleet", "h100:2", "--history-s", "-1"], "history-s: must be > 0"),
        (["--trace", SMALL, "--fleet", "h100:2", "--slo-p99", "0"], "slo-p99: must be > 0"),
        (["--trace", SMALL, "--fleet", "h100:2", "--load-scale", "0"], "load-scale: must be > 0"),
        (["--trace", "drift:tau=x", "--fleet", "h100:2"], "trace: drift tau must be float"),
        (["--trace", "drift:skew=-1", "--fleet", "h100:2"], "drift: skew must be >= 0"),
        (["--trace", "diurnal:ratio=0.5:" + SMALL, "--fleet", "h100:2"], "diurnal: ratio must be >= 1"),
        (["--trace", "diurnal:ratio=5", "--fleet", "h100:2"], "diurnal needs a trace"),
    ],
)
def test_bad_plan_flags_give_a_message_naming_the_field(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    assert message in capsys.readouterr().err
