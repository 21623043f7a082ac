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
from typing import Any

import torch

from moefleet.kernels.experts import ExpertStack, expert_rows, stack_experts


class MemoryBudgetError(MemoryError):
    """A load would take the worker past its memory budget (slot growth counted with the old stack alive)."""


@dataclass(frozen=True)
class LayerView:
    """What a forward reads: slot stack [C, ...] and which expert sits in which slot."""

    stack: ExpertStack
    slot_of: dict[int, int]
    generation: int


@dataclass
class LayerSlots:
    """Mutable slot state of one layer; callers serialise ``put``/``drop``/``release`` (one loader at a time).

    stack_kwargs: how the stack computes beyond ``gated``/``activation`` (``stack_experts``'s keywords:
    ``quant`` and ``block`` for packed experts, ``swiglu_alpha``/``swiglu_limit``). Float tensors
    are held in ``dtype``; packed values and their scales as stored.
    """

    gated: bool
    activation: str
    device: torch.device
    dtype: torch.dtype
    stack_kwargs: dict[str, Any] = field(default_factory=dict)
    stack: ExpertStack | None = None
    slot_of: dict[int, int] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)
    quarantine: list[tuple[int, int]] = field(default_factory=list)  # (slot, generation it was freed in)
    generation: int = 0

    @property
    def capacity(self) -> int:
        return 0 if self.stack is None else self.stack.num_experts

    def _allocate(self, like: dict[str, torch.Tensor], capacity: int) -> None:
        proto = stack_experts([like], self.gated, self.activation, **self.stack_kwargs).to(dtype=self.dtype)
        new = proto.replace(
            **{n: torch.zeros((capacity, *t.shape[1:]), dtype=t.dtype, device=self.device) for n, t in proto.tensors().items()}
        )
        old = self.stack
        if old is not None:  # growth: the one time every held expert is copied
            n = old.num_experts
            for name, src in old.tensors().items():
                getattr(new, name)[:n].copy_(src)
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

    def slot_bytes(self, like: dict[str, torch.Tensor]) -> int:
        """Bytes one slot of this layer takes (from the stack, or from one expert's tensors)."""
        if self.stack is not None and self.capacity:
            return self.stack.nbytes() // self.capacity
        return stack_experts([like], self.gated, self.activation, **self.stack_kwargs).to(dtype=self.dtype).nbytes()

    def put(self, expert: int, tensors: dict[str, torch.Tensor], room_bytes: int | None = None) -> None:
        """Copy one expert (roles w1, w3, w2, b1, b3, b2; w*_scale when packed) into a free slot.

        room_bytes: memory the worker may still take (its budget less everything
        it reserves, this layer's stack included). Growing the stack doubles it,
        but never past what fits beside the old stack while the copy runs; when
        not even one more slot fits, ``MemoryBudgetError`` (nothing changes).
        """
        if expert in self.slot_of:
            return
        if not self.free:
            want = max(4, 2 * self.capacity)
            if room_bytes is not None:
                fit = max(0, room_bytes) // max(1, self.slot_bytes(tensors))
                want = min(want, fit)
                if want <= self.capacity:
                    raise MemoryBudgetError(
                        f"no room for another slot: {room_bytes} bytes left, a slot stack of {self.capacity + 1} "
                        f"takes {(self.capacity + 1) * self.slot_bytes(tensors)} beside the current one "
                        f"({len(self.quarantine)} freed slots still quarantined)"
                    )
            self._allocate(tensors, want)
        self.free.sort(reverse=True)
        slot = self.free.pop()
        for name, t in expert_rows(tensors, self.gated).items():
            getattr(self.stack, name)[slot].copy_(t)  # copy_ casts float roles to the slot dtype
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
