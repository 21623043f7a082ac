"""The built-in default model: small, DeepSeek-V3-style, seeded random weights.

It is written once as a real checkpoint directory (``config.json`` +
``model.safetensors`` in the DeepSeek-V3 naming) under the cache folder, so
the demo and the fleet load it through the same lazy path as any checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_CONFIG: dict = {
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "hidden_size": 512,
    "intermediate_size": 1024,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_shared_experts": 2,
    "n_group": 4,
    "topk_group": 2,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "hidden_act": "silu",
    "torch_dtype": "float32",
    "vocab_size": 1024,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": None,
    "kv_lora_rank": 64,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
}
SEED = 20261123


def cache_root() -> Path:
    return Path(os.environ.get("MOEFLEET_CACHE", Path.home() / ".cache" / "moefleet"))


def _tensors(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, f, e = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    fs = f * cfg["n_shared_experts"]

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    out: dict[str, torch.Tensor] = {}
    for layer in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp"
        out[f"{p}.gate.weight"] = rand(e, h, std=0.05)
        out[f"{p}.gate.e_score_correction_bias"] = rand(e, std=0.01)
        for x in range(e):
            out[f"{p}.experts.{x}.gate_proj.weight"] = rand(f, h)
            out[f"{p}.experts.{x}.up_proj.weight"] = rand(f, h)
            out[f"{p}.experts.{x}.down_proj.weight"] = rand(h, f)
        out[f"{p}.shared_experts.gate_proj.weight"] = rand(fs, h)
        out[f"{p}.shared_experts.up_proj.weight"] = rand(fs, h)
        out[f"{p}.shared_experts.down_proj.weight"] = rand(h, fs)
    return out


def write_default_model(path: str | Path, config: dict | None = None, seed: int = SEED) -> Path:
    """Write the default model (or a variant of its config) as a checkpoint directory."""
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "model.safetensors.tmp"
    save_file(_tensors(cfg, seed), str(tmp), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    os.replace(tmp, path / "model.safetensors")
    return path


def default_model_dir(config: dict | None = None, seed: int = SEED) -> Path:
    """The default model's checkpoint directory, written on first use and reused after."""
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    key = hashlib.sha256(json.dumps([cfg, seed], sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / f"default-model-{key}"
    if not (path / "model.safetensors").is_file():
        write_default_model(path, config, seed)
    return path
