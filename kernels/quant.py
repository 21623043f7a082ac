"""Grouped GEMMs on packed expert weights: fp8 with block scales (DeepSeek) and MXFP4 (gpt-oss).

Rows of ``x`` are sorted by expert, ``expert_offsets [E + 1]`` bounding each
expert's rows, as in ``triton_moe``; each op computes ``y[rows of e] =
x[rows of e] @ W[e].T (+ bias[e])`` with ``W`` kept in its packed form.

fp8, block-scaled (``w8a8``, DeepSeek-V3's inference scheme)
------------------------------------------------------------
Weights ``w [E, M, Kd]`` float8 e4m3 with ``w_scale [E, ceil(M / bo), ceil(Kd / bi)]``
(fp32; ``W = w * w_scale`` per ``bo x bi`` block). Activations are quantized at
run time per token and per group of ``bi`` columns (:func:`per_token_group_quant_fp8`:
``s = max(amax, 1e-10) / 448``, ``q = round_e4m3(x / s)``). The GEMM accumulates
each ``bi``-wide slice of the reduction in fp32 and scales it by the token's
group scale and the weight block's scale before adding it up:

    y[n, m] = sum_kb (sum_{k in kb} q[n, k] * w[m, k]) * s[n, kb] * w_scale[m // bo, kb]

The kernel rounds to e4m3 itself (round to nearest, ties to even, in fp32)
before the cast, so compiled and interpreted runs quantize bit-identically to
``torch``'s cast.

MXFP4 (weight-only)
-------------------
Weights ``w_blocks [E, M, Kd / 2]`` (uint8: two e2m1 values, low nibble first)
and ``w_scales [E, M, Kd / 32]`` (uint8 e8m0 exponents, bias 127). The kernel
decodes each byte tile into the even and odd reduction columns and multiplies
by ``2 ** (scale - 127)`` (exact in bf16 and fp32), so
``y = x @ dequant(W).T`` with fp32 accumulation; activations stay in their dtype.

Each op has a torch reference (``*_reference``) computing the same formula with
torch ops; tests run the Triton kernels under ``TRITON_INTERPRET=1`` on tiny
shapes against them. On CUDA they are compiled for real (fp8 ``tl.dot`` needs
compute capability 8.9+: Ada, Hopper, Blackwell). Launchers check shapes,
dtypes and devices and raise ``ValueError`` before anything is launched.

The module imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "FP8_MAX",
    "MXFP4_BLOCK",
    "dequantize_mxfp4_reference",
    "e8m0_scale",
    "fp8_grouped_gemm",
    "fp8_grouped_gemm_reference",
    "fp8_grouped_linear",
    "fp8_grouped_linear_reference",
    "fp8_packable",
    "mxfp4_grouped_gemm",
    "mxfp4_grouped_gemm_reference",
    "per_token_group_quant_fp8",
    "per_token_group_quant_fp8_reference",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
_FP8_EPS = 1e-10
MXFP4_BLOCK = 32
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Launch parameters (defaults; not tuned per device). fp8's BLOCK_K is the weight block's input width.
_LAUNCH = {"BLOCK_M": 64, "BLOCK_N": 64, "MXFP4_BLOCK_K": 64, "num_warps": 4, "num_stages": 2}


def _fail(msg: str):
    raise ValueError(msg)


def _interpreting(t: torch.Tensor) -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or not t.is_cuda


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def fp8_packable(block: tuple[int, int] | None, intermediate_size: int, gated: bool) -> bool:
    """Whether fp8 experts with this weight block run packed: ``bi`` a power of 2 >= 16 (the kernel's
    BLOCK_K), and for gated experts ``F % bo == 0`` (gate and up rows stack into whole scale blocks)."""
    if block is None:
        return False
    bo, bi = block
    return bi >= 16 and bi & (bi - 1) == 0 and (not gated or intermediate_size % bo == 0)


# ---------------------------------------------------------------------------
# Tile map (rows sorted by expert -> row tiles that never cross an expert)
# ---------------------------------------------------------------------------


def _tile_map(offsets: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile_expert [T], tile_row_start [T]) with T = cdiv(N, BLOCK_M) + E, an upper bound; extra tiles get expert -1.

    Built with torch ops on the offsets' device, no device-to-host copy.
    """
    num_experts = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + block_m - 1) // block_m  # [E]
    ends = torch.cumsum(tiles, 0)
    starts = ends - tiles
    t = torch.arange(triton.cdiv(num_rows, block_m) + num_experts, device=offsets.device)
    expert = torch.searchsorted(ends, t, right=True)  # E past the last real tile
    valid = expert < num_experts
    e = expert.clamp(max=num_experts - 1)
    rows = offsets[e] + (t - starts[e]) * block_m
    return torch.where(valid, e, -1).to(torch.int64), rows.to(torch.int64)


def _check_offsets(offsets: torch.Tensor, num_experts: int, num_rows: int) -> torch.Tensor:
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() != num_experts + 1:
        _fail(f"expert_offsets must be [E + 1] = [{num_experts + 1}], got {getattr(offsets, 'shape', type(offsets))}")
    if offsets.dtype not in (torch.int32, torch.int64):
        _fail(f"expert_offsets must be int32 or int64, got {offsets.dtype}")
    o = offsets.to(torch.int64)
    host = o.tolist()
    if host[0] != 0 or host[-1] != num_rows or any(b < a for a, b in zip(host, host[1:])):
        _fail(f"expert_offsets must rise from 0 to N = {num_rows}, got {host}")
    return o.contiguous()


def _check_bias(bias: torch.Tensor | None, num_experts: int, m: int, device) -> torch.Tensor | None:
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (num_experts, m) or not bias.is_floating_point():
        _fail(f"bias must be a floating [E, M] = [{num_experts}, {m}] tensor, got {getattr(bias, 'shape', type(bias))}")
    if bias.device != device:
        _fail(f"bias is on {bias.device}, x on {device}")
    return bias.contiguous()


# ---------------------------------------------------------------------------
# fp8: Triton kernels
# ---------------------------------------------------------------------------


@triton.jit
def _round_to_e4m3(x):
    """fp32 x with |x| <= 448 rounded to the nearest e4m3 value, ties to even; exact in fp32, sign (and -0) kept."""
    bits = x.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)  # e4m3's subnormals share the spacing of its smallest binade
    inv_ulp = ((127 + 3 - e) << 23).to(tl.float32, bitcast=True)  # 2 ** (3 - e)
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2 ** (e - 3)
    y = tl.abs(x) * inv_ulp  # < 16: exact
    r = ((y + 12582912.0) - 12582912.0) * ulp  # 1.5 * 2**23: rounds to an integer, ties to even
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, KD, stride_xn, stride_qn, stride_sn,
    GROUP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program: one group of GROUP columns of one row."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    j = tl.arange(0, BLOCK)
    cols = g * GROUP + j
    ok = (j < GROUP) & (cols < KD)
    x = tl.load(x_ptr + row * stride_xn + cols, mask=ok, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-10) / 448.0
    q = _round_to_e4m3(tl.minimum(tl.maximum(x / s, -448.0), 448.0))
    tl.store(q_ptr + row * stride_qn + cols, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + row * stride_sn + g, s)


@triton.jit
def _fp8_gemm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr,
    M, KD,
    stride_xn, stride_xk, stride_xsn, stride_xsk,
    stride_we, stride_wm, stride_wk, stride_wse, stride_wsm, stride_wsk,
    stride_be, stride_yn, stride_ym,
    BLOCK_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[rows of one tile, BLOCK_N columns] = sum over K blocks of scaled fp8 partial products."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert < 0:
        return
    expert = expert.to(tl.int64)
    row_start = tl.load(tile_row_ptr + pid_m)
    row_end = tl.load(offsets_ptr + expert + 1)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < M
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(KD, BLOCK_K)):
        k = kb * BLOCK_K + ks
        k_ok = k < KD
        a = tl.load(x_ptr + rows[:, None] * stride_xn + k[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(
            w_ptr + expert * stride_we + k[:, None] * stride_wk + cols[None, :] * stride_wm,
            mask=k_ok[:, None] & col_ok[None, :], other=0.0,
        )
        a_s = tl.load(xs_ptr + rows * stride_xsn + kb * stride_xsk, mask=row_ok, other=0.0)
        b_s = tl.load(ws_ptr + expert * stride_wse + (cols // BLOCK_OUT) * stride_wsm + kb * stride_wsk, mask=col_ok, other=0.0)
        if UPCAST:
            part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(a, b)
        acc += part * a_s[:, None] * b_s[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_yn + cols[None, :] * stride_ym, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


# ---------------------------------------------------------------------------
# fp8: ops and references
# ---------------------------------------------------------------------------


def per_token_group_quant_fp8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, Kd] (float) -> (q [N, Kd] float8 e4m3, s [N, ceil(Kd / group)] fp32), ``x ≈ q * s`` per group (Triton)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _OUT_DTYPES:
        _fail(f"x must be a [N, Kd] fp16/bf16/fp32 tensor, got {getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}")
    if not isinstance(group, int) or group < 1:
        _fail(f"group must be a positive int, got {group!r}")
    n, kd = x.shape
    ng = triton.cdiv(kd, group)
    q = torch.empty((n, kd), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((n, ng), dtype=torch.float32, device=x.device)
    if n == 0 or kd == 0:
        return q, s
    x = x.contiguous()
    with _on_device(x):
        _act_quant_kernel[(n, ng)](x, q, s, kd, x.stride(0), q.stride(0), s.stride(0), GROUP=group, BLOCK=triton.next_power_of_2(group))
    return q, s


def per_token_group_quant_fp8_reference(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`per_token_group_quant_fp8`."""
    n, kd = x.shape
    ng = -(-kd // group)
    xf = torch.nn.functional.pad(x.float(), (0, ng * group - kd)).view(n, ng, group)
    s = xf.abs().amax(dim=-1).clamp_min(_FP8_EPS) / FP8_MAX
    q = (xf / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(n, ng * group)[:, :kd]
    return q.contiguous(), s


def _check_fp8(xq, xs, w, w_scale, offsets, block):
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        _fail(f"block must be (block_out, block_in), got {block!r}")
    bo, bi = int(block[0]), int(block[1])
    if bi < 16 or bi & (bi - 1):
        _fail(f"block_in must be a power of 2 >= 16 (the kernel's BLOCK_K), got {bi}")
    if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.dtype != FP8_DTYPE:
        _fail(f"w must be a float8_e4m3fn [E, M, Kd] tensor, got {getattr(w, 'dtype', type(w))} {getattr(w, 'shape', '')}")
    e, m, kd = w.shape
    if not isinstance(xq, torch.Tensor) or xq.dtype != FP8_DTYPE or xq.dim() != 2 or xq.shape[1] != kd:
        _fail(f"xq must be a float8_e4m3fn [N, {kd}] tensor, got {getattr(xq, 'dtype', type(xq))} {getattr(xq, 'shape', '')}")
    n = xq.shape[0]
    want_xs = (n, -(-kd // bi))
    if not isinstance(xs, torch.Tensor) or tuple(xs.shape) != want_xs or xs.dtype != torch.float32:
        _fail(f"xs must be fp32 [N, ceil(Kd / block_in)] = {list(want_xs)}, got {getattr(xs, 'dtype', '')} {list(getattr(xs, 'shape', []))}")
    want_ws = (e, -(-m // bo), -(-kd // bi))
    if not isinstance(w_scale, torch.Tensor) or tuple(w_scale.shape) != want_ws or w_scale.dtype != torch.float32:
        _fail(f"w_scale must be fp32 [E, ceil(M / bo), ceil(Kd / bi)] = {list(want_ws)}, got {list(getattr(w_scale, 'shape', []))}")
    for name, t in (("xs", xs), ("w", w), ("w_scale", w_scale), ("expert_offsets", offsets)):
        if t.device != xq.device:
            _fail(f"{name} is on {t.device}, xq on {xq.device}")
    return bo, bi, e, m, kd, n


def fp8_grouped_gemm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    expert_offsets: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Block-scaled fp8 grouped GEMM (Triton): see the module docstring.

    Args:
        xq: [N, Kd] float8 e4m3 activations, rows sorted by expert.
        xs: [N, ceil(Kd / bi)] fp32 per-token-group scales.
        w: [E, M, Kd] float8 e4m3 weights. w_scale: [E, ceil(M / bo), ceil(Kd / bi)] fp32.
        expert_offsets: [E + 1] int, 0 = o[0] <= ... <= o[E] = N.
        block: (bo, bi); bi is the activation group width too, a power of 2 >= 16.
        bias: [E, M] or None. out_dtype: fp16, bf16 or fp32.

    Returns: y [N, M] in out_dtype (fp32 accumulation).
    """
    bo, bi, e, m, kd, n = _check_fp8(xq, xs, w, w_scale, expert_offsets, block)
    if out_dtype not in _OUT_DTYPES:
        _fail(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    offsets = _check_offsets(expert_offsets, e, n)
    bias = _check_bias(bias, e, m, xq.device)
    y = torch.empty((n, m), dtype=out_dtype, device=xq.device)
    if n == 0 or m == 0:
        return y
    xq, xs, w, w_scale = xq.contiguous(), xs.contiguous(), w.contiguous(), w_scale.contiguous()
    cfg = _LAUNCH
    tile_expert, tile_row = _tile_map(offsets, n, cfg["BLOCK_M"])
    b = bias if bias is not None else y
    grid = (tile_expert.numel(), triton.cdiv(m, cfg["BLOCK_N"]))
    with _on_device(xq):
        _fp8_gemm_kernel[grid](
            xq, xs, w, w_scale, b, y, offsets, tile_expert, tile_row,
            m, kd,
            xq.stride(0), xq.stride(1), xs.stride(0), xs.stride(1),
            w.stride(0), w.stride(1), w.stride(2), w_scale.stride(0), w_scale.stride(1), w_scale.stride(2),
            b.stride(0), y.stride(0), y.stride(1),
            BLOCK_OUT=bo, HAS_BIAS=bias is not None, UPCAST=_interpreting(xq),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bi,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
    return y


def fp8_grouped_gemm_reference(
    xq: torch.Tensor,
    xs: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    expert_offsets: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Torch reference of :func:`fp8_grouped_gemm`: per expert, per K block, fp32."""
    bo, bi = block
    n, kd = xq.shape
    m = w.shape[1]
    y = torch.empty((n, m), dtype=out_dtype, device=xq.device)
    bounds = expert_offsets.tolist()
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        acc = torch.zeros((hi - lo, m), dtype=torch.float32, device=xq.device)
        for kb in range(-(-kd // bi)):
            ks = slice(kb * bi, min((kb + 1) * bi, kd))
            part = xq[lo:hi, ks].float() @ w[e][:, ks].float().T
            acc += part * xs[lo:hi, kb, None] * w_scale[e][:, kb].repeat_interleave(bo)[:m][None, :]
        if bias is not None:
            acc += bias[e].float()
        y[lo:hi] = acc.to(out_dtype)
    return y


def fp8_grouped_linear(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, expert_offsets: torch.Tensor, block: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [N, Kd] (fp16/bf16/fp32) -> [N, M] in x's dtype: per-token-group fp8 quantization, then the fp8 GEMM (Triton)."""
    xq, xs = per_token_group_quant_fp8(x, int(block[1]))
    return fp8_grouped_gemm(xq, xs, w, w_scale, expert_offsets, block, bias, out_dtype=x.dtype)


def fp8_grouped_linear_reference(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, expert_offsets: torch.Tensor, block: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of :func:`fp8_grouped_linear`."""
    xq, xs = per_token_group_quant_fp8_reference(x, int(block[1]))
    return fp8_grouped_gemm_reference(xq, xs, w, w_scale, expert_offsets, block, bias, out_dtype=x.dtype)


# ---------------------------------------------------------------------------
# MXFP4
# ---------------------------------------------------------------------------


@triton.jit
def _fp4_value(c):
    """e2m1 value of 4-bit codes c (int32)."""
    mag = c & 7
    v = tl.where(mag == 1, 0.5, 0.0)
    v = tl.where(mag == 2, 1.0, v)
    v = tl.where(mag == 3, 1.5, v)
    v = tl.where(mag == 4, 2.0, v)
    v = tl.where(mag == 5, 3.0, v)
    v = tl.where(mag == 6, 4.0, v)
    v = tl.where(mag == 7, 6.0, v)
    return tl.where(c >= 8, -v, v)


@triton.jit
def _mxfp4_gemm_kernel(
    x_ptr, wb_ptr, ws_ptr, bias_ptr, y_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr,
    M, KD,
    stride_xn, stride_xk, stride_be, stride_bm, stride_bk, stride_se, stride_sm, stride_sk,
    stride_biase, stride_yn, stride_ym,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr,
):  # fmt: skip
    """One (row tile, column tile): each step decodes BLOCK_KH bytes (2 * BLOCK_KH reduction columns) per weight row."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert < 0:
        return
    expert = expert.to(tl.int64)
    row_start = tl.load(tile_row_ptr + pid_m)
    row_end = tl.load(offsets_ptr + expert + 1)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < M
    js = tl.arange(0, BLOCK_KH)
    half = KD // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, half, BLOCK_KH):
        jb = j0 + js  # byte column = reduction columns 2 jb (low nibble) and 2 jb + 1 (high nibble)
        j_ok = jb < half
        x_mask = row_ok[:, None] & j_ok[None, :]
        xe = tl.load(x_ptr + rows[:, None] * stride_xn + (2 * jb)[None, :] * stride_xk, mask=x_mask, other=0.0)
        xo = tl.load(x_ptr + rows[:, None] * stride_xn + (2 * jb + 1)[None, :] * stride_xk, mask=x_mask, other=0.0)
        w_mask = j_ok[:, None] & col_ok[None, :]
        wb = tl.load(wb_ptr + expert * stride_be + cols[None, :] * stride_bm + jb[:, None] * stride_bk, mask=w_mask, other=0)
        sc = tl.load(ws_ptr + expert * stride_se + cols[None, :] * stride_sm + (jb // 16)[:, None] * stride_sk, mask=w_mask, other=127)
        # e8m0: 2 ** (sc - 127) as the float's exponent bits; 0 is 2 ** -127 (a subnormal), 255 is NaN
        sc = sc.to(tl.int32)
        bits = tl.where(sc == 0, 0x00400000, tl.where(sc == 255, 0x7FC00000, sc << 23))
        scale = bits.to(tl.float32, bitcast=True)
        wb = wb.to(tl.int32)
        lo = _fp4_value(wb & 15) * scale
        hi = _fp4_value(wb >> 4) * scale
        if UPCAST:
            xe = xe.to(tl.float32)
            xo = xo.to(tl.float32)
        else:
            lo = lo.to(x_ptr.dtype.element_ty)
            hi = hi.to(x_ptr.dtype.element_ty)
        acc += tl.dot(xe, lo, input_precision=DOT_PRECISION)
        acc += tl.dot(xo, hi, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_biase + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_yn + cols[None, :] * stride_ym, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


def _check_mxfp4(x, w_blocks, w_scales, offsets):
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _OUT_DTYPES:
        _fail(f"x must be a [N, Kd] fp16/bf16/fp32 tensor, got {getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}")
    n, kd = x.shape
    if kd % MXFP4_BLOCK:
        _fail(f"x's Kd = {kd} must be a multiple of {MXFP4_BLOCK} (MXFP4 blocks)")
    if not isinstance(w_blocks, torch.Tensor) or w_blocks.dim() != 3 or w_blocks.dtype != torch.uint8 or w_blocks.shape[2] != kd // 2:
        _fail(f"w_blocks must be uint8 [E, M, Kd / 2] = [E, M, {kd // 2}], got {getattr(w_blocks, 'dtype', '')} {list(getattr(w_blocks, 'shape', []))}")
    e, m, _ = w_blocks.shape
    want = (e, m, kd // MXFP4_BLOCK)
    if not isinstance(w_scales, torch.Tensor) or w_scales.dtype != torch.uint8 or tuple(w_scales.shape) != want:
        _fail(f"w_scales must be uint8 [E, M, Kd / 32] = {list(want)}, got {getattr(w_scales, 'dtype', '')} {list(getattr(w_scales, 'shape', []))}")
    for name, t in (("w_blocks", w_blocks), ("w_scales", w_scales), ("expert_offsets", offsets)):
        if t.device != x.device:
            _fail(f"{name} is on {t.device}, x on {x.device}")
    return e, m, kd, n


def mxfp4_grouped_gemm(
    x: torch.Tensor, w_blocks: torch.Tensor, w_scales: torch.Tensor, expert_offsets: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """MXFP4 weight-only grouped GEMM (Triton): y [N, M] = x @ dequant(W[e]).T (+ bias[e]) in x's dtype.

    x: [N, Kd] fp16/bf16/fp32, Kd a multiple of 32; w_blocks: [E, M, Kd / 2] uint8;
    w_scales: [E, M, Kd / 32] uint8; bias: [E, M] or None.
    """
    e, m, kd, n = _check_mxfp4(x, w_blocks, w_scales, expert_offsets)
    offsets = _check_offsets(expert_offsets, e, n)
    bias = _check_bias(bias, e, m, x.device)
    y = torch.empty((n, m), dtype=x.dtype, device=x.device)
    if n == 0 or m == 0:
        return y
    x, w_blocks, w_scales = x.contiguous(), w_blocks.contiguous(), w_scales.contiguous()
    cfg = _LAUNCH
    tile_expert, tile_row = _tile_map(offsets, n, cfg["BLOCK_M"])
    b = bias if bias is not None else y
    grid = (tile_expert.numel(), triton.cdiv(m, cfg["BLOCK_N"]))
    with _on_device(x):
        _mxfp4_gemm_kernel[grid](
            x, w_blocks, w_scales, b, y, offsets, tile_expert, tile_row,
            m, kd,
            x.stride(0), x.stride(1), w_blocks.stride(0), w_blocks.stride(1), w_blocks.stride(2),
            w_scales.stride(0), w_scales.stride(1), w_scales.stride(2),
            b.stride(0), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, UPCAST=_interpreting(x), DOT_PRECISION="ieee",
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_KH=cfg["MXFP4_BLOCK_K"] // 2,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
    return y


def dequantize_mxfp4_reference(w_blocks: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    """fp32 ``[..., M, Kd]`` from ``w_blocks [..., M, Kd / 2]`` and ``w_scales [..., M, Kd / 32]``."""
    lut = torch.tensor(_FP4_VALUES, dtype=torch.float32, device=w_blocks.device)
    b = w_blocks.to(torch.int64)
    vals = torch.stack([lut[b & 0x0F], lut[b >> 4]], dim=-1).flatten(-2)  # [..., M, Kd]
    return vals * e8m0_scale(w_scales).repeat_interleave(MXFP4_BLOCK, dim=-1)


def e8m0_scale(scales: torch.Tensor) -> torch.Tensor:
    """fp32 values of OCP MX e8m0 scale bytes: ``2 ** (s - 127)``; 0 is ``2 ** -127`` (an fp32 subnormal), 255 is NaN.

    (The checkpoint reader's ``moefleet.core.quant.e8m0_scale`` is the same decode: kernels import nothing of ours.)"""
    s = scales.to(torch.int32)
    bits = torch.where(s == 0, 0x00400000, torch.where(s == 255, 0x7FC00000, s << 23))
    return bits.view(torch.float32)


def mxfp4_grouped_gemm_reference(
    x: torch.Tensor, w_blocks: torch.Tensor, w_scales: torch.Tensor, expert_offsets: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch reference of :func:`mxfp4_grouped_gemm`: dequantize, then a loop over experts in fp32."""
    y = torch.empty((x.shape[0], w_blocks.shape[1]), dtype=x.dtype, device=x.device)
    bounds = expert_offsets.tolist()
    for e in range(w_blocks.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        w = dequantize_mxfp4_reference(w_blocks[e], w_scales[e])
        acc = x[lo:hi].float() @ w.T
        if bias is not None:
            acc = acc + bias[e].float()
        y[lo:hi] = acc.to(x.dtype)
    return y
