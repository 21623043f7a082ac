"""Quantized checkpoints written the way they are published, from tiny float checkpoints (nothing downloaded).

- ``write_fp8``: DeepSeek-V3's layout (also Kimi-K2's and Qwen3 FP8's): each
  expert and shared-expert projection ``X.weight`` becomes float8 e4m3 with
  ``X.weight_scale_inv`` [ceil(out / bo), ceil(in / bi)] (fp32, ``amax / 448``
  per block) beside it; ``quantization_config`` ``{"quant_method": "fp8",
  "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [bo, bi]}``.
- ``write_mxfp4``: gpt-oss's layout: ``experts.gate_up_proj`` and
  ``experts.down_proj`` ([E, in, out]) become ``*_blocks`` [E, out, in / 32, 16]
  and ``*_scales`` [E, out, in / 32] (uint8), ``quantization_config``
  ``{"quant_method": "mxfp4"}``.

Each writer also writes the same model with the dequantized values in place
of the quantized tensors, as a plain float checkpoint: the reference a served
quantized checkpoint must equal.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_PROJ = re.compile(r"mlp\.(experts\.\d+|shared_experts?)\.(gate|up|down)_proj\.weight$")
MXFP4_PROJ = re.compile(r"mlp\.experts\.(gate_up_proj|down_proj)$")
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 w [out, in], scale_inv [ceil(out/bo), ceil(in/bi)]) with w ≈ q * scale_inv per block;
    ``block=None``: one scale for the tensor (a 0-d scale_inv)."""
    if block is None:
        q, s = quantize_fp8(w, tuple(w.shape))
        return q, s.reshape(())
    bo, bi = block
    r, c = w.shape
    ro, co = -(-r // bo), -(-c // bi)
    padded = torch.zeros(ro * bo, co * bi)
    padded[:r, :c] = w.float()
    blocks = padded.view(ro, bo, co, bi)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
    q = (blocks / scale_inv[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(ro * bo, co * bi)[:r, :c].contiguous(), scale_inv


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    if block is None:
        return q.float() * scale_inv
    bo, bi = block
    r, c = q.shape
    return q.float() * scale_inv.repeat_interleave(bo, 0)[:r].repeat_interleave(bi, 1)[:, :c]


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss MXFP4 of a float ``[E, in, out]`` tensor: (blocks [E, out, in/32, 16], scales [E, out, in/32])."""
    wt = w.float().transpose(1, 2).contiguous()
    e, o, i = wt.shape
    groups = wt.view(e, o, i // 32, 32)
    exp = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exp)[..., None]
    codes = (scaled[..., None] - FP4_VALUES).abs().argmin(-1)  # nearest e2m1 value
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Float ``[E, in, out]`` from gpt-oss blocks and scales."""
    b = blocks.to(torch.int64)
    vals = torch.stack([FP4_VALUES[b & 15], FP4_VALUES[b >> 4]], dim=-1).flatten(-2)  # [E, out, G, 32]
    vals = vals * torch.exp2(scales.float() - 127)[..., None]
    return vals.flatten(-2).transpose(1, 2).contiguous()


def _write(src: Path, tensors: dict, dst: Path, quantization_config: dict | None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def write_fp8(src: Path, dst: Path, dequantized: Path, block: tuple[int, int] | None, pattern: re.Pattern = FP8_PROJ) -> list[str]:
    """fp8 checkpoint at ``dst`` and its dequantized float twin at ``dequantized``; returns the names quantized."""
    tensors = load_file(str(src / "model.safetensors"))
    quant, deq, names = {}, {}, []
    for name, t in tensors.items():
        if pattern.search(name):
            q, s = quantize_fp8(t, block)
            quant[name], quant[name[: -len(".weight")] + ".weight_scale_inv"] = q, s
            deq[name] = dequantize_fp8(q, s, block).to(t.dtype)
            names.append(name)
        else:
            quant[name] = deq[name] = t
    cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block) if block else None}
    _write(src, quant, dst, cfg)
    _write(src, deq, dequantized, None)
    return names


def write_mxfp4(src: Path, dst: Path, dequantized: Path) -> list[str]:
    """MXFP4 checkpoint at ``dst`` (gpt-oss layout) and its dequantized float twin; returns the names quantized."""
    tensors = load_file(str(src / "model.safetensors"))
    quant, deq, names = {}, {}, []
    for name, t in tensors.items():
        if MXFP4_PROJ.search(name):
            blocks, scales = quantize_mxfp4(t)
            quant[name + "_blocks"], quant[name + "_scales"] = blocks, scales
            deq[name] = dequantize_mxfp4(blocks, scales).to(t.dtype)
            names.append(name)
        else:
            quant[name] = deq[name] = t
    cfg = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    _write(src, quant, dst, cfg)
    _write(src, deq, dequantized, None)
    return names
