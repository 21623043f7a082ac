"""The routed experts of a MoE layer on the GPU, in five launches and no host synchronisation.

``hidden [T, H]``, ``topk_ids [T, K]``, ``topk_weights [T, K]`` -> ``[T, H]``
(:func:`fused_experts`); nothing is read back to the host, so a decode step
of fixed T can be captured in a CUDA graph:

1. *Alignment*: the T * K slots are grouped by expert (stable; dropped slots
   last) and the tile -> expert maps of both GEMMs are built, all with a fixed
   size set by the shapes. Up to ``ALIGN_KERNEL_MAX_ROWS`` rows one Triton
   program does it (:func:`align_tiles`: one launch instead of about fifteen
   small torch ops, which decode steps feel); above, device-side torch ops
   (:func:`~moefleet.kernels.permute.align`, a stable sort and a binary
   search) do, with the same result bit for bit.
2. The gate/up kernel reads each permuted row straight from ``hidden``
   (``hidden[slot // K]``: the token gather is fused into the GEMM's loads, no
   gathered copy is made) and applies the activation and the gated product in
   its epilogue: ``h [N, F]``.
3. The down kernel computes ``h @ w2[e].T (+ b2[e])``, multiplies each row by
   its routing weight in the epilogue and stores it at its *slot*
   (``t * K + k``), not at its permuted position: ``y [S, T * K, H]`` fp32,
   S > 1 when the launch config splits the reduction over F.
4. The combine kernel sums each token's K slots (and S parts) in a fixed
   order, adds an optional ``extra [T, H]`` (the shared experts) and casts:
   deterministic, no atomics anywhere, so two runs give the same bits.

:func:`fused_experts_reference` is the torch path (and the CPU path's numbers).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .launch_config import MOE_KERNEL_KEYS, check_kernel_config, get_launch_config, moe_config
from .permute import align, check_topk_ids, gather_rows, permute, unpermute
from .triton_moe import (
    ACTIVATIONS,
    _check_bias,
    _check_ffn_weights,
    _check_gemm_operand,
    _check_index,
    _check_same_device,
    _device_name,
    _expert_tile_map,
    _fail,
    _launch_gate_up,
    _launch_grouped_gemm,
    _on_device,
    grouped_ffn_reference,
)

__all__ = ["ALIGN_KERNEL_MAX_ROWS", "align_tiles", "fused_experts", "fused_experts_reference"]

#: Largest N = T * K aligned by the one-program Triton kernel; larger batches
#: use device-side torch ops (there the GEMMs take milliseconds and the
#: single program would be the slower choice).
ALIGN_KERNEL_MAX_ROWS = 1024


@triton.jit
def _align_kernel(
    ids_ptr, slots_ptr, offsets_ptr, tile_expert_a_ptr, tile_row_a_ptr, tile_expert_b_ptr, tile_row_b_ptr,
    N, E, R_A, R_B,
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BM_A: tl.constexpr, BM_B: tl.constexpr, TWO_MAPS: tl.constexpr,
):  # fmt: skip
    """One program: group N slots by expert (stable), write offsets [E + 1] and one or two tile maps.

    Bucket E holds the dropped slots (id -1 or outside [0, E)), sorted last.
    """
    buckets = tl.arange(0, BLOCK_E)
    lanes = tl.arange(0, BLOCK_N)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):  # pass 1: slots per bucket
        i = n0 + lanes
        ok = i < N
        e = tl.load(ids_ptr + i, mask=ok, other=-1).to(tl.int32)
        key = tl.where((e >= 0) & (e < E), e, E)
        hit = (key[:, None] == buckets[None, :]) & ok[:, None]
        counts += tl.sum(hit.to(tl.int32), axis=0)
    starts = tl.cumsum(counts, axis=0) - counts  # [BLOCK_E], exclusive prefix sums: the offsets
    tl.store(offsets_ptr + buckets, starts.to(tl.int64), mask=buckets <= E)

    seen = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):  # pass 2: each slot's row = offset of its bucket + slots before it there
        i = n0 + lanes
        ok = i < N
        e = tl.load(ids_ptr + i, mask=ok, other=-1).to(tl.int32)
        key = tl.where((e >= 0) & (e < E), e, E)
        hit = ((key[:, None] == buckets[None, :]) & ok[:, None]).to(tl.int32)  # [BLOCK_N, BLOCK_E]
        earlier = (key[:, None] == key[None, :]) & (lanes[None, :] < lanes[:, None]) & ok[None, :]
        rank = tl.sum(earlier.to(tl.int32), axis=1)
        row = tl.sum(hit * (starts + seen)[None, :], axis=1) + rank
        tl.store(slots_ptr + row, i.to(tl.int64), mask=ok)
        seen += tl.sum(hit, axis=0)

    _write_tile_map(counts, starts, buckets, E, R_A, tile_expert_a_ptr, tile_row_a_ptr, BLOCK_R, BM_A)
    if TWO_MAPS:
        _write_tile_map(counts, starts, buckets, E, R_B, tile_expert_b_ptr, tile_row_b_ptr, BLOCK_R, BM_B)


@triton.jit
def _write_tile_map(counts, starts, buckets, E, R, tile_expert_ptr, tile_row_ptr, BLOCK_R: tl.constexpr, BM: tl.constexpr):
    """Row tiles of BM rows per expert: tile_expert [R] (-1 past the real tiles), tile_row_start [R]."""
    tiles = tl.where(buckets < E, (counts + BM - 1) // BM, 0)
    tiles_end = tl.cumsum(tiles, axis=0)  # inclusive
    first_row = starts - (tiles_end - tiles) * BM  # row_start = first_row[e] + t * BM
    for r0 in range(0, R, BLOCK_R):
        t = r0 + tl.arange(0, BLOCK_R)
        before = (tiles_end[None, :] <= t[:, None]) & (buckets[None, :] < E)
        expert = tl.sum(before.to(tl.int32), axis=1)  # [BLOCK_R]
        valid = expert < E
        pick = (buckets[None, :] == expert[:, None]).to(tl.int32)
        row_start = tl.sum(pick * first_row[None, :], axis=1) + t * BM
        ok = t < R
        tl.store(tile_expert_ptr + t, tl.where(valid, expert, -1), mask=ok)
        tl.store(tile_row_ptr + t, tl.where(valid, row_start, 0).to(tl.int64), mask=ok)


@triton.jit
def _combine_kernel(
    y_ptr, ids_ptr, extra_ptr, out_ptr,
    H, E, stride_ys, stride_yn, stride_it, stride_ik, stride_et, stride_ot,
    K: tl.constexpr, SPLIT_K: tl.constexpr, HAS_EXTRA: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """out[t] = sum over k, then over parts s, of y[s, t * K + k] (kept slots only) (+ extra[t]).

    One program per (token, BLOCK_H columns); the sum runs in a fixed order, in fp32.
    """
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(K):
        e = tl.load(ids_ptr + t * stride_it + k * stride_ik + tl.zeros((BLOCK_H,), dtype=tl.int64))  # [BLOCK_H], one id
        keep = col_ok & (e >= 0) & (e < E)
        for s in tl.static_range(SPLIT_K):
            v = tl.load(y_ptr + s * stride_ys + (t * K + k) * stride_yn + cols, mask=keep, other=0.0)
            acc += v.to(tl.float32)
    if HAS_EXTRA:
        acc += tl.load(extra_ptr + t * stride_et + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def align_tiles(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    block_m_down: int | None = None,
    *,
    check: bool | None = None,
    use_kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Group the slots of ``topk_ids [U, K]`` by expert and build the GEMMs' tile maps, on the device.

    Returns ``(sorted_slots [U*K] int64, expert_offsets [E + 1] int64, map, map_down)``
    where a map is ``(tile_expert [R] int32, tile_row_start [R] int64)`` for
    ``block_m`` (and ``block_m_down``; the same map when equal or None), as
    :func:`~moefleet.kernels.permute.align` and ``_expert_tile_map`` give them.
    ``use_kernel``: None = the Triton program for N <= ALIGN_KERNEL_MAX_ROWS,
    True/False forces it on/off (tests compare the two).
    """
    num_rows = topk_ids.numel()
    flat = topk_ids.reshape(-1)
    if use_kernel is None:
        use_kernel = num_rows <= ALIGN_KERNEL_MAX_ROWS
    if not use_kernel or num_rows == 0:
        a = align(topk_ids, num_experts, check=check)
        map_up = _expert_tile_map(a.expert_offsets, num_rows, block_m)
        map_down = map_up if block_m_down in (None, block_m) else _expert_tile_map(a.expert_offsets, num_rows, block_m_down)
        return a.sorted_slots, a.expert_offsets, map_up, map_down
    check_topk_ids(flat, num_experts, check)
    device = topk_ids.device
    slots = torch.empty(num_rows, dtype=torch.int64, device=device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=device)
    bms = [block_m] if block_m_down in (None, block_m) else [block_m, block_m_down]
    maps = []
    for bm in bms:
        r = min(num_rows, triton.cdiv(num_rows, bm) + num_experts)
        maps.append((torch.empty(r, dtype=torch.int32, device=device), torch.empty(r, dtype=torch.int64, device=device)))
    map_b = maps[-1]
    block_e = triton.next_power_of_2(num_experts + 1)
    with _on_device(topk_ids):
        _align_kernel[(1,)](
            flat.contiguous(), slots, offsets, maps[0][0], maps[0][1], map_b[0], map_b[1],
            num_rows, num_experts, maps[0][0].numel(), map_b[0].numel(),
            BLOCK_E=block_e, BLOCK_N=min(128, max(16, 8192 // block_e)), BLOCK_R=max(16, min(64, 8192 // block_e)),
            BM_A=bms[0], BM_B=bms[-1], TWO_MAPS=len(bms) == 2, num_warps=8,
        )  # fmt: skip
    return slots, offsets, maps[0], map_b


def _launch_combine(
    y: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, extra: torch.Tensor | None, out: torch.Tensor
) -> None:
    """out [U, H] = fixed-order sum of y [S, U * K, H] over each token's kept slots (+ extra)."""
    cfg = get_launch_config("combine")
    num_tokens, hidden = out.shape
    block_h = min(cfg["BLOCK_H"], triton.next_power_of_2(hidden))
    ex = extra if extra is not None else out  # dummy pointer, never read
    grid = (num_tokens, triton.cdiv(hidden, block_h))
    with _on_device(y):
        _combine_kernel[grid](
            y, topk_ids, ex, out,
            hidden, num_experts, y.stride(0), y.stride(1), topk_ids.stride(0), topk_ids.stride(1),
            ex.stride(0), out.stride(0),
            K=topk_ids.shape[1], SPLIT_K=y.shape[0], HAS_EXTRA=extra is not None, BLOCK_H=block_h,
            num_warps=cfg["num_warps"],
        )  # fmt: skip


def fused_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    gated: bool,
    activation: str,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    token_index: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    check: bool | None = None,
    config: dict[str, dict[str, int]] | None = None,
    config_experts: int | None = None,
) -> torch.Tensor:
    """The routed experts of a MoE layer, weighted and combined: ``[U, H]``.

    ``out[u] = sum_k topk_weights[u, k] * FFN_{topk_ids[u, k]}(x[u]) (+ extra[u])``
    where ``x[u] = hidden[token_index[u]]`` (``hidden[u]`` without token_index).
    Four launches and a few device ops, no host synchronisation (see the
    module docstring): capturable in a CUDA graph for fixed shapes.

    Args:
        hidden: [T, H] fp16, bf16 or fp32.
        topk_ids: [U, K] int64/int32 expert per slot, ``-1`` for a dropped slot.
        topk_weights: [U, K] float, combine weight per slot.
        w13, w2, gated, activation, b13, b2: as in :func:`grouped_ffn`.
        token_index: [U] int or None: the row of ``hidden`` each output row
            reads (a worker's unique tokens of a larger call).
        extra: [U, H] float or None, added in fp32 before the cast (shared experts).
        out_dtype: dtype of the result; default hidden's.
        check: check ids and token_index values; None = on CPU, and on CUDA
            with ``MOEFLEET_KERNEL_DEBUG=1``. Unchecked, ids outside [0, E)
            count as dropped.
        config: launch parameters ``{"gate_up": {...}, "down": {...}}`` to use
            instead of the table's bucket (the tuner's candidates); checked.
        config_experts: the E whose tuned table is looked up (the model layer's
            E); default the E of ``w13``. A worker's weights are a slot stack
            of some of a layer's experts, not the layer.

    Returns:
        [U, H] in ``out_dtype``. The sum over a token's slots runs in slot
        order in fp32: two runs give the same bits.
    """
    _check_gemm_operand("hidden", hidden, 2, "[T, H]")
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        _fail(f"topk_ids must be a 2-D [U, K] tensor, got {getattr(topk_ids, 'shape', type(topk_ids).__name__)}")
    if topk_ids.dtype not in (torch.int64, torch.int32):
        _fail(f"topk_ids must be int64 (or int32), got {topk_ids.dtype}")
    if not isinstance(topk_weights, torch.Tensor) or not topk_weights.is_floating_point():
        _fail("topk_weights must be a floating torch.Tensor [U, K]")
    if topk_weights.shape != topk_ids.shape:
        _fail(f"topk_weights must have topk_ids' shape {list(topk_ids.shape)}, got {list(topk_weights.shape)}")
    num_out, top_k = topk_ids.shape
    num_in, hidden_size = hidden.shape
    num_experts, f_inter = _check_ffn_weights(hidden_size, w13, w2, gated, activation, hidden.dtype)
    _check_same_device(
        hidden, "hidden", topk_ids=topk_ids, topk_weights=topk_weights, w13=w13, w2=w2, b13=b13, b2=b2,
        token_index=token_index, extra=extra,
    )  # fmt: skip
    b13 = _check_bias("b13", b13, (num_experts, w13.shape[1]), "[E, 2F]" if gated else "[E, F]")
    b2 = _check_bias("b2", b2, (num_experts, hidden_size), "[E, H]")
    if token_index is not None:
        token_index = _check_index("token_index", token_index, num_out, num_in, check)
    elif num_out != num_in:
        _fail(f"topk_ids has {num_out} rows but hidden has {num_in}; pass token_index [U] to pick hidden's rows")
    if extra is not None:
        if not isinstance(extra, torch.Tensor) or not extra.is_floating_point():
            _fail("extra must be a floating torch.Tensor [U, H] or None")
        if tuple(extra.shape) != (num_out, hidden_size):
            _fail(f"extra must have shape [U, H] = {[num_out, hidden_size]}, got {list(extra.shape)}")
        extra = extra.contiguous()
    if top_k < 1:
        _fail("topk_ids must have at least one slot per row (K >= 1)")

    out = torch.empty((num_out, hidden_size), dtype=out_dtype or hidden.dtype, device=hidden.device)
    if num_out == 0 or hidden_size == 0:
        return out
    num_rows = num_out * top_k
    x, w13, w2 = hidden.contiguous(), w13.contiguous(), w2.contiguous()
    ids = topk_ids.contiguous()
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()  # [U * K], by slot
    if config is None:
        cfg = moe_config(config_experts or num_experts, f_inter, num_rows, _device_name(x), x.dtype)
    else:
        cfg = {k: check_kernel_config(config.get(k), MOE_KERNEL_KEYS[k], f"config[{k!r}]") for k in MOE_KERNEL_KEYS}
    cfg_up, cfg_down = cfg["gate_up"], cfg["down"]
    slots, offsets, map_up, map_down = align_tiles(ids, num_experts, cfg_up["BLOCK_M"], cfg_down["BLOCK_M"], check=check)

    h = torch.empty((num_rows, f_inter), dtype=x.dtype, device=x.device)  # [N, F], permuted order
    if f_inter > 0:
        _launch_gate_up(
            x, w13, offsets, b13, h, gated, ACTIVATIONS[activation], cfg_up, map_up,
            row_src=slots, row_div=top_k, token_map=token_index,
        )  # fmt: skip
    split_k = cfg_down["SPLIT_K"]
    y = torch.empty((split_k, num_rows, hidden_size), dtype=torch.float32, device=x.device)  # [S, U * K, H] by slot
    _launch_grouped_gemm(h, w2, offsets, b2, y, cfg_down, map_down, split_k=split_k, row_dst=slots, row_weight=weights)
    _launch_combine(y, ids, num_experts, extra, out)
    return out


def fused_experts_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    gated: bool,
    activation: str,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    token_index: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Torch reference of :func:`fused_experts`, and the CPU path's own numbers.

    permute (exact size) -> gather -> per-expert loop -> weighted ``index_add_``
    in fp32 (+ extra in fp32) -> cast: the steps the in-process layer has
    always taken on CPU, in the same order.
    """
    x = hidden if token_index is None else hidden.index_select(0, token_index)
    perm = permute(topk_ids, w13.shape[0])
    y = grouped_ffn_reference(
        gather_rows(x, perm), perm.expert_offsets, w13, w2, gated=gated, activation=activation, b13=b13, b2=b2
    )
    out = unpermute(y, perm, topk_weights, x.shape[0])
    if extra is not None:
        out = out + extra.float()
    return out.to(out_dtype or hidden.dtype)
