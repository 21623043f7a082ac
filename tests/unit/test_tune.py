"""The tuner's search and the file it writes (timing is a GPU's job: here a fixed preference stands in for it).

``do_bench`` is replaced by a function that runs the candidate once (so a
candidate that fails still fails) and returns a time that prefers one tile
shape; the search must pick it per bucket, check it against the reference and
write a table the loader reads back.
"""

import json

import pytest
import torch

from moefleet.kernels import launch_config, tune


def fake_bench(fn, warmup, rep, return_mode):
    fn()
    cfg = fake_bench.current
    return 1.0 + abs(cfg["BLOCK_N"] - 32) + 0.1 * cfg.get("SPLIT_K", 1)


@pytest.fixture
def tiny_search(monkeypatch):
    small = [
        {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 16, "GROUP_M": 1, "num_warps": 1, "num_stages": 1} for bn in (16, 32, 64)
    ]

    def cands(kernel, rows, num_experts, elem_bytes, smem_bytes):
        return [dict(c) for c in small] if kernel == "gate_up" else [{**c, "SPLIT_K": s} for c in small for s in (1, 2)]

    def bench(make_fn, cands_, *args, **kwargs):
        timed = []
        for cfg in cands_:
            fake_bench.current = cfg
            timed.append((fake_bench(make_fn(cfg), 0, 0, "median"), cfg))
        return sorted(timed, key=lambda t: t[0])

    monkeypatch.setattr(tune, "candidates", cands)
    monkeypatch.setattr(tune, "time_candidates", bench)
    yield
    launch_config.clear_caches()


def test_tuner_writes_a_table_per_token_count_that_the_loader_reads_back(tiny_search, tmp_path):
    (tmp_path / "default.json").write_text((launch_config.CONFIG_DIR / "default.json").read_text())
    args = tune.parse_args(
        ["--experts", "4", "--hidden", "24", "--inter", "20", "--top-k", "2", "--tokens", "1", "6", "--out-dir", str(tmp_path)]
    )
    table, path = tune.tune(args, log=lambda *a: None, device="cpu", device_name="Test GPU")
    assert path.name == "E=4,N=20,device_name=Test_GPU,dtype=bfloat16.json"
    written = json.loads(path.read_text())
    assert sorted(k for k in written if not k.startswith("_")) == ["12", "2"]  # N = T * K
    for key in ("2", "12"):
        assert written[key]["gate_up"]["BLOCK_N"] == 32
        assert written[key]["down"]["BLOCK_N"] == 32 and written[key]["down"]["SPLIT_K"] == 1
        assert written["_meta"]["winners"][key]["relative_error"] < 2e-2
    assert written["_meta"]["device_name"] == "Test GPU" and written["_meta"]["shape"] == {"E": 4, "H": 24, "F": 20, "K": 2}
    launch_config.clear_caches()
    assert launch_config.moe_config(4, 20, 3, "Test GPU", torch.bfloat16, tmp_path)["gate_up"]["BLOCK_N"] == 32


def test_candidates_fit_registers_and_shared_memory_and_split_only_at_decode_sizes():
    for rows, experts in ((2, 8), (512, 8), (8192, 8), (64, 256), (32768, 256)):
        for kernel in ("gate_up", "down"):
            cands = tune.candidates(kernel, rows, experts, 2, 100 * 1024)
            assert cands, (rows, experts, kernel)
            accs = 2 if kernel == "gate_up" else 1
            for c in cands:
                launch_config.check_kernel_config(c, launch_config.MOE_KERNEL_KEYS[kernel], "candidate")
                assert c["BLOCK_M"] * c["BLOCK_N"] * accs <= 128 * 32 * c["num_warps"]
                assert c["num_stages"] * (c["BLOCK_M"] + accs * c["BLOCK_N"]) * c["BLOCK_K"] * 2 <= 100 * 1024
            decode = tune.regime(rows, experts) == "decode"
            assert all(c["BLOCK_M"] == 16 for c in cands) == decode
            if kernel == "down":
                assert any(c["SPLIT_K"] > 1 for c in cands) == decode


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--top-k", "9"], "--top-k must be <= --experts"), (["--tokens", "0"], "--tokens must all be >= 1")],
)
def test_tuner_rejects_bad_arguments_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        tune.parse_args(["--experts", "8", "--hidden", "64", "--inter", "64", "--top-k", "2", *argv])
    assert message in capsys.readouterr().err


def test_merge_keeps_the_earlier_files_buckets_that_were_not_tuned_again(tiny_search, tmp_path):
    (tmp_path / "default.json").write_text((launch_config.CONFIG_DIR / "default.json").read_text())
    base = ["--experts", "4", "--hidden", "24", "--inter", "20", "--top-k", "2", "--out-dir", str(tmp_path)]
    tune.tune(tune.parse_args([*base, "--tokens", "1", "6"]), log=lambda *a: None, device="cpu", device_name="Test GPU")
    _, path = tune.tune(
        tune.parse_args([*base, "--tokens", "6", "9", "--merge"]), log=lambda *a: None, device="cpu", device_name="Test GPU"
    )
    written = json.loads(path.read_text())
    assert [k for k in written if not k.startswith("_")] == ["2", "12", "18"]
    assert "merged_with" in written["_meta"] and set(written["_meta"]["winners"]) == {"2", "12", "18"}
