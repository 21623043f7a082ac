"""Quantized checkpoints as they are published: fp8 with block scales (DeepSeek layout) and MXFP4 (gpt-oss layout).

Each is written from a tiny random ``transformers`` model (weights quantized
in the test, ``tests/quant_models.py``) and served two ways: dequantized at
load (CPU) and packed (the Triton kernels, interpreted on CPU). Dequantized,
a layer equals (fp32, <= 1e-5, same experts) both ``transformers`` loading the
same quantized checkpoint with its own dequantization, and the model whose
weights are the dequantized values.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from moefleet import MoEModel
from moefleet.core.model import MoECheckpoint
from moefleet.core.quant import QuantizationError
from moefleet.inprocess import build_layer
from moefleet.kernels import quant as quant_ops
from moefleet.kernels.experts import grouped_ffn
from moefleet.kernels.permute import gather_rows, permute
from tests import hf_models, quant_models

TOL = 1e-5


def _compare_with(hf_model, ours: MoEModel, block, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for layer in ours.moe_layers:
        forward, routing = block(layer)
        hidden = torch.randn(1, 29, ours.spec.layer.hidden_size, generator=g)
        with torch.no_grad():
            expected = forward(hidden)[0]
            want_ids = routing(hidden[0])
        got, chosen = ours.layer(layer)(hidden[0], return_routing=True)
        err = (got - expected).abs().max().item()
        assert err <= TOL, f"layer {layer}: max abs error {err}"
        assert [set(int(x) for x in row) for row in chosen.topk_ids] == want_ids, f"layer {layer}: expert ids differ"


def _hf_block(family: str, model):
    """The block accessor of ``hf_models`` over an already built model."""
    if family == "gpt_oss":
        return lambda i: (lambda h: model.model.layers[i].mlp(h)[0], hf_models._topk_router(model.model.layers[i].mlp.router))
    return lambda i: (model.model.layers[i].mlp, hf_models._topk_router(model.model.layers[i].mlp.gate))


FP8_CASES = {
    # DeepSeek-V3's layout with a non-square block; shared experts quantized too
    "deepseek_v3": dict(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1),
    # Qwen3 FP8 releases: the same per-expert naming, top-3 without renormalisation
    "qwen3_moe": dict(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3, head_dim=16),
}


@pytest.mark.parametrize("family", sorted(FP8_CASES))
def test_fp8_checkpoint_equals_transformers_loading_it(family, tmp_path):
    model, _ = hf_models.build(family, **FP8_CASES[family])
    model.save_pretrained(tmp_path / "float")
    names = quant_models.write_fp8(tmp_path / "float", tmp_path / "fp8", tmp_path / "deq", block=(16, 32))
    assert names and all(".experts." in n or "shared_expert" in n for n in names)
    ours = MoEModel.from_pretrained(tmp_path / "fp8", backend="torch")
    assert ours.spec.quantization.method == "fp8" and ours.spec.quantization.weight_block_size == (16, 32)
    # transformers' own fp8 loader (it dequantizes on a machine without a GPU)
    hf = getattr(T, type(model).__name__).from_pretrained(tmp_path / "fp8", dtype=torch.float32).eval()
    _compare_with(hf, ours, _hf_block(family, hf))
    # the same model with the dequantized weights written as floats
    hf_deq = getattr(T, type(model).__name__).from_pretrained(tmp_path / "deq", dtype=torch.float32).eval()
    _compare_with(hf_deq, ours, _hf_block(family, hf_deq), seed=1)


def test_fp8_partial_blocks_equal_the_dequantized_model(tmp_path):
    """Weights whose sides are not multiples of the block: the last blocks are partial (ceil-sized scale grids)."""
    model, block = hf_models.build("deepseek_v3", hidden_size=40, moe_intermediate_size=24)
    model.save_pretrained(tmp_path / "float")
    quant_models.write_fp8(tmp_path / "float", tmp_path / "fp8", tmp_path / "deq", block=(16, 16))
    ours = MoEModel.from_pretrained(tmp_path / "fp8")
    hf_deq = T.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32).eval()
    _compare_with(hf_deq, ours, _hf_block("deepseek_v3", hf_deq))


def test_fp8_per_tensor_scales_equal_the_dequantized_model(tmp_path):
    """``weight_block_size: null``: one scale per tensor. Served dequantized everywhere (no packed kernel for it)."""
    model, _ = hf_models.build("qwen3_moe", hidden_size=48, moe_intermediate_size=24)
    model.save_pretrained(tmp_path / "float")
    quant_models.write_fp8(tmp_path / "float", tmp_path / "fp8", tmp_path / "deq", block=None)
    ours = MoEModel.from_pretrained(tmp_path / "fp8")
    assert ours.spec.quantization.weight_block_size is None
    assert MoECheckpoint(tmp_path / "fp8").packed_form(1) is None
    hf_deq = T.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32).eval()
    _compare_with(hf_deq, ours, _hf_block("qwen3_moe", hf_deq))


def test_mxfp4_checkpoint_equals_transformers_loading_it(tmp_path):
    model, _ = hf_models.build("gpt_oss", hidden_size=64, intermediate_size=32, num_experts_per_tok=3)
    model.save_pretrained(tmp_path / "float")
    names = quant_models.write_mxfp4(tmp_path / "float", tmp_path / "mxfp4", tmp_path / "deq")
    assert len(names) == 4
    ours = MoEModel.from_pretrained(tmp_path / "mxfp4", backend="torch")
    assert ours.spec.quantization.method == "mxfp4"
    hf = T.GptOssForCausalLM.from_pretrained(tmp_path / "mxfp4", dtype=torch.float32).eval()
    assert hf.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32  # dequantized by transformers
    _compare_with(hf, ours, _hf_block("gpt_oss", hf))
    hf_deq = T.GptOssForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32).eval()
    _compare_with(hf_deq, ours, _hf_block("gpt_oss", hf_deq), seed=1)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8")
    model, _ = hf_models.build("deepseek_v3", hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                               n_group=2, topk_group=1)
    model.save_pretrained(path / "float")
    quant_models.write_fp8(path / "float", path / "fp8", path / "deq", block=(16, 32))
    return path / "fp8"


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mxfp4")
    model, _ = hf_models.build("gpt_oss", hidden_size=64, intermediate_size=32)
    model.save_pretrained(path / "float")
    quant_models.write_mxfp4(path / "float", path / "mxfp4", path / "deq")
    return path / "mxfp4"


def test_fp8_expert_reads_only_its_weights_and_scales(fp8_dir):
    ckpt = MoECheckpoint(fp8_dir)
    ckpt.expert(1, 5)
    p = "model.layers.1.mlp.experts.5"
    want = {f"{p}.{w}_proj.{t}" for w in ("gate", "up", "down") for t in ("weight", "weight_scale_inv")}
    assert set(ckpt.checkpoint.reads) == want


def _packed_layer_and_reference(path, layer_index=None):
    ckpt = MoECheckpoint(path)
    layer = ckpt.spec.moe_layers[-1] if layer_index is None else layer_index
    packed = build_layer(ckpt, layer, backend="triton")  # interpreted on CPU
    hidden = torch.randn(23, ckpt.spec.layer.hidden_size, generator=torch.Generator().manual_seed(5))
    return ckpt, layer, packed, hidden


@pytest.mark.parametrize("small_tiles", [False, True])
def test_fp8_packed_triton_layer_equals_its_torch_reference(fp8_dir, small_tiles, monkeypatch):
    if small_tiles:
        monkeypatch.setitem(quant_ops._LAUNCH, "BLOCK_M", 16)
        monkeypatch.setitem(quant_ops._LAUNCH, "BLOCK_N", 16)
    ckpt, layer, packed, hidden = _packed_layer_and_reference(fp8_dir)
    assert packed.experts.quant == "fp8" and packed.experts.w13.dtype == torch.float8_e4m3fn
    out, routing = packed(hidden, return_routing=True)
    perm = permute(routing.topk_ids, ckpt.spec.layer.num_experts)
    x = gather_rows(hidden, perm)
    y_triton = grouped_ffn(x, perm.expert_offsets, packed.experts, "triton")
    y_ref = grouped_ffn(x, perm.expert_offsets, packed.experts, "torch")
    assert (y_triton - y_ref).abs().max().item() <= TOL * max(1.0, y_ref.abs().max().item())
    # against the dequantized layer: fp8 activations (w8a8) cost accuracy, bounded here
    dense = MoEModel.from_pretrained(fp8_dir, backend="torch").layer(layer)
    want = dense(hidden)
    rel = ((out - want).abs().max() / want.abs().max()).item()
    assert rel <= 0.05, f"fp8 activation quantization error {rel:.3%} of the output's range"


def test_mxfp4_packed_triton_layer_equals_the_dequantized_layer(mxfp4_dir, monkeypatch):
    """MXFP4 is weight-only: computed on the packed bytes, the layer equals the dequantized one (fp32)."""
    monkeypatch.setitem(quant_ops._LAUNCH, "BLOCK_M", 16)
    monkeypatch.setitem(quant_ops._LAUNCH, "BLOCK_N", 16)
    monkeypatch.setitem(quant_ops._LAUNCH, "MXFP4_BLOCK_K", 32)
    ckpt, layer, packed, hidden = _packed_layer_and_reference(mxfp4_dir)
    assert packed.experts.quant == "mxfp4" and packed.experts.w13.dtype == torch.uint8
    dense = MoEModel.from_pretrained(mxfp4_dir, backend="torch").layer(layer)
    got, want = packed(hidden), dense(hidden)
    assert (got - want).abs().max().item() <= TOL


def test_bytes_per_expert_count_what_is_held(fp8_dir, mxfp4_dir):
    for path, kind, per_value in ((fp8_dir, "fp8", 1.0), (mxfp4_dir, "mxfp4", 0.5)):
        ckpt = MoECheckpoint(path)
        layer = ckpt.spec.moe_layers[0]
        s = ckpt.layer_spec(layer)
        packed = build_layer(ckpt, layer, backend="triton").experts
        assert packed.quant == kind
        assert ckpt.expert_bytes(layer, packed=True) * s.num_experts == packed.nbytes()
        assert ckpt.expert_bytes(layer, packed=True) < s.expert_matrix_params * per_value * 1.1 + s.expert_bias_params * 4
        dense = build_layer(ckpt, layer, backend="torch", dtype=torch.bfloat16).experts
        assert dense.quant is None
        assert ckpt.expert_bytes(layer, torch.bfloat16) * s.num_experts == dense.nbytes() == s.expert_params * 2 * s.num_experts


@pytest.mark.parametrize("method", ["awq", "gptq", "compressed-tensors", "bitsandbytes", None])
def test_unknown_quantization_method_is_refused_naming_it(fp8_dir, tmp_path, method):
    for f in fp8_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match=f"quant_method={method!r} is not supported"):
        MoEModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "field, value", [("activation_scheme", "static"), ("fmt", "e5m2"), ("scale_fmt", "ue8m0"), ("weight_block_size", [128])]
)
def test_fp8_settings_not_served_are_refused(fp8_dir, tmp_path, field, value):
    for f in fp8_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match=field):
        MoECheckpoint(tmp_path)


def test_fp8_weight_without_its_scale_is_an_error_not_a_cast(fp8_dir, tmp_path):
    tensors = load_file(str(fp8_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((fp8_dir / "config.json").read_text())
    ckpt = MoECheckpoint(tmp_path)
    ckpt.expert(1, 2)
    with pytest.raises(QuantizationError, match=r"experts\.3\.up_proj\.weight: float8 tensor without its .*weight_scale_inv"):
        ckpt.expert(1, 3)


def test_quantized_tensors_without_quantization_config_are_an_error(fp8_dir, tmp_path):
    for f in fp8_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match="no fp8 quantization_config"):
        MoECheckpoint(tmp_path).expert(1, 0)


@pytest.mark.parametrize("which", ["fp8", "mxfp4"])
def test_worker_holds_packed_experts_and_reports_their_bytes(which, fp8_dir, mxfp4_dir):
    from moefleet.expert_workers.group import ExpertGroupCore

    path = fp8_dir if which == "fp8" else mxfp4_dir
    ckpt = MoECheckpoint(path)
    layer = ckpt.spec.moe_layers[-1]
    packed = ExpertGroupCore("w", str(path), [(layer, e) for e in range(4)], backend="triton")  # interpreted on CPU
    dense = ExpertGroupCore("w", str(path), [(layer, e) for e in range(4)], backend="torch")
    sp, sd = packed.stats(), dense.stats()
    assert sp["expert_form"] == {str(layer): which} and sd["expert_form"] == {str(layer): "float"}
    assert sp["memory_bytes"] == 4 * ckpt.expert_bytes(layer, packed=True)
    assert sd["memory_bytes"] == 4 * ckpt.expert_bytes(layer)
    assert sp["memory_bytes"] < sd["memory_bytes"] / 3


def test_planner_counts_packed_bytes_for_cuda_workers_and_float_bytes_elsewhere(fp8_dir):
    from moefleet.controller.main import held_expert_bytes
    from moefleet.core.config import WorkerConfig

    ckpt = MoECheckpoint(fp8_dir)
    layers = list(ckpt.spec.moe_layers)
    gpu = held_expert_bytes(ckpt, layers, WorkerConfig(num_gpus=1, dtype="bfloat16"))
    cpu = held_expert_bytes(ckpt, layers, WorkerConfig(num_gpus=0, dtype="bfloat16"))
    local = held_expert_bytes(ckpt, layers, WorkerConfig(num_gpus=1, dtype="bfloat16"), local=True)
    s = ckpt.spec.layer
    assert cpu == local == s.expert_params * 2
    bo, bi = ckpt.quant.weight_block_size
    h, f = s.hidden_size, s.intermediate_size
    scales = 4 * (2 * -(-f // bo) * -(-h // bi) + -(-h // bo) * -(-f // bi))
    assert gpu == s.expert_matrix_params + scales


def test_inspect_shows_family_quantization_bytes_per_expert_and_full_copy(fp8_dir, mxfp4_dir, capsys, monkeypatch):
    from moefleet import cli

    monkeypatch.setenv("COLUMNS", "200")
    assert cli.main(["inspect", "--checkpoint", str(fp8_dir), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    ckpt = MoECheckpoint(fp8_dir)
    layer = ckpt.spec.moe_layers[0]
    assert "deepseek_v3" in out and "quantization: fp8 e4m3, 16x32 blocks" in out
    assert f"{ckpt.expert_bytes(layer, packed=True):,}" in out and f"{ckpt.expert_bytes(layer, 'bfloat16'):,}" in out
    rows = cli.memory_rows(ckpt, "bfloat16")
    assert [r["form"] for r in rows] == ["fp8 packed", "bfloat16 (dequantized)"]
    n = sum(ckpt.layer_spec(i).num_experts for i in ckpt.spec.moe_layers)
    assert rows[0]["experts_bytes"] == n * ckpt.expert_bytes(layer, packed=True)
    assert rows[1]["full_copy_bytes"] == n * ckpt.spec.layer.expert_params * 2 + rows[1]["router_bytes"]
    assert cli.main(["inspect", "--checkpoint", str(mxfp4_dir)]) == 0
    out = capsys.readouterr().out
    assert "gpt_oss" in out and "quantization: mxfp4" in out and "mxfp4 packed" in out


def test_inspect_names_an_unsupported_quantization_method(fp8_dir, tmp_path, capsys):
    from moefleet import cli

    for f in fp8_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["inspect", "--checkpoint", str(tmp_path)]) == 2
    assert "quant_method='awq' is not supported" in capsys.readouterr().err
