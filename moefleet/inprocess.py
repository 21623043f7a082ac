"""``MoEModel``: a checkpoint's MoE layers computed in this process."""

from __future__ import annotations

from pathlib import Path

import torch

from moefleet.core.config import ModelSpec
from moefleet.core.default_model import default_model_dir
from moefleet.core.model import MoECheckpoint
from moefleet.kernels.experts import packed_kind, resolve_backend, shared_from_tensors, stack_experts
from moefleet.kernels.layer import GateWeights, MoELayer, gate_dtype


class MoEModel:
    """The MoE layers of a Hugging Face-format checkpoint.

    ``layer(i)`` is a callable ``hidden [T, H] -> output [T, H]`` equal to the
    family's MoE block; pass ``return_routing=True`` for the chosen expert ids
    and weights as well. Layers load lazily, on first use.
    """

    def __init__(self, checkpoint: MoECheckpoint, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, backend: str = "auto"):
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.dtype = dtype
        self.backend = backend
        self._layers: dict[int, MoELayer] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "MoEModel":
        return cls(MoECheckpoint(path), **kwargs)

    @classmethod
    def default(cls, **kwargs) -> "MoEModel":
        """The built-in default model (DeepSeek-V3-style, seeded random weights)."""
        return cls.from_pretrained(default_model_dir(), **kwargs)

    @property
    def spec(self) -> ModelSpec:
        return self.checkpoint.spec

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return self.spec.moe_layers

    def layer(self, i: int) -> MoELayer:
        if i not in self._layers:
            self._layers[i] = build_layer(self.checkpoint, i, device=self.device, dtype=self.dtype, backend=self.backend)
        return self._layers[i]


def build_layer(ckpt: MoECheckpoint, i: int, *, device=None, dtype=None, backend: str = "auto") -> MoELayer:
    """A ``MoELayer`` with every expert of layer ``i`` loaded.

    Quantized experts are dequantized to ``dtype`` (default: the checkpoint's
    ``torch_dtype``), or kept packed where the Triton path has a kernel for them.
    """
    spec = ckpt.layer_spec(i)
    compute = dtype or getattr(torch, ckpt.spec.dtype)
    kind = packed_kind(ckpt, i, resolve_backend(backend, torch.device(device or "cpu")))
    gate = GateWeights(**ckpt.gate(i), dtype=gate_dtype(spec, compute)).to(device)
    experts = stack_experts(
        ckpt.experts(i, range(spec.num_experts), dtype=dtype, packed=kind is not None),
        spec.expert_kind == "gated", spec.activation, quant=kind,
        block=ckpt.quant.weight_block_size if kind == "fp8" else None,
        swiglu_alpha=spec.swiglu_alpha, swiglu_limit=spec.swiglu_limit,
    )
    shared = shared_from_tensors(ckpt.shared(i, dtype=dtype), spec.activation)
    experts = experts.to(device=device, dtype=dtype)
    shared = None if shared is None else shared.to(device=device, dtype=dtype)
    return MoELayer(spec, gate, experts, shared, backend=backend)
