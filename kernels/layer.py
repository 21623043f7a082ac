"""The in-process MoE layer: gate -> route -> permute -> grouped experts -> combine (+ shared).

A layer object owns weights; the kernels it calls are stateless.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .experts import ExpertStack, SharedExperts, grouped_ffn, moe_experts, resolve_backend
from .permute import gather_rows, permute, row_weights, scale_rows, unpermute
from .routing import Routing, RoutingSpec, gate_logits, route

log = logging.getLogger(__name__)


@dataclass
class GateWeights:
    """Router weights. weight: [E, H]; bias: [E] or None; correction_bias: [E] or None (choice only).

    dtype: the dtype the logits are computed in (fp32, or the compute dtype for
    families whose gate runs in the model dtype: see ``gate_dtype``).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    correction_bias: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, E] fp32."""
        return gate_logits(hidden, self.weight, self.bias, self.dtype)

    def to(self, device=None) -> "GateWeights":
        def mv(t):
            return None if t is None else t.to(device=device)

        return GateWeights(mv(self.weight), mv(self.bias), mv(self.correction_bias), self.dtype)


def gate_dtype(spec, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer's router logits are computed in: fp32, or ``compute_dtype`` when the spec's
    ``gate_precision`` is 'input' (the family's reference runs its gate in the model dtype)."""
    return compute_dtype if getattr(spec, "gate_precision", "float32") == "input" else torch.float32


def fused_route(logits: torch.Tensor, spec: RoutingSpec, gate: GateWeights, backend: str) -> Routing:
    """Route with the fused Triton top-k kernel where the spec allows it, else the torch router.

    The fused kernel covers softmax/sigmoid scoring, correction bias, plain-sum
    renormalisation and scaling. Group-limited and capacity routing always run
    the torch router (on the same device).
    """
    from . import triton_moe

    simple = (
        spec.capacity is None
        and (spec.n_group == 1 or spec.topk_group == spec.n_group)
        and spec.norm_topk_p == 1.0
    )
    if backend == "triton" and simple:
        ids, weights = triton_moe.fused_topk(
            logits,
            spec.top_k,
            scoring=spec.scoring,
            renormalize=spec.norm_topk_prob,
            bias=gate.correction_bias if spec.score_correction_bias else None,
            scaling=spec.routed_scaling_factor,
        )
        return Routing(topk_ids=ids, topk_weights=weights)
    return route(logits, spec, gate.correction_bias)


def combine_shared(routed: torch.Tensor, hidden: torch.Tensor, shared: SharedExperts | None) -> torch.Tensor:
    """routed [T, H] fp32 + shared(hidden) -> [T, H] in hidden's dtype."""
    if shared is not None:
        routed = routed + shared(hidden).float()
    return routed.to(hidden.dtype)


class MoELayer:
    """One MoE block, computed in process: ``hidden [T, H] -> output [T, H]``.

    spec: an object with the attributes of ``MoELayerSpec``.
    backend: 'auto' (Triton on CUDA, torch on CPU), 'torch' or 'triton'.

    On the Triton backend a call with fused routing (softmax/sigmoid top-k,
    no groups or capacity) and fusable experts (float weights, a standard
    activation, routed weights on the output) makes no host synchronisation,
    so a decode step of fixed T can be captured in a CUDA graph. Group-limited
    and capacity routing run the torch router; packed (fp8, MXFP4) or
    clamped-SwiGLU experts and input-weighted layers (Llama 4) run the
    stepwise path (permute, grouped FFN, ``index_add_``).
    """

    def __init__(
        self,
        spec,
        gate: GateWeights,
        experts: ExpertStack,
        shared: SharedExperts | None = None,
        backend: str = "auto",
    ):
        if experts.num_experts != spec.num_experts:
            raise ValueError(f"experts: {experts.num_experts} given, spec has {spec.num_experts}")
        self.spec = spec
        self.gate = gate
        self.experts = experts
        self.shared = shared
        self.backend = resolve_backend(backend, experts.w13.device)
        log.info(
            "MoE layer runs the %s path on %s (%s experts)", self.backend, experts.w13.device, experts.quant or "float"
        )

    def route(self, hidden: torch.Tensor, router_logits: torch.Tensor | None = None) -> Routing:
        logits = self.gate.logits(hidden) if router_logits is None else router_logits
        return fused_route(logits, self.spec, self.gate, self.backend)

    def __call__(
        self,
        hidden: torch.Tensor,
        *,
        router_logits: torch.Tensor | None = None,
        return_routing: bool = False,
    ):
        """hidden: [T, H]. Returns output [T, H], or (output, Routing) with ``return_routing``."""
        if hidden.dim() != 2 or hidden.shape[-1] != self.spec.hidden_size:
            raise ValueError(f"hidden: expected [T, {self.spec.hidden_size}], got {list(hidden.shape)}")
        routing = self.route(hidden, router_logits)
        if getattr(self.spec, "routed_weight_on", "output") == "input":  # Llama 4: the weight scales the input
            perm = permute(routing.topk_ids, self.spec.num_experts)
            x = scale_rows(gather_rows(hidden, perm), row_weights(routing.topk_weights, perm))
            y = grouped_ffn(x, perm.expert_offsets, self.experts, self.backend)
            out = combine_shared(unpermute(y, perm, None, hidden.shape[0]), hidden, self.shared)
        else:
            # Shared experts join the routed sum in fp32 before the cast to hidden's dtype
            # (inside the combine kernel on the fused Triton path).
            shared = self.shared(hidden) if self.shared is not None else None
            out = moe_experts(hidden, routing.topk_ids, routing.topk_weights, self.experts, self.backend, extra=shared)
        return (out, routing) if return_routing else out
