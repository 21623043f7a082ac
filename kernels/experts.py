"""Expert FFNs: the stacked weights of a set of experts and the grouped FFN over them.

Two forms, one formula per kind:

- gated (Mixtral, Qwen2-MoE, DeepSeek, DBRX): ``down(act(gate(x)) * up(x))``;
  ``w13`` stacks gate rows then up rows.
- mlp (Switch, NLLB-MoE): ``fc2(act(fc1(x) + b1)) + b2``.

``grouped_ffn`` runs the Triton kernel on CUDA tensors (or under
``TRITON_INTERPRET=1`` when asked for) and the torch reference otherwise;
``moe_experts`` runs a whole routed expert step (gather, FFN, weighted
combine): on the Triton backend the fused, host-synchronisation-free
``fused_moe.fused_experts``, on the torch backend the reference steps, whose
numbers are the CPU path's.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from . import fused_moe, triton_moe

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")


@dataclass
class ExpertStack:
    """Weights of E_local experts, stacked.

    w13: [E, F, H] (mlp) or [E, 2F, H] (gated: gate rows, then up rows).
    w2: [E, H, F].
    b13: [E, F] or None; b2: [E, H] or None.
    """

    w13: torch.Tensor
    w2: torch.Tensor
    gated: bool
    activation: str
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return int(self.w13.shape[0])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w13, self.w2, self.b13, self.b2) if t is not None)

    def to(self, device=None, dtype=None) -> "ExpertStack":
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return ExpertStack(mv(self.w13), mv(self.w2), self.gated, self.activation, mv(self.b13), mv(self.b2))


def resolve_backend(backend: str, device: torch.device) -> str:
    """'torch' or 'triton' for tensors on ``device``; raises on an impossible request."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return backend


def grouped_ffn(x_sorted: torch.Tensor, expert_offsets: torch.Tensor, stack: ExpertStack, backend: str = "auto") -> torch.Tensor:
    """Expert outputs for permuted rows: x_sorted [N, H] -> [N, H]."""
    fn = triton_moe.grouped_ffn if resolve_backend(backend, x_sorted.device) == "triton" else triton_moe.grouped_ffn_reference
    return fn(
        x_sorted,
        expert_offsets,
        stack.w13,
        stack.w2,
        gated=stack.gated,
        activation=stack.activation,
        b13=stack.b13,
        b2=stack.b2,
    )


def moe_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    stack: ExpertStack,
    backend: str = "auto",
    *,
    token_index: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weighted sum of each row's K experts: hidden [T, H], topk [U, K] -> [U, H].

    token_index: [U] rows of ``hidden`` (default: U = T, row u is hidden[u]).
    extra: [U, H] added in fp32 before the cast to ``out_dtype`` (default hidden's).
    The Triton backend gathers in the first GEMM's loads and combines in a
    fixed order (bitwise reproducible, no atomics, no host synchronisation).
    """
    kwargs = {
        "gated": stack.gated,
        "activation": stack.activation,
        "b13": stack.b13,
        "b2": stack.b2,
        "token_index": token_index,
        "extra": extra,
        "out_dtype": out_dtype,
    }
    if resolve_backend(backend, hidden.device) == "triton":
        return fused_moe.fused_experts(hidden, topk_ids, topk_weights, stack.w13, stack.w2, **kwargs)
    return fused_moe.fused_experts_reference(hidden, topk_ids, topk_weights, stack.w13, stack.w2, **kwargs)


@dataclass
class SharedExperts:
    """Shared experts, applied to every token: one gated MLP (several shared experts concatenated).

    w13: [2Fs, H] (gate rows, then up rows); w2: [H, Fs]; gate: [1, H] or None (sigmoid gate).
    """

    w13: torch.Tensor
    w2: torch.Tensor
    activation: str
    gate: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g, u = torch.nn.functional.linear(x, self.w13).chunk(2, dim=-1)
        out = torch.nn.functional.linear(triton_moe.activation_reference(g, self.activation) * u, self.w2)
        if self.gate is not None:
            out = torch.sigmoid(torch.nn.functional.linear(x, self.gate)) * out
        return out

    def to(self, device=None, dtype=None) -> "SharedExperts":
        return SharedExperts(
            self.w13.to(device=device, dtype=dtype),
            self.w2.to(device=device, dtype=dtype),
            self.activation,
            None if self.gate is None else self.gate.to(device=device, dtype=dtype),
        )


def stack_experts(tensors: list[dict[str, torch.Tensor]], gated: bool, activation: str) -> ExpertStack:
    """Stack per-expert tensors (roles w1, w3, w2, b1, b2 as in ``moefleet.core.families``) into an ExpertStack."""
    if not tensors:
        raise ValueError("tensors: at least one expert is needed")
    if gated:
        w13 = torch.stack([torch.cat([t["w1"], t["w3"]], dim=0) for t in tensors])
    else:
        w13 = torch.stack([t["w1"] for t in tensors])
    w2 = torch.stack([t["w2"] for t in tensors])
    b13 = torch.stack([t["b1"] for t in tensors]) if "b1" in tensors[0] else None
    b2 = torch.stack([t["b2"] for t in tensors]) if "b2" in tensors[0] else None
    return ExpertStack(w13=w13, w2=w2, gated=gated, activation=activation, b13=b13, b2=b2)


def shared_from_tensors(tensors: dict[str, torch.Tensor], activation: str) -> SharedExperts | None:
    """SharedExperts from roles w1, w3, w2 (+ gate); None for an empty dict."""
    if not tensors:
        return None
    return SharedExperts(
        w13=torch.cat([tensors["w1"], tensors["w3"]], dim=0), w2=tensors["w2"], activation=activation, gate=tensors.get("gate")
    )
