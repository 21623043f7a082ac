"""Checkpoint reading: lazy per-expert loading, sharded indexes, and a specific error for each bad checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moefleet import MoEModel
from moefleet.core.checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    MissingTensorError,
    ShapeMismatchError,
    UnknownFamilyError,
)
from moefleet.core.default_model import DEFAULT_CONFIG, write_default_model
from moefleet.core.model import MoECheckpoint
from tests import hf_models


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    model, _ = hf_models.build("mixtral", num_local_experts=8)
    model.save_pretrained(path)
    return path


def _copy(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_loading_two_experts_reads_only_their_tensors(mixtral_dir):
    ckpt = MoECheckpoint(mixtral_dir)
    ckpt.experts(1, [3, 7])
    assert sorted(ckpt.checkpoint.reads) == sorted(
        f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight" for e in (3, 7) for w in ("w1", "w2", "w3")
    )


def test_dbrx_expert_reads_only_its_rows(tmp_path):
    model, _ = hf_models.build("dbrx")
    model.save_pretrained(tmp_path)
    ckpt = MoECheckpoint(tmp_path)
    f = ckpt.spec.layer.intermediate_size
    w = ckpt.expert(0, 2)
    full = load_file(str(tmp_path / "model.safetensors"))["transformer.blocks.0.ffn.experts.mlp.w1"]
    assert torch.equal(w["w1"], full[2 * f : 3 * f])
    assert w["w2"].shape == (ckpt.spec.layer.hidden_size, f)


def test_sharded_checkpoint_loads_like_a_single_file(mixtral_dir, tmp_path):
    tensors = load_file(str(mixtral_dir / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((mixtral_dir / "config.json").read_text())
    a, b = MoEModel.from_pretrained(mixtral_dir), MoEModel.from_pretrained(tmp_path)
    x = torch.randn(5, a.spec.layer.hidden_size)
    assert torch.equal(a.layer(1)(x), b.layer(1)(x))


def test_missing_tensor_is_named(mixtral_dir, tmp_path):
    tensors = load_file(str(mixtral_dir / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((mixtral_dir / "config.json").read_text())
    ckpt = MoECheckpoint(tmp_path)
    ckpt.expert(1, 4)  # other experts still load
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.5\.w3\.weight"):
        ckpt.expert(1, 5)
    with pytest.raises(MissingTensorError):
        ckpt.validate()


def test_wrong_shape_names_tensor_and_both_shapes(mixtral_dir, tmp_path):
    _copy(mixtral_dir, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 20
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ckpt = MoECheckpoint(tmp_path)
    with pytest.raises(ShapeMismatchError, match=r"experts\.0\.w1\.weight: shape \[24, 32\] disagrees .* \[20, 32\]"):
        ckpt.expert(0, 0)


def test_unknown_model_type_lists_supported_families(mixtral_dir, tmp_path):
    _copy(mixtral_dir, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownFamilyError, match=r"model_type='llama' is not a supported MoE family.*mixtral"):
        MoECheckpoint(tmp_path)


def test_corrupt_safetensors_header_is_reported(mixtral_dir, tmp_path):
    _copy(mixtral_dir, tmp_path)
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[8:40] = b"{ this is not json at all !!!!!!"
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="model.safetensors: corrupt safetensors file"):
        MoECheckpoint(tmp_path)


def test_truncated_safetensors_is_reported(mixtral_dir, tmp_path):
    _copy(mixtral_dir, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError):
        MoECheckpoint(tmp_path)


def test_directory_without_weights_is_reported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        MoECheckpoint(tmp_path)


def test_missing_config_field_is_named(mixtral_dir, tmp_path):
    _copy(mixtral_dir, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["num_local_experts"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="field 'num_local_experts' is missing"):
        MoECheckpoint(tmp_path)


def test_default_model_is_deepseek_style_with_shared_experts(tmp_path):
    path = write_default_model(tmp_path, config={"hidden_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 8})
    model = MoEModel.from_pretrained(path)
    spec = model.spec.layer
    assert model.spec.family == "deepseek_v3"
    assert spec.num_shared_experts == DEFAULT_CONFIG["n_shared_experts"] and spec.n_group > 1
    assert model.moe_layers == tuple(range(DEFAULT_CONFIG["first_k_dense_replace"], DEFAULT_CONFIG["num_hidden_layers"]))
    x = torch.randn(9, 64)
    out = model.layer(model.moe_layers[0])(x)
    assert out.shape == (9, 64) and torch.isfinite(out).all()
    # seeded: the same weights on every write
    again = MoEModel.from_pretrained(write_default_model(tmp_path / "again", config={"hidden_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 8}))
    assert torch.equal(again.layer(model.moe_layers[0])(x), out)
