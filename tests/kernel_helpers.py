"""Shared helpers of the kernel tests: the device they run on, tiny weights, offsets, configs.

``DEVICE`` is ``cuda`` when the kernels are compiled for real (a CUDA machine
with ``TRITON_INTERPRET=0``), else ``cpu`` (Triton's interpreter). Tensors are
made on the CPU with seeded generators and moved, so both give the same inputs.
"""

from __future__ import annotations

import os

import torch

from moefleet.kernels import fused_moe, triton_moe

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu")


def on_device(*tensors):
    """Move tensors (None kept) to DEVICE; one tensor in, one out."""
    moved = tuple(None if t is None else t.to(DEVICE) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def offsets_for(counts: list[int]) -> torch.Tensor:
    """Rows per expert -> expert_offsets [E + 1] int64 on DEVICE."""
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    return offsets.to(DEVICE)


def ffn_weights(num_experts, hidden, inter, gated, with_bias, seed=0, dtype=torch.float32):
    """w13 [E, 2F or F, H], w2 [E, H, F], b13, b2 (or None) on DEVICE, scaled to keep values O(1)."""
    g = torch.Generator().manual_seed(seed)
    rows = inter * (2 if gated else 1)
    w13 = torch.randn(num_experts, rows, hidden, generator=g) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5
    b13 = torch.randn(num_experts, rows, generator=g) * 0.1 if with_bias else None
    b2 = torch.randn(num_experts, hidden, generator=g) * 0.1 if with_bias else None
    cast = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return cast(w13), cast(w2), cast(b13), cast(b2)


def use_moe_config(monkeypatch, entry: dict) -> list:
    """Make every grouped-GEMM launch use ``entry`` ({"gate_up": ..., "down": ...}); returns the rows asked for."""
    asked = []

    def fixed(num_experts, inter, rows, device_name, dtype, config_dir=None):
        asked.append(rows)
        return {k: dict(v) for k, v in entry.items()}

    monkeypatch.setattr(triton_moe, "moe_config", fixed)
    monkeypatch.setattr(fused_moe, "moe_config", fixed)
    return asked
