"""A checkpoint seen through its family: per-layer gate, experts and shared experts.

Loading is lazy and per expert. Every tensor's shape is checked against the
spec derived from ``config.json``; a disagreement names the tensor, the shape
found and the shape expected. Tensors come back as plain ``torch.Tensor``s in
the canonical layout (see ``families``); the components stack them as they
need.

Quantized checkpoints (``quant.py``) come back dequantized by default (to the
dtype asked for, else the checkpoint's ``torch_dtype``), or packed
(``expert(..., packed=True)``: roles ``w1``/``w3``/``w2`` hold fp8 values or
MXFP4 bytes in ``[out, in]`` orientation, ``w1_scale``/``w3_scale``/``w2_scale``
their scales) for the kernels that compute on the packed form.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .checkpoint import Checkpoint, ShapeMismatchError
from .config import MoELayerSpec, ModelSpec, QuantSpec
from .families import Family, TensorRef, family_for
from .quant import MXFP4_BLOCK, QuantReader, quant_spec

# Loading more than this many bytes at once shows a progress bar.
PROGRESS_BYTES = 256 << 20


class MoECheckpoint:
    """Lazy, validated access to the MoE weights of one checkpoint directory."""

    def __init__(self, path: str | Path):
        self.checkpoint = Checkpoint(path)
        self.family: Family = family_for(self.checkpoint.config)
        quant = quant_spec(self.checkpoint.config)
        self.spec: ModelSpec = self.family.spec(self.checkpoint.config).model_copy(update={"quantization": quant})
        self.reader = QuantReader(self.checkpoint, quant)

    @property
    def quant(self) -> QuantSpec | None:
        return self.spec.quantization

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    def layer_spec(self, layer: int) -> MoELayerSpec:
        return self.spec.layer_spec(layer)

    def _read(self, ref: TensorRef, expected: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        self._check_shape(ref, expected)
        return self.reader.read(ref, dtype)

    def _check_shape(self, ref: TensorRef, expected: Sequence[int]) -> None:
        shape = tuple(self.reader.shape(ref.name))
        if ref.expert is not None:
            if not shape or ref.expert >= shape[0]:
                raise ShapeMismatchError(
                    f"{ref.name}: shape {list(shape)} has no expert {ref.expert} (config.json implies more experts)"
                )
            shape = shape[1:]
        if ref.rows is not None:
            if len(shape) != 2 or ref.rows[1] > shape[0]:
                raise ShapeMismatchError(
                    f"{ref.name}: shape {list(shape)} has no rows {ref.rows[0]}:{ref.rows[1]} (config.json implies more experts)"
                )
            shape = (ref.rows[1] - ref.rows[0],) + tuple(shape[1:])
        if ref.cols is not None:
            start, stop, step = ref.cols
            if not shape or stop > shape[-1]:
                raise ShapeMismatchError(
                    f"{ref.name}: shape {list(shape)} has no columns {start}:{stop} (config.json implies a wider tensor)"
                )
            shape = tuple(shape[:-1]) + (len(range(start, stop, step)),)
        want = tuple(expected[::-1]) if ref.transpose else tuple(expected)
        if tuple(shape) != want:
            raise ShapeMismatchError(f"{ref.name}: shape {list(shape)} disagrees with config.json, which implies {list(want)}")

    def gate(self, layer: int) -> dict[str, torch.Tensor]:
        """'weight' [E, H]; 'bias' [E] and 'correction_bias' [E] where the family has them."""
        s = self.layer_spec(layer)
        shapes = {"weight": (s.num_experts, s.hidden_size), "bias": (s.num_experts,), "correction_bias": (s.num_experts,)}
        return {role: self._read(ref, shapes[role]) for role, ref in self.family.gate(layer, self.spec).items()}

    def _expert_shapes(self, s: MoELayerSpec) -> dict[str, tuple[int, ...]]:
        h, f = s.hidden_size, s.intermediate_size
        return {"w1": (f, h), "w3": (f, h), "w2": (h, f), "b1": (f,), "b3": (f,), "b2": (h,)}

    def _dtype(self, dtype: torch.dtype | None) -> torch.dtype | None:
        """Dequantized tensors come in ``dtype``, else the checkpoint's; plain ones as stored unless asked."""
        if dtype is not None or self.quant is None:
            return dtype
        return getattr(torch, self.spec.dtype)

    def packed_form(self, layer: int) -> str | None:
        """'fp8' or 'mxfp4' when the experts of ``layer`` can be handed out packed (``expert(..., packed=True)``); else None."""
        if self.quant is None:
            return None
        refs = self.family.expert(layer, 0, self.spec)
        kinds = {self.reader.packable(refs[r]) for r in ("w1", "w3", "w2") if r in refs}
        return kinds.pop() if len(kinds) == 1 and None not in kinds else None

    def expert(self, layer: int, expert: int, *, dtype: torch.dtype | None = None, packed: bool = False) -> dict[str, torch.Tensor]:
        """Roles 'w1', 'w2' (+ 'w3' gated, + 'b1', 'b2' (+ 'b3' gated) with biases) of one routed expert.

        dtype: dtype of dequantized (and, if given, all float) tensors.
        packed: matrices as stored quantized (see ``packed_form``), with 'w1_scale', 'w3_scale', 'w2_scale'.
        """
        s = self.layer_spec(layer)
        if not 0 <= expert < s.num_experts:
            raise IndexError(f"expert {expert} outside 0..{s.num_experts - 1} of layer {layer}")
        shapes = self._expert_shapes(s)
        refs = self.family.expert(layer, expert, self.spec)
        if packed and self.packed_form(layer) is None:
            raise ValueError(f"layer {layer}: experts are not stored in a packed form (quantization: {self.quant})")
        out = {}
        for role, ref in refs.items():
            if packed and role in ("w1", "w3", "w2"):
                self._check_shape(ref, shapes[role])
                out[role], out[role + "_scale"] = self.reader.read_packed(ref)
            else:
                out[role] = self._read(ref, shapes[role], self._dtype(dtype))
        return out

    def experts(
        self, layer: int, experts: Iterable[int], progress: bool | None = None, *, dtype: torch.dtype | None = None, packed: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        """Several experts of one layer, in the order given."""
        ids = list(experts)
        s = self.layer_spec(layer)
        nbytes = len(ids) * s.expert_params * torch.finfo(getattr(torch, self.spec.dtype)).bits // 8
        if progress is None:
            progress = nbytes >= PROGRESS_BYTES
        if not progress:
            return [self.expert(layer, e, dtype=dtype, packed=packed) for e in ids]
        from rich.progress import Progress

        out = []
        with Progress(transient=True) as bar:
            task = bar.add_task(f"layer {layer}: loading {len(ids)} experts", total=len(ids))
            for e in ids:
                out.append(self.expert(layer, e, dtype=dtype, packed=packed))
                bar.advance(task)
        return out

    def shared(self, layer: int, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Shared experts: 'w1', 'w3' [Fs, H], 'w2' [H, Fs], optionally 'gate' [1, H]; {} if none (dequantized)."""
        s = self.layer_spec(layer)
        fs, h = s.shared_intermediate_size, s.hidden_size
        shapes = {"w1": (fs, h), "w3": (fs, h), "w2": (h, fs), "gate": (1, h)}
        return {role: self._read(ref, shapes[role], self._dtype(dtype)) for role, ref in self.family.shared(layer, self.spec).items()}

    def expert_bytes(self, layer: int, dtype: torch.dtype | str | None = None, packed: bool = False) -> int:
        """Bytes one routed expert of ``layer`` occupies once loaded: dequantized in ``dtype`` (default: the
        checkpoint's), or in its packed form (fp8 values + fp32 block scales, or MXFP4 bytes + exponent bytes)."""
        s = self.layer_spec(layer)
        dt = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or getattr(torch, self.spec.dtype))
        size = torch.finfo(dt).bits // 8
        kind = self.packed_form(layer) if packed else None
        if kind is None:
            return s.expert_params * size
        h, f = s.hidden_size, s.intermediate_size
        mats = [(f, h), (f, h), (h, f)] if s.expert_kind == "gated" else [(f, h), (h, f)]
        total = s.expert_bias_params * size
        for out, inp in mats:
            if kind == "fp8":
                bo, bi = self.quant.weight_block_size
                total += out * inp + 4 * -(-out // bo) * -(-inp // bi)
            else:
                total += out * inp // 2 + out * (inp // MXFP4_BLOCK)
        return total

    def validate(self) -> None:
        """Check that every MoE tensor the spec implies exists with the right shape (reads headers only)."""
        for layer in self.spec.moe_layers:
            s = self.layer_spec(layer)
            refs = list(self.family.gate(layer, self.spec).items()) + list(self.family.shared(layer, self.spec).items())
            for e in range(s.num_experts):
                refs += list(self.family.expert(layer, e, self.spec).items())
            for _, ref in refs:
                self.reader.shape(ref.name)
