"""Token permutation: sort (token, slot) assignments by expert, and back.

The permuted layout is the one data type where dispatch (router, transport)
meets expert compute (worker, kernels): rows of ``x_sorted`` grouped by
expert, with ``expert_offsets[e]:expert_offsets[e + 1]`` the rows of expert e.

Two forms of it:

- :func:`permute` cuts the batch to the N rows actually kept (dropped slots
  removed). Its size depends on the routing, so on CUDA it reads a count back
  to the host; it serves host-side paths (the router's dispatch, the torch
  layer on CPU), whose numbers it defines.
- :func:`align` keeps a fixed size, ``T * K`` rows with the dropped slots
  sorted last, beyond ``expert_offsets[E]``: made of device ops only, with no
  device-to-host copy, so the CUDA path runs without host synchronisation and
  can be captured in a CUDA graph for a fixed batch size.

:func:`rows_to_topk` turns a worker's rows (grouped by expert, with a
destination row each) back into the ``[U, K]`` top-k form the fused expert
kernel takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checks import check_values


@dataclass(frozen=True)
class Permutation:
    """Where each permuted row comes from.

    token_index: [N] int64, source token of each permuted row.
    slot_index: [N] int64, flat index ``t * K + k`` of the assignment.
    expert_offsets: [E + 1] int64, row ranges per expert (prefix sums of counts).
    """

    token_index: torch.Tensor
    slot_index: torch.Tensor
    expert_offsets: torch.Tensor

    @property
    def num_rows(self) -> int:
        return int(self.token_index.shape[0])

    def counts(self) -> torch.Tensor:
        """[E] rows per expert."""
        return self.expert_offsets[1:] - self.expert_offsets[:-1]


def permute(topk_ids: torch.Tensor, num_experts: int) -> Permutation:
    """Group assignments by expert. topk_ids: [T, K], ``-1`` marks a dropped slot."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids: expected [T, K], got {list(topk_ids.shape)}")
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    if flat.numel() and check_values(flat) and int(flat.max()) >= num_experts:
        raise ValueError(f"topk_ids: expert id {int(flat.max())} >= num_experts {num_experts}")
    keyed = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(keyed, stable=True)
    counts = torch.bincount(keyed, minlength=num_experts + 1)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=topk_ids.device)
    torch.cumsum(counts, dim=0, out=offsets[1:])
    n = int(offsets[-1])
    slot_index = order[:n]
    return Permutation(token_index=slot_index // k, slot_index=slot_index, expert_offsets=offsets)


def gather_rows(hidden: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """x_sorted [N, H] from hidden [T, H]."""
    return hidden.index_select(0, perm.token_index)


def row_weights(topk_weights: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """[N] fp32: the routed weight of each permuted row (topk_weights [T, K])."""
    return topk_weights.reshape(-1).index_select(0, perm.slot_index).float()


def scale_rows(x_sorted: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each row times its weight (x_sorted [N, H], weights [N]), in fp32, back in x's dtype.

    For families that weight an expert's *input* (Llama 4); their outputs are
    then combined unweighted.
    """
    return (x_sorted.float() * weights[:, None].float()).to(x_sorted.dtype)


def unpermute(
    y_sorted: torch.Tensor, perm: Permutation, topk_weights: torch.Tensor | None, num_tokens: int
) -> torch.Tensor:
    """Weighted combine: out[t] = sum over t's rows of w * y (w = 1 with ``topk_weights=None``). y_sorted [N, H] -> out [T, H] (fp32)."""
    out = torch.zeros(num_tokens, y_sorted.shape[-1], dtype=torch.float32, device=y_sorted.device)
    if perm.num_rows:
        y = y_sorted.float()
        if topk_weights is not None:
            y = y * row_weights(topk_weights, perm)[:, None]
        out.index_add_(0, perm.token_index, y)
    return out


@dataclass(frozen=True)
class Alignment:
    """The fixed-size permuted layout of a ``[T, K]`` routing (see :func:`align`).

    sorted_slots: [T * K] int64, flat slot ``t * K + k`` of each permuted row:
        kept slots grouped by expert (ascending; slot order within an expert),
        then the dropped slots.
    expert_offsets: [E + 1] int64, rows of expert e are
        ``expert_offsets[e]:expert_offsets[e + 1]``; ``expert_offsets[E]`` is
        the number of kept slots (rows past it belong to no expert).
    """

    sorted_slots: torch.Tensor
    expert_offsets: torch.Tensor


def check_topk_ids(flat: torch.Tensor, num_experts: int, check: bool | None = None) -> None:
    """Raise ``ValueError`` for ids outside ``{-1} | [0, E)`` when values are checked (see ``checks``)."""
    if flat.numel() and check_values(flat, check):
        bad = (flat < -1) | (flat >= num_experts)
        if bool(bad.any()):
            raise ValueError(
                f"topk_ids: expert ids must be -1 (dropped) or in [0, {num_experts}), got {flat[bad][:8].tolist()}"
            )


def align(topk_ids: torch.Tensor, num_experts: int, *, check: bool | None = None) -> Alignment:
    """Group the slots of ``topk_ids [T, K]`` by expert without leaving the device.

    Slots with id ``-1`` are dropped. Ids outside ``[0, E)`` raise ``ValueError``
    when checked (always on CPU, on CUDA with ``MOEFLEET_KERNEL_DEBUG=1`` or
    ``check=True``: a device-to-host copy); unchecked, they are dropped like
    ``-1``. Device ops only otherwise: a stable sort of the expert keys and a
    binary search for the offsets (no ``bincount``, whose CUDA version reads
    its maximum back to the host).
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids: expected [T, K], got {list(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_ids: expected int64 or int32, got {topk_ids.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts: expected >= 1, got {num_experts}")
    flat = topk_ids.reshape(-1).to(torch.int64)
    check_topk_ids(flat, num_experts, check)
    dropped = (flat < 0) | (flat >= num_experts)
    keyed = torch.where(dropped, torch.full_like(flat, num_experts), flat)  # [T*K]
    sorted_keys, order = torch.sort(keyed, stable=True)
    bounds = torch.arange(num_experts + 1, device=flat.device, dtype=torch.int64)
    offsets = torch.searchsorted(sorted_keys, bounds)  # [E + 1]: first row with key >= e
    return Alignment(sorted_slots=order, expert_offsets=offsets)


def rows_to_topk(
    row_expert: np.ndarray, row_weight: np.ndarray, row_dest: np.ndarray, num_dest: int
) -> tuple[np.ndarray, np.ndarray]:
    """A worker's rows -> the top-k form ``(ids [U, Kmax], weights [U, Kmax])``.

    Args:
        row_expert: [N] int, expert (local slot) of each row.
        row_weight: [N] float, combine weight of each row.
        row_dest: [N] int in [0, U), output row (unique token) of each row.
        num_dest: U.
    Returns:
        ids: [U, Kmax] int64, each destination's experts in row order, ``-1``
            padding (Kmax = most rows of one destination, at least 1).
        weights: [U, Kmax] float32, 0 on padding.
    Host-side (numpy): the rows arrive from the router as arrays.
    """
    row_expert = np.asarray(row_expert, dtype=np.int64)
    row_dest = np.asarray(row_dest, dtype=np.int64)
    row_weight = np.asarray(row_weight, dtype=np.float32)
    if not (row_expert.shape == row_dest.shape == row_weight.shape) or row_expert.ndim != 1:
        raise ValueError(
            f"rows_to_topk: row_expert, row_weight, row_dest must be [N] alike, got "
            f"{row_expert.shape}, {row_weight.shape}, {row_dest.shape}"
        )
    if row_dest.size and (row_dest.min() < 0 or row_dest.max() >= num_dest):
        raise ValueError(f"rows_to_topk: row_dest must lie in [0, {num_dest})")
    counts = np.bincount(row_dest, minlength=num_dest)
    kmax = max(1, int(counts.max()) if counts.size else 1)
    order = np.argsort(row_dest, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - np.repeat(starts, counts)
    ids = np.full((num_dest, kmax), -1, dtype=np.int64)
    weights = np.zeros((num_dest, kmax), dtype=np.float32)
    ids[row_dest, rank] = row_expert
    weights[row_dest, rank] = row_weight
    return ids, weights
