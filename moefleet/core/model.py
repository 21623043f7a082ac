"""A checkpoint seen through its family: per-layer gate, experts and shared experts.

Loading is lazy and per expert. Every tensor's shape is checked against the
spec derived from ``config.json``; a disagreement names the tensor, the shape
found and the shape expected. Tensors come back as plain ``torch.Tensor``s in
the canonical layout (see ``families``); the components stack them as they
need.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .checkpoint import Checkpoint, ShapeMismatchError
from .config import MoELayerSpec, ModelSpec
from .families import Family, TensorRef, family_for

# Loading more than this many bytes at once shows a progress bar.
PROGRESS_BYTES = 256 << 20


class MoECheckpoint:
    """Lazy, validated access to the MoE weights of one checkpoint directory."""

    def __init__(self, path: str | Path):
        self.checkpoint = Checkpoint(path)
        self.family: Family = family_for(self.checkpoint.config)
        self.spec: ModelSpec = self.family.spec(self.checkpoint.config)

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    def layer_spec(self, layer: int) -> MoELayerSpec:
        return self.spec.layer_spec(layer)

    def _read(self, ref: TensorRef, expected: Sequence[int]) -> torch.Tensor:
        shape = self.checkpoint.shape(ref.name)
        if ref.rows is not None:
            if len(shape) != 2 or ref.rows[1] > shape[0]:
                raise ShapeMismatchError(
                    f"{ref.name}: shape {list(shape)} has no rows {ref.rows[0]}:{ref.rows[1]} (config.json implies more experts)"
                )
            shape = (ref.rows[1] - ref.rows[0],) + tuple(shape[1:])
        want = tuple(expected[::-1]) if ref.transpose else tuple(expected)
        if tuple(shape) != want:
            raise ShapeMismatchError(f"{ref.name}: shape {list(shape)} disagrees with config.json, which implies {list(want)}")
        t = self.checkpoint.read(ref.name, ref.rows)
        return t.t().contiguous() if ref.transpose else t

    def gate(self, layer: int) -> dict[str, torch.Tensor]:
        """'weight' [E, H]; 'bias' [E] and 'correction_bias' [E] where the family has them."""
        s = self.layer_spec(layer)
        shapes = {"weight": (s.num_experts, s.hidden_size), "bias": (s.num_experts,), "correction_bias": (s.num_experts,)}
        return {role: self._read(ref, shapes[role]) for role, ref in self.family.gate(layer, self.spec).items()}

    def _expert_shapes(self, s: MoELayerSpec) -> dict[str, tuple[int, ...]]:
        h, f = s.hidden_size, s.intermediate_size
        return {"w1": (f, h), "w3": (f, h), "w2": (h, f), "b1": (f,), "b2": (h,)}

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Roles 'w1', 'w2' (+ 'w3' gated, + 'b1', 'b2' with biases) of one routed expert."""
        s = self.layer_spec(layer)
        if not 0 <= expert < s.num_experts:
            raise IndexError(f"expert {expert} outside 0..{s.num_experts - 1} of layer {layer}")
        shapes = self._expert_shapes(s)
        return {role: self._read(ref, shapes[role]) for role, ref in self.family.expert(layer, expert, self.spec).items()}

    def experts(self, layer: int, experts: Iterable[int], progress: bool | None = None) -> list[dict[str, torch.Tensor]]:
        """Several experts of one layer, in the order given."""
        ids = list(experts)
        s = self.layer_spec(layer)
        nbytes = len(ids) * s.expert_params * torch.finfo(getattr(torch, self.spec.dtype)).bits // 8
        if progress is None:
            progress = nbytes >= PROGRESS_BYTES
        if not progress:
            return [self.expert(layer, e) for e in ids]
        from rich.progress import Progress

        out = []
        with Progress(transient=True) as bar:
            task = bar.add_task(f"layer {layer}: loading {len(ids)} experts", total=len(ids))
            for e in ids:
                out.append(self.expert(layer, e))
                bar.advance(task)
        return out

    def shared(self, layer: int) -> dict[str, torch.Tensor]:
        """Shared experts: 'w1', 'w3' [Fs, H], 'w2' [H, Fs], optionally 'gate' [1, H]; {} if none."""
        s = self.layer_spec(layer)
        fs, h = s.shared_intermediate_size, s.hidden_size
        shapes = {"w1": (fs, h), "w3": (fs, h), "w2": (h, fs), "gate": (1, h)}
        return {role: self._read(ref, shapes[role]) for role, ref in self.family.shared(layer, self.spec).items()}

    def validate(self) -> None:
        """Check that every MoE tensor the spec implies exists with the right shape (reads headers only)."""
        for layer in self.spec.moe_layers:
            s = self.layer_spec(layer)
            refs = list(self.family.gate(layer, self.spec).items()) + list(self.family.shared(layer, self.spec).items())
            for e in range(s.num_experts):
                refs += list(self.family.expert(layer, e, self.spec).items())
            for _, ref in refs:
                self.checkpoint.shape(ref.name)
