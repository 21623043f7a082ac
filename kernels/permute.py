"""Token permutation: sort (token, slot) assignments by expert, and back.

The permuted layout is the one data type where dispatch (router, transport)
meets expert compute (worker, kernels): rows of ``x_sorted`` grouped by
expert, with ``expert_offsets[e]:expert_offsets[e + 1]`` the rows of expert e.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    if flat.numel() and int(flat.max()) >= num_experts:
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
