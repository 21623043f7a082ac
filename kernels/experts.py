"""Expert FFNs: the stacked weights of a set of experts and the grouped FFN over them.

Two forms, one formula per kind:

- gated (Mixtral, Qwen, DeepSeek, DBRX, GLM, Llama 4, gpt-oss): ``down(act(gate(x)) * up(x))``
  (gpt-oss: biases and the clamped SwiGLU of ``glu.py``); ``w13`` stacks gate
  rows then up rows.
- mlp (Switch, NLLB-MoE): ``fc2(act(fc1(x) + b1)) + b2``.

Weights are float in the compute dtype, or packed (``quant``): fp8 with block
scales or MXFP4, computed by the kernels of ``quant.py``.

``grouped_ffn`` runs Triton kernels on CUDA tensors (or under
``TRITON_INTERPRET=1`` when asked for) and torch references otherwise. Float
experts with a standard activation take the fused grouped FFN
(``triton_moe.grouped_ffn``); the others (clamped SwiGLU, packed weights) run
GEMM -> activation (``glu.py``) -> GEMM, each stage a Triton kernel with its
torch reference.

``moe_experts`` runs a whole routed expert step (gather, FFN, weighted
combine). On the Triton backend, float experts with a standard activation
(:func:`fusable`) take ``fused_moe.fused_experts``: no host synchronisation,
the gather in the first GEMM, a fixed-order combine. Everything else takes the
steps permute -> gather -> ``grouped_ffn`` -> weighted ``index_add_``, whose
numbers on CPU are the CPU path's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from . import fused_moe, triton_moe
from . import glu as glu_ops
from . import quant as quant_ops
from .permute import gather_rows, permute, unpermute

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")


QUANT_KINDS = ("fp8", "mxfp4")


@dataclass
class ExpertStack:
    """Weights of E_local experts, stacked.

    w13: [E, F, H] (mlp) or [E, 2F, H] (gated: gate rows, then up rows).
    w2: [E, H, F].
    b13: [E, F] or [E, 2F] (gated: gate bias, then up bias) or None; b2: [E, H] or None.

    Packed (``quant``): 'fp8' — w13, w2 float8 e4m3, ``w13_scale [E, 2F / bo, ceil(H / bi)]``
    and ``w2_scale [E, ceil(H / bo), ceil(F / bi)]`` fp32, ``block = (bo, bi)``; 'mxfp4' —
    w13 [E, 2F, H / 2], w2 [E, H, F / 2] uint8, ``w13_scale [E, 2F, H / 32]``,
    ``w2_scale [E, H, F / 32]`` uint8 exponents. Biases stay float.
    """

    w13: torch.Tensor
    w2: torch.Tensor
    gated: bool
    activation: str
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    quant: str | None = None
    block: tuple[int, int] | None = None
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    config_experts: int | None = None
    """E of the model's layer, the key of its tuned launch configs; None: the stack's own E. A worker's
    stack holds its slots (4, 8, 16, ... of a layer's E experts): its launch configs are still the layer's."""

    TENSORS = ("w13", "w2", "b13", "b2", "w13_scale", "w2_scale")

    @property
    def num_experts(self) -> int:
        return int(self.w13.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stack's tensors by field name (None fields left out)."""
        return {n: getattr(self, n) for n in self.TENSORS if getattr(self, n) is not None}

    def nbytes(self) -> int:
        """Bytes held: values, scales and biases as stored."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def replace(self, **tensors) -> "ExpertStack":
        return dataclasses.replace(self, **tensors)

    def to(self, device=None, dtype=None) -> "ExpertStack":
        """Moved to ``device``; float weights and biases cast to ``dtype`` (packed values and scales keep theirs)."""

        def mv(name, t):
            if t is None:
                return None
            keep = name in ("w13_scale", "w2_scale") or (self.quant is not None and name in ("w13", "w2"))
            return t.to(device=device) if keep else t.to(device=device, dtype=dtype)

        return self.replace(**{n: mv(n, getattr(self, n)) for n in self.TENSORS})


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
    use_triton = resolve_backend(backend, x_sorted.device) == "triton"
    if stack.quant is None and stack.activation in triton_moe.ACTIVATIONS:
        fn = triton_moe.grouped_ffn if use_triton else triton_moe.grouped_ffn_reference
        kw = {"config_experts": stack.config_experts} if use_triton else {}
        return fn(
            x_sorted,
            expert_offsets,
            stack.w13,
            stack.w2,
            gated=stack.gated,
            activation=stack.activation,
            b13=stack.b13,
            b2=stack.b2,
            **kw,
        )
    h = _project(x_sorted, expert_offsets, stack, "13", use_triton)
    act = glu_ops.glu if use_triton else glu_ops.glu_reference
    h = act(h, stack.activation, stack.gated, stack.swiglu_alpha, stack.swiglu_limit)
    return _project(h, expert_offsets, stack, "2", use_triton)


def _project(x: torch.Tensor, offsets: torch.Tensor, stack: ExpertStack, which: str, use_triton: bool) -> torch.Tensor:
    """One grouped GEMM of the FFN: ``x @ w{which}[e].T + b{which}[e]`` in x's dtype."""
    w, scale, bias = getattr(stack, f"w{which}"), getattr(stack, f"w{which}_scale"), getattr(stack, f"b{which}")
    if stack.quant is None:
        if use_triton:
            return triton_moe.grouped_gemm(x, w, offsets, bias, config_experts=stack.config_experts)
        return triton_moe.grouped_gemm_reference(x, w, offsets, bias)
    if stack.quant == "fp8":
        fn = quant_ops.fp8_grouped_linear if use_triton else quant_ops.fp8_grouped_linear_reference
        return fn(x, w, scale, offsets, stack.block, bias)
    if stack.quant == "mxfp4":
        fn = quant_ops.mxfp4_grouped_gemm if use_triton else quant_ops.mxfp4_grouped_gemm_reference
        return fn(x, w, scale, offsets, bias)
    raise ValueError(f"stack.quant: expected None or one of {QUANT_KINDS}, got {stack.quant!r}")


def packed_supported(kind: str | None, block: tuple[int, int] | None, intermediate_size: int, gated: bool) -> bool:
    """Whether experts stored packed as ``kind`` run packed (a kernel takes that form), rather than dequantized."""
    if kind == "fp8":
        return quant_ops.fp8_packable(block, intermediate_size, gated)
    return kind == "mxfp4"


def packed_kind(checkpoint, layer: int, backend: str) -> str | None:
    """How a worker or layer on ``backend`` ('torch' | 'triton') holds layer ``layer``'s experts: 'fp8' or 'mxfp4'
    packed (a quantized checkpoint whose form a Triton kernel takes), or None: float (dequantized at load).

    checkpoint: a ``moefleet.core.model.MoECheckpoint`` (duck-typed: ``packed_form``, ``quant``, ``layer_spec``).
    """
    if backend != "triton":
        return None
    kind = checkpoint.packed_form(layer)
    spec = checkpoint.layer_spec(layer)
    block = checkpoint.quant.weight_block_size if checkpoint.quant is not None else None
    return kind if packed_supported(kind, block, spec.intermediate_size, spec.expert_kind == "gated") else None


def fusable(stack: ExpertStack) -> bool:
    """Whether ``fused_moe.fused_experts`` computes this stack: float weights and a standard activation."""
    return stack.quant is None and stack.activation in triton_moe.ACTIVATIONS


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
    On the Triton backend a :func:`fusable` stack runs ``fused_moe.fused_experts``
    (gather in the first GEMM's loads, a fixed-order combine: bitwise
    reproducible, no atomics, no host synchronisation). Otherwise the steps:
    permute, gather, :func:`grouped_ffn` on ``backend``, weighted ``index_add_``
    in fp32, ``extra``, cast.
    """
    if resolve_backend(backend, hidden.device) == "triton" and fusable(stack):
        return fused_moe.fused_experts(
            hidden, topk_ids, topk_weights, stack.w13, stack.w2, gated=stack.gated, activation=stack.activation,
            b13=stack.b13, b2=stack.b2, token_index=token_index, extra=extra, out_dtype=out_dtype,
            config_experts=stack.config_experts,
        )  # fmt: skip
    x = hidden if token_index is None else hidden.index_select(0, token_index)
    perm = permute(topk_ids, stack.num_experts)
    y = grouped_ffn(gather_rows(x, perm), perm.expert_offsets, stack, backend)
    out = unpermute(y, perm, topk_weights, x.shape[0])
    if extra is not None:
        out = out + extra.float()
    return out.to(out_dtype or hidden.dtype)


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


def expert_rows(tensors: dict[str, torch.Tensor], gated: bool) -> dict[str, torch.Tensor]:
    """One expert's roles (w1, w3, w2, b1, b3, b2 as in ``moefleet.core.families``; w1_scale, w3_scale,
    w2_scale when packed) as the rows it takes in a stack: 'w13', 'w2', 'b13', 'b2', 'w13_scale', 'w2_scale'."""
    cat = gated and "w3" in tensors
    out = {
        "w13": torch.cat([tensors["w1"], tensors["w3"]], dim=0) if cat else tensors["w1"],
        "w2": tensors["w2"],
    }
    if "b1" in tensors:
        out["b13"] = torch.cat([tensors["b1"], tensors["b3"]], dim=0) if gated and "b3" in tensors else tensors["b1"]
    if "b2" in tensors:
        out["b2"] = tensors["b2"]
    if "w1_scale" in tensors:
        out["w13_scale"] = torch.cat([tensors["w1_scale"], tensors["w3_scale"]], dim=0) if cat else tensors["w1_scale"]
        out["w2_scale"] = tensors["w2_scale"]
    return out


def stack_experts(
    tensors: list[dict[str, torch.Tensor]],
    gated: bool,
    activation: str,
    *,
    quant: str | None = None,
    block: tuple[int, int] | None = None,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    config_experts: int | None = None,
) -> ExpertStack:
    """Stack per-expert tensors (see :func:`expert_rows`) into an ExpertStack.

    quant: None for float roles, or 'fp8' / 'mxfp4' for packed roles (with their scales; ``block`` for fp8).
    config_experts: the model layer's E, which picks the stack's launch configs (``ExpertStack.config_experts``).
    """
    if not tensors:
        raise ValueError("tensors: at least one expert is needed")
    if quant is not None and quant not in QUANT_KINDS:
        raise ValueError(f"quant: expected None or one of {QUANT_KINDS}, got {quant!r}")
    rows = [expert_rows(t, gated) for t in tensors]
    fields = {name: torch.stack([r[name] for r in rows]) for name in rows[0]}
    return ExpertStack(
        gated=gated, activation=activation, quant=quant, block=tuple(block) if block else None,
        swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit, config_experts=config_experts, **fields,
    )


def shared_from_tensors(tensors: dict[str, torch.Tensor], activation: str) -> SharedExperts | None:
    """SharedExperts from roles w1, w3, w2 (+ gate); None for an empty dict."""
    if not tensors:
        return None
    return SharedExperts(
        w13=torch.cat([tensors["w1"], tensors["w3"]], dim=0), w2=tensors["w2"], activation=activation, gate=tensors.get("gate")
    )
