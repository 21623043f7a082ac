"""Triton kernels for MoE routing and grouped expert FFNs, with torch references.

Layered as MegaBlocks' ``backend/kernels.py`` is: private ``@triton.jit``
kernels, then launchers that check shapes, dtypes and devices and raise
``ValueError`` before anything is launched, then the public ops. A torch
reference sits beside each op (``*_reference``); the tests compare the two.

Dims are named the same everywhere: T tokens, E experts, K top-k, N rows of a
permuted token batch (T * K when every choice is kept), H hidden, F expert
intermediate, M output features of a grouped GEMM, Kd its reduction dim,
S the parts a reduction is split into.

The routed expert path built on these kernels (alignment, gather, weighted
scatter, fixed-order combine) is :mod:`~moefleet.kernels.fused_moe`.

Tile scheduling of the grouped GEMMs
------------------------------------
Rows of the permuted batch are sorted by expert: expert ``e`` owns rows
``expert_offsets[e]:expert_offsets[e + 1]``. A *tile -> expert map* in the
spirit of vLLM's ``moe_align_block_size`` and MegaBlocks' ``topology`` is
built with device ops: each expert's rows are cut into row tiles of
``BLOCK_M`` rows (a tile never crosses an expert boundary), giving
``tile_expert[i]`` and ``tile_row_start[i]``. The number of real tiles depends
on the routing, so the grid is sized by its upper bound
``min(N, cdiv(N, BLOCK_M) + E)``, a function of the shapes only; tiles past the
real count are marked expert ``-1`` and their programs return at once. The
grid is one dimension over (row tile, column tile) pairs, swizzled in groups
of ``GROUP_M`` row tiles so that programs running together share weight tiles
in L2 (and a second dimension over the S parts of a split reduction). Empty
experts own no tile; ``N == 0`` launches nothing. Every row index is masked by
the row ranges, so wrong offsets give wrong rows, never an access outside a
tensor.

Numerics: fp32 accumulation; fp32 inputs use exact fp32 dot products
(``input_precision="ieee"``, no TF32), so fp32 results match the references;
the FFN intermediate is stored in the input dtype.

Launch parameters are data (``configs/``, read by
:mod:`~moefleet.kernels.launch_config`): a table of row buckets per
(E, F, GPU, dtype), decode-sized tiles for small batches.

Values of index inputs are checked on CPU and, on CUDA, only in debug mode
(:mod:`~moefleet.kernels.checks`): a check there is a host synchronisation.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any, NoReturn

import torch
import torch.nn.functional as F_torch
import triton
import triton.language as tl

from .checks import check_values
from .launch_config import get_launch_config, moe_config

__all__ = [
    "ACTIVATIONS",
    "SCORINGS",
    "fused_topk",
    "fused_topk_reference",
    "grouped_ffn",
    "grouped_ffn_reference",
    "grouped_gemm",
    "grouped_gemm_reference",
]

#: Activation names accepted by ``grouped_ffn``, mapped to the kernel's code.
ACTIVATIONS: dict[str, int] = {"silu": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3}
#: Router scoring functions accepted by ``fused_topk``.
SCORINGS: tuple[str, ...] = ("softmax", "sigmoid")

# One fused_topk program holds a whole row of scores: E is bounded by what
# fits in one block (registers), not by any GPU's tuning.
_MAX_TOPK_EXPERTS = 1024
_GEMM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_RENORM_EPS = 1e-20
# Exact fp32 products for fp32 inputs (no TF32), so fp32 matches the torch
# references; 16-bit inputs are unaffected.
_DOT_PRECISION = "ieee"


@functools.lru_cache(maxsize=None)
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _device_name(t: torch.Tensor) -> str | None:
    """The GPU's name for launch-config lookup (cached: no driver query per call), None off CUDA."""
    if not t.is_cuda:
        return None
    return _cuda_device_name(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ---------------------------------------------------------------------------
# Triton kernels (private)
# ---------------------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    # 1 / (1 + exp(-x)) without overflowing exp for large |x|.
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def _activation(x, ACT: tl.constexpr):
    # ACT codes: see ACTIVATIONS. x is fp32.
    if ACT == 0:  # silu
        y = x * _sigmoid(x)
    elif ACT == 1:  # relu
        y = tl.maximum(x, 0.0)
    elif ACT == 2:  # gelu, exact: 0.5 x (1 + erf(x / sqrt(2)))
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:  # gelu_tanh: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        z = tl.exp(-2.0 * tl.abs(inner))  # tanh(|u|) = (1 - z) / (1 + z)
        t = (1.0 - z) / (1.0 + z)
        t = tl.where(inner >= 0, t, -t)
        y = 0.5 * x * (1.0 + t)
    return y


@triton.jit
def _fused_topk_kernel(
    logits_ptr, bias_ptr, ids_ptr, weights_ptr,
    T, E, stride_lt, stride_le, stride_it, stride_wt,
    scaling,
    K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One program scores BLOCK_T token rows and takes their top K."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le, mask=ok, other=0.0)
    x = x.to(tl.float32)
    neg_inf = float("-inf")
    if SOFTMAX:
        x = tl.where(col_ok[None, :], x, neg_inf)
        z = tl.exp(x - tl.max(x, axis=1)[:, None])
        scores = z / tl.sum(z, axis=1)[:, None]
    else:
        scores = _sigmoid(x)
    choice = scores
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        choice = scores + b[None, :]
    choice = tl.where(col_ok[None, :], choice, neg_inf)

    kcols = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for k in tl.static_range(K):
        best = tl.max(choice, axis=1)
        # argmax, lowest index on ties
        idx = tl.min(tl.where(choice == best[:, None], cols[None, :], BLOCK_E), axis=1)
        picked = cols[None, :] == idx[:, None]
        w = tl.sum(tl.where(picked, scores, 0.0), axis=1)
        ids = tl.where(kcols[None, :] == k, idx[:, None], ids)
        weights = tl.where(kcols[None, :] == k, w[:, None], weights)
        choice = tl.where(picked, neg_inf, choice)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
    weights = weights * scaling

    out_ok = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(ids_ptr + rows[:, None] * stride_it + kcols[None, :], ids.to(tl.int64), mask=out_ok)
    tl.store(weights_ptr + rows[:, None] * stride_wt + kcols[None, :], weights, mask=out_ok)




@triton.jit
def _tile_coords(num_row_tiles, num_cols, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program, swizzled by groups of GROUP_M row tiles."""
    pid = tl.program_id(0)
    num_col_tiles = tl.cdiv(num_cols, BLOCK_N)
    per_group = GROUP_M * num_col_tiles
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_row_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _grouped_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr, row_dst_ptr, weight_ptr,
    num_row_tiles, num_rows, M, KD, k_split,
    stride_xn, stride_xk, stride_we, stride_wm, stride_wk, stride_be, stride_bm,
    stride_ys, stride_yn, stride_ym,
    HAS_BIAS: tl.constexpr, SCATTER: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One (row tile, column tile) of ``x[rows] @ w[e].T (+ bias[e])`` over one part of Kd.

    Part ``s = program_id(1)`` covers Kd columns ``[s * k_split, (s + 1) * k_split)``
    and writes ``y[s]``; the bias is added by part 0 only. With SCATTER, row r is
    multiplied by ``weight[dst(r)]`` and stored at row ``dst(r) = row_dst[r]``
    (its slot); else at row r.
    """
    pid_m, pid_n = _tile_coords(num_row_tiles, M, BLOCK_N, GROUP_M)
    part = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert < 0:  # past the real tiles of this routing
        return
    expert = expert.to(tl.int64)
    row_start = tl.load(tile_row_ptr + pid_m)
    row_end = tl.minimum(tl.load(offsets_ptr + expert + 1), num_rows)

    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = (rows >= 0) & (rows < row_end)
    col_ok = cols < M
    k_lo = part * k_split
    k_hi = tl.minimum(KD, k_lo + k_split)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xn + (k_lo + ks)[None, :] * stride_xk
    w_ptrs = w_ptr + expert * stride_we + (k_lo + ks)[:, None] * stride_wk + cols[None, :] * stride_wm

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = ks < k_hi - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        first_part = (tl.zeros((BLOCK_N,), dtype=tl.int32) + part) == 0  # [BLOCK_N]: the bias is added once
        bias = tl.load(bias_ptr + expert * stride_be + cols * stride_bm, mask=col_ok & first_part, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if SCATTER:
        dst = tl.load(row_dst_ptr + rows, mask=row_ok, other=0)
        acc = acc * tl.load(weight_ptr + dst, mask=row_ok, other=0.0)[:, None]
    else:
        dst = rows
    y_ptrs = y_ptr + part * stride_ys + dst[:, None] * stride_yn + cols[None, :] * stride_ym
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_gate_up_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr, row_src_ptr, token_map_ptr,
    num_row_tiles, num_rows, num_src, FI, KD,
    stride_xn, stride_xk, stride_we, stride_wm, stride_wk, stride_be, stride_bm, stride_hn, stride_hm,
    GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    GATHER: tl.constexpr, ROW_DIV: tl.constexpr, TOKEN_MAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """h = act(x @ gate.T + bg) * (x @ up.T + bu) (gated) or act(x @ w.T + b) for one tile.

    FI is the intermediate size F; gate rows of w[e] are 0..F-1, up rows F..2F-1.
    With GATHER, permuted row r reads source row ``row_src[r] // ROW_DIV`` of x
    (mapped once more through ``token_map`` with TOKEN_MAP): the gather is part
    of the A loads; else it reads row r.
    """
    pid_m, pid_n = _tile_coords(num_row_tiles, FI, BLOCK_N, GROUP_M)
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert < 0:
        return
    expert = expert.to(tl.int64)
    row_start = tl.load(tile_row_ptr + pid_m)
    row_end = tl.minimum(tl.load(offsets_ptr + expert + 1), num_rows)

    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = (rows >= 0) & (rows < row_end)
    col_ok = cols < FI
    if GATHER:
        src = tl.load(row_src_ptr + rows, mask=row_ok, other=0).to(tl.int64) // ROW_DIV
        if TOKEN_MAP:
            src = tl.load(token_map_ptr + src, mask=row_ok, other=0).to(tl.int64)
        src_ok = row_ok & (src >= 0) & (src < num_src)
    else:
        src = rows
        src_ok = row_ok
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + src[:, None] * stride_xn + ks[None, :] * stride_xk
    g_ptrs = w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wm
    u_ptrs = g_ptrs + FI * stride_wm

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        k_ok = ks < KD - k0
        a = tl.load(x_ptrs, mask=src_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            wg = wg.to(tl.float32)
        acc_g += tl.dot(a, wg, input_precision=DOT_PRECISION)
        if GATED:
            wu = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST_DOT:
                wu = wu.to(tl.float32)
            acc_u += tl.dot(a, wu, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        b_ptrs = bias_ptr + expert * stride_be + cols * stride_bm
        acc_g += tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_ptrs + FI * stride_bm, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    h = _activation(acc_g, ACT)
    if GATED:
        h = h * acc_u
    h_ptrs = h_ptr + rows[:, None] * stride_hn + cols[None, :] * stride_hm
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------
# Launchers: check everything, then launch
# ---------------------------------------------------------------------------


def _fail(msg: str) -> NoReturn:
    raise ValueError(msg)


def _check_same_device(ref: torch.Tensor, ref_name: str, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if isinstance(t, torch.Tensor) and t.device != ref.device:
            _fail(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")


def _check_offsets(
    expert_offsets: torch.Tensor, num_experts: int, num_rows: int, validate_values: bool | None
) -> torch.Tensor:
    """expert_offsets: [E + 1] int, 0 = o[0] <= o[1] <= ... <= o[E] = N. Returns it as contiguous int64.

    The values are checked as :func:`~moefleet.kernels.checks.check_values`
    says (always on CPU; on CUDA in debug mode or when asked for).
    """
    if not isinstance(expert_offsets, torch.Tensor):
        _fail(f"expert_offsets must be a torch.Tensor, got {type(expert_offsets).__name__}")
    if expert_offsets.dtype not in (torch.int64, torch.int32):
        _fail(f"expert_offsets must be int64 (or int32), got {expert_offsets.dtype}")
    if expert_offsets.shape != (num_experts + 1,):
        _fail(f"expert_offsets must have shape [E + 1] = [{num_experts + 1}], got {list(expert_offsets.shape)}")
    offsets = expert_offsets.to(torch.int64).contiguous()
    if check_values(offsets, validate_values):
        first, last = offsets[0], offsets[-1]
        bad = (first != 0) | (last != num_rows) | (offsets[1:] < offsets[:-1]).any()
        if bool(bad):
            _fail(
                f"expert_offsets must start at 0, never decrease and end at N = {num_rows}; "
                f"got {offsets.tolist() if offsets.numel() <= 17 else offsets}"
            )
    return offsets


def _check_index(name: str, t: torch.Tensor, length: int, bound: int, validate_values: bool | None) -> torch.Tensor:
    """An index vector [length] of int64/int32 with values in [0, bound) (values checked as offsets are)."""
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        _fail(f"{name} must be int64 (or int32), got {t.dtype}")
    if t.shape != (length,):
        _fail(f"{name} must have shape [{length}], got {list(t.shape)}")
    t = t.contiguous()
    if length and check_values(t, validate_values):
        if bool(((t < 0) | (t >= bound)).any()):
            _fail(f"{name} values must lie in [0, {bound}), got min {int(t.min())} max {int(t.max())}")
    return t


def _check_gemm_operand(name: str, t: torch.Tensor, ndim: int, dims: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        _fail(f"{name} must be {ndim}-D {dims}, got shape {list(t.shape)}")
    if t.dtype not in _GEMM_DTYPES:
        _fail(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def _check_bias(name: str, b: torch.Tensor | None, shape: tuple[int, ...], dims: str) -> torch.Tensor | None:
    if b is None:
        return None
    if not isinstance(b, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor or None, got {type(b).__name__}")
    if not b.is_floating_point():
        _fail(f"{name} must be a floating tensor, got {b.dtype}")
    if tuple(b.shape) != shape:
        _fail(f"{name} must have shape {dims} = {list(shape)}, got {list(b.shape)}")
    return b.contiguous()


def _check_ffn_weights(
    hidden: int, w13: torch.Tensor, w2: torch.Tensor, gated: bool, activation: str, dtype: torch.dtype
) -> tuple[int, int]:
    """Check w13 [E, 2F or F, H] and w2 [E, H, F] against H and dtype; returns (E, F)."""
    _check_gemm_operand("w13", w13, 3, "[E, F * (2 if gated else 1), H]")
    _check_gemm_operand("w2", w2, 3, "[E, H, F]")
    if activation not in ACTIVATIONS:
        _fail(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    num_experts, w13_rows, w13_h = w13.shape
    if num_experts < 1:
        _fail("w13 must hold at least one expert (E >= 1)")
    if w13_h != hidden:
        _fail(f"w13 must be [E, {'2F' if gated else 'F'}, H] with H = {hidden} (x_sorted's), got {list(w13.shape)}")
    if gated and w13_rows % 2:
        _fail(f"gated w13 must be [E, 2F, H] (gate rows then up rows), got an odd row count {w13_rows}")
    f_inter = w13_rows // 2 if gated else w13_rows
    if tuple(w2.shape) != (num_experts, hidden, f_inter):
        _fail(
            f"w2 must be [E, H, F] = {[num_experts, hidden, f_inter]} to match w13 {list(w13.shape)}, "
            f"got {list(w2.shape)}"
        )
    if w13.dtype != dtype or w2.dtype != dtype:
        _fail(f"w13 ({w13.dtype}) and w2 ({w2.dtype}) must have x_sorted's dtype {dtype}")
    return num_experts, f_inter


def _expert_tile_map(offsets: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row tiles of BLOCK_M rows, none crossing an expert boundary (see module docstring).

    Args:
        offsets: [E + 1] int64; ``offsets[E]`` may be below N (rows past it are in no tile).
        num_rows: N.
    Returns:
        tile_expert: [R] int32, expert of each row tile, -1 past the real tiles.
        tile_row_start: [R] int64, first row of each row tile.
    where R = min(N, cdiv(N, BLOCK_M) + E) bounds the real tile count from the
    shapes alone: device ops only, no device-to-host copy.
    """
    num_experts = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1]).clamp_min(0)  # [E]
    tiles = (counts + block_m - 1) // block_m  # [E]
    tiles_end = torch.cumsum(tiles, 0)  # [E], inclusive
    num_row_tiles = min(num_rows, triton.cdiv(num_rows, block_m) + num_experts)
    tile = torch.arange(num_row_tiles, device=offsets.device, dtype=torch.int64)
    expert = torch.searchsorted(tiles_end, tile, right=True)  # [R], E past the end
    valid = expert < num_experts
    e = expert.clamp(max=num_experts - 1)
    row_start = offsets[e] + (tile - (tiles_end[e] - tiles[e])) * block_m
    tile_expert = torch.where(valid, e, -1).to(torch.int32)
    tile_row_start = torch.where(valid, row_start, 0)
    return tile_expert, tile_row_start


def _upcast_dot(x: torch.Tensor) -> bool:
    """Feed bf16 tiles to tl.dot as fp32 under Triton's interpreter only.

    The interpreter keeps bf16 as uint16 bit patterns and its ``tl.dot``
    multiplies the patterns (triton-lang/triton#11584: "we just don't support
    it yet"); its docs say to cast bf16 to fp32 first. Compiled CUDA kernels
    never take this path. The products are exact in fp32 either way.
    """
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or not x.is_cuda
    return x.dtype == torch.bfloat16 and interpreting


def _split_size(kd: int, block_k: int, split_k: int) -> int:
    """Kd columns per part: whole BLOCK_K steps, ``split_k`` parts covering Kd."""
    return max(1, triton.cdiv(triton.cdiv(kd, block_k), split_k)) * block_k


def _launch_grouped_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    cfg: dict[str, Any],
    tile_map: tuple[torch.Tensor, torch.Tensor],
    *,
    split_k: int = 1,
    row_dst: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
) -> None:
    """out [S, rows, M] (or [rows, M] with S = 1) = per-expert x @ w[e].T (+ bias), scattered when row_dst is given."""
    tile_expert, tile_row_start = tile_map
    num_row_tiles = tile_expert.numel()
    m, kd = w.shape[1], w.shape[2]
    grid = (num_row_tiles * triton.cdiv(m, cfg["BLOCK_N"]), split_k)
    b = bias if bias is not None else out  # dummy pointer, never read
    scatter = row_dst is not None
    dst = row_dst if scatter else tile_row_start  # dummy pointer, never read
    wt = row_weight if scatter else out
    out3 = out if out.dim() == 3 else out.unsqueeze(0)
    with _on_device(x):
        _grouped_gemm_kernel[grid](
            x, w, b, out3, offsets, tile_expert, tile_row_start, dst, wt,
            num_row_tiles, x.shape[0], m, kd, _split_size(kd, cfg["BLOCK_K"], split_k),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
            b.stride(0), b.stride(-1), out3.stride(0), out3.stride(1), out3.stride(2),
            HAS_BIAS=bias is not None, SCATTER=scatter, DOT_PRECISION=_DOT_PRECISION, UPCAST_DOT=_upcast_dot(x),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip


def _launch_gate_up(
    x: torch.Tensor,
    w13: torch.Tensor,
    offsets: torch.Tensor,
    b13: torch.Tensor | None,
    h: torch.Tensor,
    gated: bool,
    act: int,
    cfg: dict[str, Any],
    tile_map: tuple[torch.Tensor, torch.Tensor],
    *,
    row_src: torch.Tensor | None = None,
    row_div: int = 1,
    token_map: torch.Tensor | None = None,
) -> None:
    """h [N, F] from x [N, H], or from the source rows x [T, H] picked by row_src (// row_div, then token_map)."""
    tile_expert, tile_row_start = tile_map
    num_row_tiles = tile_expert.numel()
    fi, kd = h.shape[1], x.shape[1]
    grid = (num_row_tiles * triton.cdiv(fi, cfg["BLOCK_N"]),)
    b = b13 if b13 is not None else h  # dummy pointer, never read
    gather = row_src is not None
    src = row_src if gather else tile_row_start  # dummy pointers, never read
    tmap = token_map if token_map is not None else src
    with _on_device(x):
        _grouped_gate_up_kernel[grid](
            x, w13, b, h, offsets, tile_expert, tile_row_start, src, tmap,
            num_row_tiles, h.shape[0], x.shape[0], fi, kd,
            x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
            b.stride(0), b.stride(-1), h.stride(0), h.stride(1),
            GATED=gated, ACT=act, HAS_BIAS=b13 is not None,
            GATHER=gather, ROW_DIV=row_div, TOKEN_MAP=token_map is not None,
            DOT_PRECISION=_DOT_PRECISION, UPCAST_DOT=_upcast_dot(x),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip


# ---------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------


def fused_topk(
    logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = False,
    bias: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router scores -> top-k experts per token, in one Triton kernel.

    Args:
        logits: [T, E] router logits, any float dtype (computed in fp32).
        top_k: K, 1 <= K <= E.
        scoring: ``"softmax"`` or ``"sigmoid"``.
        renormalize: divide the K weights by their sum (+ 1e-20).
        bias: [E] or None, added to the scores only to *choose* experts
            (DeepSeek-V3's ``e_score_correction_bias``); weights stay unbiased.
        scaling: multiplies the final weights (``routed_scaling_factor``).

    Returns:
        topk_ids: [T, K] int64, best first.
        topk_weights: [T, K] float32.

    Same result as :func:`fused_topk_reference` (ties: lowest expert id wins).
    """
    if not isinstance(logits, torch.Tensor):
        _fail(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        _fail(f"logits must be 2-D [T, E], got shape {list(logits.shape)}")
    if not logits.is_floating_point():
        _fail(f"logits must be a floating tensor, got {logits.dtype}")
    num_tokens, num_experts = logits.shape
    if num_experts < 1:
        _fail("logits must have at least one expert column (E >= 1)")
    if num_experts > _MAX_TOPK_EXPERTS:
        _fail(f"fused_topk handles at most {_MAX_TOPK_EXPERTS} experts per row, got E = {num_experts}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        _fail(f"top_k must be an int in [1, E = {num_experts}], got {top_k!r}")
    if scoring not in SCORINGS:
        _fail(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            _fail("bias must be a floating torch.Tensor of shape [E] or None")
        if tuple(bias.shape) != (num_experts,):
            _fail(f"bias must have shape [E] = [{num_experts}], got {list(bias.shape)}")
        _check_same_device(logits, "logits", bias=bias)
        bias = bias.contiguous()
    scaling = float(scaling)
    if not math.isfinite(scaling):
        _fail(f"scaling must be finite, got {scaling}")

    ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=logits.device)
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=logits.device)
    if num_tokens == 0:
        return ids, weights
    logits = logits.contiguous()
    cfg = get_launch_config("fused_topk")
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(cfg["BLOCK_ELEMENTS"] // block_e, triton.next_power_of_2(num_tokens)))
    grid = (triton.cdiv(num_tokens, block_t),)
    with _on_device(logits):
        _fused_topk_kernel[grid](
            logits, bias if bias is not None else logits, ids, weights,
            num_tokens, num_experts, logits.stride(0), logits.stride(1), ids.stride(0), weights.stride(0),
            scaling,
            K=top_k, SOFTMAX=scoring == "softmax", HAS_BIAS=bias is not None, RENORMALIZE=bool(renormalize),
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
    return ids, weights


def fused_topk_reference(
    logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = False,
    bias: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`fused_topk` (same arguments, same results)."""
    logits = logits.float()
    if scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    choice = scores + bias.float() if bias is not None else scores
    topk_ids = torch.topk(choice, top_k, dim=-1, sorted=True).indices
    weights = scores.gather(1, topk_ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + _RENORM_EPS)
    weights = weights * scaling
    return topk_ids, weights


def grouped_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    expert_offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    validate_offsets: bool | None = None,
    config_experts: int | None = None,
) -> torch.Tensor:
    """Ragged per-expert GEMM: ``y[o[e]:o[e+1]] = x[o[e]:o[e+1]] @ w[e].T (+ bias[e])``.

    Args:
        x: [N, Kd] rows sorted by expert (fp16, bf16 or fp32).
        w: [E, M, Kd] expert weights, same dtype as x.
        expert_offsets: [E + 1] int64 (int32 accepted), 0 = o[0] <= ... <= o[E] = N.
            Empty experts (o[e] == o[e+1]) are fine.
        bias: [E, M] or None.
        validate_offsets: check the offsets' values; None (default) checks on
            CPU and, on CUDA, only with ``MOEFLEET_KERNEL_DEBUG=1`` (a check
            there is a device-to-host copy).

    Returns:
        y: [N, M] in x's dtype (fp32 accumulation). Launch parameters: the
        ``down`` entry of the row bucket nearest N (never split over Kd here).
    """
    _check_gemm_operand("x", x, 2, "[N, Kd]")
    _check_gemm_operand("w", w, 3, "[E, M, Kd]")
    num_rows, kd = x.shape
    num_experts, m, w_kd = w.shape
    if num_experts < 1:
        _fail("w must hold at least one expert (E >= 1)")
    if w_kd != kd:
        _fail(f"w's reduction dim must match x: w is [E, M, Kd] = {list(w.shape)}, x is [N, Kd] = {list(x.shape)}")
    if w.dtype != x.dtype:
        _fail(f"w dtype {w.dtype} must equal x dtype {x.dtype}")
    _check_same_device(x, "x", w=w, expert_offsets=expert_offsets, bias=bias)
    bias = _check_bias("bias", bias, (num_experts, m), "[E, M]")
    offsets = _check_offsets(expert_offsets, num_experts, num_rows, validate_offsets)

    out = torch.empty((num_rows, m), dtype=x.dtype, device=x.device)
    if num_rows == 0 or m == 0:
        return out
    x, w = x.contiguous(), w.contiguous()
    cfg = moe_config(config_experts or num_experts, kd, num_rows, _device_name(x), x.dtype)["down"]
    tile_map = _expert_tile_map(offsets, num_rows, cfg["BLOCK_M"])
    _launch_grouped_gemm(x, w, offsets, bias, out, cfg, tile_map)
    return out


def grouped_gemm_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    expert_offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of :func:`grouped_gemm`: a loop over experts."""
    out = torch.empty((x.shape[0], w.shape[1]), dtype=x.dtype, device=x.device)
    bounds = expert_offsets.tolist()
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        y = x[lo:hi] @ w[e].T
        if bias is not None:
            y = y + bias[e].to(y.dtype)
        out[lo:hi] = y
    return out


def grouped_ffn(
    x_sorted: torch.Tensor,
    expert_offsets: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    gated: bool,
    activation: str,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    row_index: torch.Tensor | None = None,
    validate_offsets: bool | None = None,
    config_experts: int | None = None,
) -> torch.Tensor:
    """Grouped expert FFN over a batch whose rows are sorted by expert.

    Args:
        x_sorted: [N, H], expert e owns rows expert_offsets[e]:expert_offsets[e+1];
            or, with ``row_index``, the source rows [T, H] (any T).
        expert_offsets: [E + 1] int64 (int32 accepted), 0 = o[0] <= ... <= o[E] = N.
        w13: [E, 2F, H] when gated (rows 0..F-1 the gate projection, F..2F-1
            the up projection), [E, F, H] otherwise. Same dtype as x.
        w2: [E, H, F] down projection, same dtype as x.
        gated: ``h = act(x @ gate.T + bg) * (x @ up.T + bu)`` if True,
            else ``h = act(x @ w13.T + b13)``.
        activation: one of ``ACTIVATIONS``: "silu", "relu", "gelu" (exact
            erf), "gelu_tanh" (tanh approximation).
        b13: [E, 2F] (gated; gate bias first) or [E, F], or None.
        b2: [E, H] or None.
        row_index: [N] int64/int32 or None. Permuted row r is
            ``x_sorted[row_index[r]]``: the gather happens in the first GEMM's
            loads, with no gathered copy.
        validate_offsets: as in :func:`grouped_gemm` (also checks row_index).
        config_experts: the E whose launch-config table is used (the model
            layer's E); default ``w13``'s E (see ``fused_moe.fused_experts``).

    Returns:
        [N, H] in x's dtype: ``h @ w2[e].T (+ b2[e])`` per expert. The
        activation and gated product are fused into the first GEMM's
        epilogue; ``h`` is stored once, in x's dtype.
    """
    _check_gemm_operand("x_sorted", x_sorted, 2, "[N, H]" if row_index is None else "[T, H]")
    hidden = x_sorted.shape[1]
    num_experts, f_inter = _check_ffn_weights(hidden, w13, w2, gated, activation, x_sorted.dtype)
    _check_same_device(
        x_sorted, "x_sorted", expert_offsets=expert_offsets, w13=w13, w2=w2, b13=b13, b2=b2, row_index=row_index
    )
    b13 = _check_bias("b13", b13, (num_experts, w13.shape[1]), "[E, 2F]" if gated else "[E, F]")
    b2 = _check_bias("b2", b2, (num_experts, hidden), "[E, H]")
    if row_index is not None:
        if not isinstance(row_index, torch.Tensor) or row_index.dim() != 1:
            _fail(f"row_index must be a 1-D [N] tensor, got {getattr(row_index, 'shape', type(row_index).__name__)}")
        num_rows = row_index.shape[0]
        row_index = _check_index("row_index", row_index, num_rows, x_sorted.shape[0], validate_offsets)
    else:
        num_rows = x_sorted.shape[0]
    offsets = _check_offsets(expert_offsets, num_experts, num_rows, validate_offsets)

    out = torch.empty((num_rows, hidden), dtype=x_sorted.dtype, device=x_sorted.device)
    if num_rows == 0 or hidden == 0:
        return out
    x, w13, w2 = x_sorted.contiguous(), w13.contiguous(), w2.contiguous()
    cfg = moe_config(config_experts or num_experts, f_inter, num_rows, _device_name(x), x.dtype)
    cfg_up, cfg_down = cfg["gate_up"], cfg["down"]
    map_up = _expert_tile_map(offsets, num_rows, cfg_up["BLOCK_M"])
    map_down = map_up if cfg_down["BLOCK_M"] == cfg_up["BLOCK_M"] else _expert_tile_map(offsets, num_rows, cfg_down["BLOCK_M"])

    h = torch.empty((num_rows, f_inter), dtype=x.dtype, device=x.device)  # [N, F]
    if f_inter > 0:
        _launch_gate_up(x, w13, offsets, b13, h, gated, ACTIVATIONS[activation], cfg_up, map_up, row_src=row_index)
    _launch_grouped_gemm(h, w2, offsets, b2, out, cfg_down, map_down)
    return out


def activation_reference(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F_torch.silu(x)
    if activation == "relu":
        return F_torch.relu(x)
    if activation == "gelu":
        return F_torch.gelu(x)
    if activation == "gelu_tanh":
        return F_torch.gelu(x, approximate="tanh")
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


def grouped_ffn_reference(
    x_sorted: torch.Tensor,
    expert_offsets: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    gated: bool,
    activation: str,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of :func:`grouped_ffn`: a loop over experts, in x's dtype."""
    out = torch.empty((x_sorted.shape[0], w2.shape[1]), dtype=x_sorted.dtype, device=x_sorted.device)
    bounds = expert_offsets.tolist()
    for e in range(w13.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if lo == hi:  # a worker's slot stack holds experts a call does not use
            continue
        xe = x_sorted[lo:hi]
        g = xe @ w13[e].T
        if b13 is not None:
            g = g + b13[e].to(g.dtype)
        if gated:
            gate, up = g.chunk(2, dim=-1)
            h = activation_reference(gate, activation) * up
        else:
            h = activation_reference(g, activation)
        y = h @ w2[e].T
        if b2 is not None:
            y = y + b2[e].to(y.dtype)
        out[lo:hi] = y
    return out
