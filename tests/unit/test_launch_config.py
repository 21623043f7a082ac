"""Launch parameters as data: the row-bucket tables, their files, the cached loader, its checks."""

import json

import pytest
import torch

from moefleet.kernels import launch_config
from moefleet.kernels.launch_config import (
    CONFIG_DIR,
    get_launch_config,
    moe_config,
    moe_config_file_name,
    moe_config_table,
)

GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}


def entry(block_m: int, split_k: int = 1) -> dict:
    return {"gate_up": {**GEMM, "BLOCK_M": block_m}, "down": {**GEMM, "BLOCK_M": block_m, "SPLIT_K": split_k}}


@pytest.fixture
def config_dir(tmp_path):
    """A config folder holding a copy of the real default.json; caches cleared around the test."""
    (tmp_path / "default.json").write_text((CONFIG_DIR / "default.json").read_text())
    launch_config.clear_caches()
    yield tmp_path
    launch_config.clear_caches()


def test_file_name_follows_vllm_naming():
    name = moe_config_file_name(8, 14336, "NVIDIA H100 80GB HBM3", torch.bfloat16)
    assert name == "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3,dtype=bfloat16.json"


def test_default_table_gives_decode_tiles_to_small_batches_and_large_tiles_to_large_ones():
    small = moe_config(8, 14336, 2, None, torch.bfloat16)
    large = moe_config(8, 14336, 8192, None, torch.bfloat16)
    assert small["gate_up"]["BLOCK_M"] == 16 and small["down"]["BLOCK_M"] == 16
    assert large["gate_up"]["BLOCK_M"] >= 64 and large["gate_up"]["BLOCK_N"] >= 64


def test_nearest_bucket_is_taken_and_ties_go_to_the_smaller_key(config_dir):
    table = {"16": entry(16), "64": entry(32), "1024": entry(64)}
    (config_dir / moe_config_file_name(4, 96, "Tiny GPU", "float16")).write_text(json.dumps(table))
    pick = lambda rows: moe_config(4, 96, rows, "Tiny GPU", torch.float16, config_dir)["gate_up"]["BLOCK_M"]  # noqa: E731
    assert [pick(r) for r in (1, 16, 39, 40, 41, 500, 600, 100000)] == [16, 16, 16, 16, 32, 32, 64, 64]


def test_tuned_file_is_used_only_for_its_e_f_device_and_dtype(config_dir):
    (config_dir / moe_config_file_name(4, 96, "Tiny GPU", "float16")).write_text(json.dumps({"8": entry(128, 4)}))
    tuned = moe_config(4, 96, 3, "Tiny GPU", torch.float16, config_dir)
    assert tuned["gate_up"]["BLOCK_M"] == 128 and tuned["down"]["SPLIT_K"] == 4
    default = moe_config(4, 96, 3, None, torch.float16, config_dir)
    for other in ((5, 96, "Tiny GPU", torch.float16), (4, 97, "Tiny GPU", torch.float16),
                  (4, 96, "Other GPU", torch.float16), (4, 96, "Tiny GPU", torch.bfloat16)):  # fmt: skip
        e, f, dev, dt = other
        assert moe_config(e, f, 3, dev, dt, config_dir) == default
    _, source = moe_config_table(4, 96, "Tiny GPU", torch.float16, config_dir)
    assert source.endswith(moe_config_file_name(4, 96, "Tiny GPU", "float16"))


def test_loader_returns_fresh_dicts_and_reads_each_file_once(config_dir):
    path = config_dir / moe_config_file_name(2, 32, "Tiny GPU", "float32")
    path.write_text(json.dumps({"1": entry(16)}))
    first = moe_config(2, 32, 1, "Tiny GPU", torch.float32, config_dir)
    first["gate_up"]["BLOCK_M"] = 999
    path.write_text(json.dumps({"1": entry(64)}))  # cached: not read again until the caches are cleared
    assert moe_config(2, 32, 1, "Tiny GPU", torch.float32, config_dir)["gate_up"]["BLOCK_M"] == 16
    launch_config.clear_caches()
    assert moe_config(2, 32, 1, "Tiny GPU", torch.float32, config_dir)["gate_up"]["BLOCK_M"] == 64


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"8": {"gate_up": GEMM}}, r"must hold exactly \['gate_up', 'down'\]"),
        ({"8": {"gate_up": {**GEMM, "BLOCK_K": 8}, "down": {**GEMM, "SPLIT_K": 1}}}, r"BLOCK_K must be >= 16"),
        ({"8": {"gate_up": {**GEMM, "BLOCK_N": 48}, "down": {**GEMM, "SPLIT_K": 1}}}, r"BLOCK_N must be a power of 2"),
        ({"8": {"gate_up": GEMM, "down": GEMM}}, r"lacks \['SPLIT_K'\]"),
        ({"8": {"gate_up": {**GEMM, "BLOCK": 2}, "down": {**GEMM, "SPLIT_K": 1}}}, r"unknown keys \['BLOCK'\]"),
        ({"eight": entry(16)}, r"bucket key 'eight' is not a row count"),
        ({"_meta": {}}, r"no row buckets"),
    ],
)
def test_malformed_tuned_file_is_a_value_error_naming_the_file(config_dir, table, message):
    name = moe_config_file_name(3, 48, "Tiny GPU", "float32")
    (config_dir / name).write_text(json.dumps(table))
    with pytest.raises(ValueError, match=message) as err:
        moe_config(3, 48, 8, "Tiny GPU", torch.float32, config_dir)
    assert name in str(err.value)


def test_single_op_configs_come_from_default_json():
    default = json.loads((CONFIG_DIR / "default.json").read_text())
    assert get_launch_config("fused_topk") == default["fused_topk"]
    assert get_launch_config("combine") == default["combine"]
    with pytest.raises(ValueError, match="unknown op"):
        get_launch_config("grouped_attention")


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.json")), ids=lambda p: p.name)
def test_every_committed_config_file_is_well_formed(path):
    data = json.loads(path.read_text())
    if path.name == "default.json":
        launch_config._check_table(data["moe"], path.name)
        for op in ("fused_topk", "combine"):
            launch_config.check_kernel_config(data[op], launch_config._SINGLE_KEYS[op], f"{path.name} [{op}]")
    else:
        assert path.name.startswith("E=") and ",device_name=" in path.name, path.name
        launch_config._check_table(data, path.name)



@pytest.mark.parametrize("path", ["stepwise", "fused"])
def test_a_slot_stack_takes_the_launch_configs_of_its_layers_expert_count(monkeypatch, path):
    """A worker holding 4 slots of a 256-expert layer looks up E=256 (the committed H100 table's key), not E=4."""
    from moefleet.kernels import experts, fused_moe, triton_moe
    from tests.kernel_helpers import DEVICE, ffn_weights, offsets_for, on_device

    seen = []

    def recording(num_experts, inter, rows, device_name, dtype, config_dir=None):
        seen.append(num_experts)
        return moe_config(num_experts, inter, rows, device_name, dtype, config_dir)

    monkeypatch.setattr(triton_moe, "moe_config", recording)
    monkeypatch.setattr(fused_moe, "moe_config", recording)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w13, w2, _, _ = ffn_weights(4, 32, 16, True, with_bias=False)
    stack = experts.ExpertStack(w13=w13, w2=w2, gated=True, activation="silu", config_experts=256)
    x = on_device(torch.randn(6, 32))
    if path == "stepwise":
        experts.grouped_ffn(x, offsets_for([2, 0, 3, 1]), stack, "triton")
    else:
        ids = on_device(torch.tensor([[0, 2], [1, 3], [2, -1], [0, 1], [3, 2], [1, 0]]))
        experts.moe_experts(x, ids, on_device(torch.full((6, 2), 0.5)), stack, "triton")
    assert seen and set(seen) == {256}, seen
    assert stack.num_experts == 4 and DEVICE is not None


def test_worker_slot_stacks_carry_their_layers_expert_count(tmp_path):
    from moefleet.core.default_model import default_model_dir
    from moefleet.expert_workers.group import ExpertGroupCore

    core = ExpertGroupCore("w", str(default_model_dir()), device="cpu")
    layer = core.ckpt.spec.moe_layers[0]
    core.load([(layer, 0), (layer, 5)])
    view = core._views[layer]
    assert view.stack.config_experts == core.ckpt.spec.layer_spec(layer).num_experts
    assert view.stack.num_experts < view.stack.config_experts
