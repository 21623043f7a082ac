"""The expert activation between the two GEMMs, as its own kernel: ``[N, 2F] -> [N, F]`` (gated) or ``[N, F] -> [N, F]``.

The fused grouped FFN (``triton_moe.grouped_ffn``) applies the standard
activations in its first GEMM's epilogue. Expert FFNs it does not cover — the
clamped SwiGLU of gpt-oss, and experts whose weights stay packed (fp8, MXFP4,
``quant.py``) — run as GEMM, this activation, GEMM (``experts.py``).

Activations (``ACTIVATIONS``), on ``g`` (gate half) and ``u`` (up half):

- ``silu``, ``relu``, ``gelu`` (exact erf), ``gelu_tanh``: ``act(g) * u`` (gated) or ``act(g)``.
- ``clamped_swiglu`` (gpt-oss, gated only): with ``g' = min(g, limit)`` and
  ``u' = clamp(u, -limit, limit)``, ``(u' + 1) * g' * sigmoid(alpha * g')``.

Computed in fp32, stored in the input dtype. A torch reference sits beside the
Triton op. The module imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F_torch
import triton
import triton.language as tl

#: Activation names, mapped to the kernel's code.
ACTIVATIONS: dict[str, int] = {"silu": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "clamped_swiglu": 4}
_GATED_ONLY = ("clamped_swiglu",)
_BLOCK_F = 128  # columns per program; a row's F is covered by cdiv(F, _BLOCK_F) programs


@triton.jit
def _sigmoid(x):
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        y = g * _sigmoid(g)
    elif ACT == 1:
        y = tl.maximum(g, 0.0)
    elif ACT == 2:
        y = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        z = tl.exp(-2.0 * tl.abs(inner))
        t = (1.0 - z) / (1.0 + z)
        t = tl.where(inner >= 0, t, -t)
        y = 0.5 * g * (1.0 + t)
    return y


@triton.jit
def _glu_kernel(
    x_ptr, h_ptr, FI, stride_xn, stride_hn, alpha, limit,
    GATED: tl.constexpr, ACT: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_F columns of one row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    ok = cols < FI
    g = tl.load(x_ptr + row * stride_xn + cols, mask=ok, other=0.0).to(tl.float32)
    if GATED:
        u = tl.load(x_ptr + row * stride_xn + FI + cols, mask=ok, other=0.0).to(tl.float32)
        if ACT == 4:
            g = tl.minimum(g, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
            h = (u + 1.0) * (g * _sigmoid(alpha * g))
        else:
            h = _act(g, ACT) * u
    else:
        h = _act(g, ACT)
    tl.store(h_ptr + row * stride_hn + cols, h.to(h_ptr.dtype.element_ty), mask=ok)


def _check(x: torch.Tensor, activation: str, gated: bool) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating [N, {'2F' if gated else 'F'}] tensor, got {getattr(x, 'shape', type(x))}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if activation in _GATED_ONLY and not gated:
        raise ValueError(f"activation {activation!r} needs gated experts")
    if gated and x.shape[1] % 2:
        raise ValueError(f"gated x must be [N, 2F] (gate columns, then up columns), got an odd width {x.shape[1]}")
    return x.shape[1] // 2 if gated else x.shape[1]


def glu(x: torch.Tensor, activation: str, gated: bool, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """Triton: x [N, 2F] (gated: gate columns, then up) or [N, F] -> h [N, F] in x's dtype."""
    f = _check(x, activation, gated)
    if not (math.isfinite(alpha) and math.isfinite(limit)):
        raise ValueError(f"alpha and limit must be finite, got {alpha}, {limit}")
    x = x.contiguous()
    h = torch.empty((x.shape[0], f), dtype=x.dtype, device=x.device)
    if x.shape[0] == 0 or f == 0:
        return h
    grid = (x.shape[0], triton.cdiv(f, _BLOCK_F))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _glu_kernel[grid](
            x, h, f, x.stride(0), h.stride(0), float(alpha), float(limit),
            GATED=gated, ACT=ACTIVATIONS[activation], BLOCK_F=_BLOCK_F,
        )  # fmt: skip
    return h


def _act_reference(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F_torch.silu(g)
    if activation == "relu":
        return F_torch.relu(g)
    if activation == "gelu":
        return F_torch.gelu(g)
    return F_torch.gelu(g, approximate="tanh")


def glu_reference(x: torch.Tensor, activation: str, gated: bool, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """Torch reference of :func:`glu` (fp32 math, result in x's dtype)."""
    f = _check(x, activation, gated)
    xf = x.float()
    if not gated:
        return _act_reference(xf, activation).to(x.dtype)
    g, u = xf[:, :f], xf[:, f:]
    if activation == "clamped_swiglu":
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
        return ((u + 1) * (g * torch.sigmoid(g * alpha))).to(x.dtype)
    return (_act_reference(g, activation) * u).to(x.dtype)


__all__ = ["ACTIVATIONS", "glu", "glu_reference"]
