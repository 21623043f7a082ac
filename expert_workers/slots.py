"""Expert weights of one layer in preallocated slots: loading copies one expert, unloading copies nothing.

The grouped kernels take experts stacked ``[C, ...]``. Re-stacking a layer on
every load would copy every expert the worker holds (on a GPU: gigabytes per
rebalance step). Instead each layer keeps a stack with spare slots; a load
writes one expert into a free slot and an unload frees one. The stack grows by
doubling when full (the one copy of everything, rare).

Readers never lock: ``view()`` returns an immutable snapshot (the stack's
tensors and the expert → slot map). A freed slot may still be read by a
forward that took its snapshot before the unload, so it is quarantined until
every forward that started on an older generation has finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moefleet.kernels.experts import ExpertStack


@dataclass(frozen=True)
class LayerView:
    """What a forward reads: slot stack [C, ...] and which expert sits in which slot."""

    stack: ExpertStack
    slot_of: dict[int, int]
    generation: int


@dataclass
class LayerSlots:
    """Mutable slot state of one layer; callers serialise ``put``/``drop``/``release`` (one loader at a time)."""

    gated: bool
    activation: str
    device: torch.device
    dtype: torch.dtype
    stack: ExpertStack | None = None
    slot_of: dict[int, int] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)
    quarantine: list[tuple[int, int]] = field(default_factory=list)  # (slot, generation it was freed in)
    generation: int = 0

    @property
    def capacity(self) -> int:
        return 0 if self.stack is None else self.stack.num_experts

    def _allocate(self, like: dict[str, torch.Tensor], capacity: int) -> None:
        def buf(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.zeros((capacity, *t.shape), dtype=self.dtype, device=self.device)

        w13 = torch.cat([like["w1"], like["w3"]]) if self.gated else like["w1"]
        new = ExpertStack(buf(w13), buf(like["w2"]), self.gated, self.activation, buf(like.get("b1")), buf(like.get("b2")))
        old = self.stack
        if old is not None:  # growth: the one time every held expert is copied
            n = old.num_experts
            for name in ("w13", "w2", "b13", "b2"):
                src, dst = getattr(old, name), getattr(new, name)
                if src is not None:
                    dst[:n].copy_(src)
        self.free.extend(range(self.capacity, capacity))
        self.stack = new

    def release(self, oldest_running_generation: int | None) -> None:
        """Free quarantined slots no running forward can still read."""
        keep = []
        for slot, gen in self.quarantine:
            if oldest_running_generation is None or oldest_running_generation >= gen:
                self.free.append(slot)
            else:
                keep.append((slot, gen))
        self.quarantine = keep

    def put(self, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy one expert (roles w1, w3, w2, b1, b2) into a free slot."""
        if expert in self.slot_of:
            return
        if not self.free:
            self._allocate(tensors, max(4, 2 * self.capacity))
        self.free.sort(reverse=True)
        slot = self.free.pop()
        s = self.stack
        if self.gated:
            f = tensors["w1"].shape[0]
            s.w13[slot, :f].copy_(tensors["w1"])
            s.w13[slot, f:].copy_(tensors["w3"])
        else:
            s.w13[slot].copy_(tensors["w1"])
        s.w2[slot].copy_(tensors["w2"])
        if s.b13 is not None:
            s.b13[slot].copy_(tensors["b1"])
        if s.b2 is not None:
            s.b2[slot].copy_(tensors["b2"])
        self.slot_of[expert] = slot

    def drop(self, expert: int) -> None:
        """Free an expert's slot (quarantined until older forwards finish)."""
        slot = self.slot_of.pop(expert, None)
        if slot is None:
            return
        self.generation += 1
        self.quarantine.append((slot, self.generation))

    def view(self) -> LayerView:
        return LayerView(self.stack, dict(self.slot_of), self.generation)

    def nbytes(self) -> tuple[int, int]:
        """(bytes of the experts held, bytes reserved including free slots)."""
        if self.stack is None:
            return 0, 0
        total = self.stack.nbytes()
        return total * len(self.slot_of) // self.capacity, total
