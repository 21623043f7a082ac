"""Router scoring: logits -> (top-k expert ids, top-k weights), one function for every family.

The same function serves the router service, the in-process layer and the
tests. It reads its settings from any object with the routing attributes of
``moefleet.core.config.MoELayerSpec`` (duck-typed: ``kernels`` imports
nothing else of the project).

Dropped assignments (capacity overflow) have id ``-1`` and weight ``0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


class RoutingSpec(Protocol):
    num_experts: int
    top_k: int
    scoring: str
    score_correction_bias: bool
    norm_topk_prob: bool
    norm_topk_p: float
    norm_eps: float
    n_group: int
    topk_group: int
    group_score: str
    routed_scaling_factor: float
    capacity: Any


@dataclass(frozen=True)
class Routing:
    """Result of routing T tokens.

    topk_ids: [T, K] int64, expert index per slot, ``-1`` for a dropped slot.
    topk_weights: [T, K] float32, combine weight per slot, 0 for a dropped slot.
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


def gate_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Router logits [T, E] from hidden [T, H] and the gate's weight [E, H] (bias [E]), returned in fp32.

    dtype: the dtype the product is computed in. fp32 (the default) upcasts
    hidden and weight first (DeepSeek, GLM); families whose reference runs the
    gate in the model dtype (Mixtral, Qwen, OLMoE, Llama 4, gpt-oss) pass the
    compute dtype, so that bf16 serving rounds the logits as they do.
    """
    return torch.nn.functional.linear(
        hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    ).float()


def score(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Scores [T, E] (fp32) from logits [T, E]."""
    logits = logits.float()
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"scoring: unknown score function {scoring!r}")


def _group_mask(choice: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """Bool [T, E]: experts inside the ``topk_group`` best groups of each token."""
    t, e = choice.shape
    grouped = choice.view(t, spec.n_group, e // spec.n_group)
    if spec.group_score == "top2_sum":
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    group_idx = group_scores.topk(spec.topk_group, dim=-1).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    return mask.unsqueeze(-1).expand(t, spec.n_group, e // spec.n_group).reshape(t, e)


def _normalize(weights: torch.Tensor, spec: RoutingSpec, clamp: bool) -> torch.Tensor:
    if spec.norm_topk_p == 1.0:
        denom = weights.sum(dim=-1, keepdim=True)
    else:
        denom = torch.norm(weights, p=spec.norm_topk_p, dim=-1, keepdim=True)
    denom = denom + spec.norm_eps
    if clamp:  # every slot of a token may have been dropped
        denom = denom.clamp_min(torch.finfo(weights.dtype).eps)
    return weights / denom


def capacity_keep_mask(
    topk_ids: torch.Tensor, scores: torch.Tensor, capacity: int, priority: str
) -> torch.Tensor:
    """Bool [T, K]: which assignments fit in their expert's capacity.

    Assignments queue per expert, all of slot 0 before any of slot 1, and
    within a slot by token order (``priority='sequence'``) or by descending
    top-1 score (``'probability'``).
    """
    t, k = topk_ids.shape
    e = scores.shape[-1]
    if priority == "probability":
        order = torch.argsort(-scores.max(dim=-1).values, stable=True)
    else:
        order = torch.arange(t, device=topk_ids.device)
    keep = torch.empty_like(topk_ids, dtype=torch.bool)
    filled = torch.zeros(e, dtype=torch.int64, device=topk_ids.device)
    for slot in range(k):
        ids = topk_ids[order, slot]
        onehot = torch.nn.functional.one_hot(ids, e)
        position = (torch.cumsum(onehot, dim=0) - 1 + filled) * onehot
        pos = position.sum(dim=-1)
        keep[order, slot] = pos < capacity
        filled += onehot.sum(dim=0)
    return keep


def route(logits: torch.Tensor, spec: RoutingSpec, correction_bias: torch.Tensor | None = None) -> Routing:
    """Choose K experts per token and their weights.

    logits: [T, E] router logits (any float dtype; computed in fp32).
    correction_bias: [E], added to the scores for choosing only (DeepSeek-V3).
    """
    if logits.dim() != 2 or logits.shape[-1] != spec.num_experts:
        raise ValueError(f"logits: expected [T, {spec.num_experts}], got {list(logits.shape)}")
    scores = score(logits, spec.scoring)
    choice = scores
    if spec.score_correction_bias:
        if correction_bias is None:
            raise ValueError("correction_bias: the spec uses a score correction bias but none was given")
        choice = scores + correction_bias.float()
    if spec.n_group > 1 and spec.topk_group < spec.n_group:
        choice = choice.masked_fill(~_group_mask(choice, spec), float("-inf"))
    topk_ids = choice.topk(spec.top_k, dim=-1).indices
    weights = scores.gather(1, topk_ids)
    cap = spec.capacity
    if cap is None:
        if spec.norm_topk_prob:
            weights = _normalize(weights, spec, clamp=False)
    else:
        if spec.norm_topk_prob and not cap.renormalize_after_drop:
            weights = _normalize(weights, spec, clamp=True)
        capacity = cap.capacity(logits.shape[0], spec.top_k, spec.num_experts)
        keep = capacity_keep_mask(topk_ids, scores, capacity, cap.priority)
        weights = weights * keep
        topk_ids = torch.where(keep, topk_ids, torch.full_like(topk_ids, -1))
        if spec.norm_topk_prob and cap.renormalize_after_drop:
            weights = _normalize(weights, spec, clamp=True)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return Routing(topk_ids=topk_ids, topk_weights=weights)


def expert_token_counts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: [E] int64 (dropped slots not counted)."""
    flat = topk_ids.reshape(-1)
    return torch.bincount(flat[flat >= 0], minlength=num_experts)


__all__ = ["Routing", "RoutingSpec", "gate_logits", "score", "route", "capacity_keep_mask", "expert_token_counts"]
