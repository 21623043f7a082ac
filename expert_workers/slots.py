"""Expert weights of one layer in preallocated slots: loading copies one expert, unloading copies nothing.

The grouped kernels take experts stacked ``[C, ...]``. Re-stacking a layer on
every load would copy every expert the worker holds (on a GPU: gigabytes per
rebalance step). Instead each layer keeps a stack with spare slots; a load
writes one expert into a free slot and an unload frees one. The stack grows by
doubling when full (the one copy of everything, rare), less where the worker's
memory budget does not hold the double; it shrinks when unloads empty it
(freed at once when no expert is left, compacted to twice what it holds when
that falls to a quarter of its slots).

Memory is counted as the planner counts it: the bytes of the experts held.
A load is refused only when the experts held would pass the worker's budget;
spare slots, quarantined ones and the old stack alive while a growth copies
live in the headroom the planner leaves free of experts.

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

    def _empty_stack(self, proto: ExpertStack, capacity: int) -> ExpertStack:
        try:
            return proto.replace(
                **{n: torch.zeros((capacity, *t.shape[1:]), dtype=t.dtype, device=self.device) for n, t in proto.tensors().items()}
            )
        except torch.OutOfMemoryError as e:  # the device itself has no room for the stack beside what it holds
            raise MemoryBudgetError(f"no room on {self.device} for a slot stack of {capacity}: {e}") from e

    def _allocate(self, like: dict[str, torch.Tensor], capacity: int) -> None:
        proto = self.stack
        if proto is None:
            proto = stack_experts([like], self.gated, self.activation, **self.stack_kwargs).to(dtype=self.dtype)
        new = self._empty_stack(proto, capacity)
        old = self.stack
        if old is not None:  # growth: the one time every held expert is copied
            n = old.num_experts
            for name, src in old.tensors().items():
                getattr(new, name)[:n].copy_(src)
        self.free.extend(range(self.capacity, capacity))
        self.stack = new

    def shrink(self) -> bool:
        """After unloads: free the stack when it holds nothing, compact it when it holds a quarter of its slots or less.

        A compacted stack is a new tensor set holding the experts in slots
        ``0..n-1`` (twice ``n`` slots, at least 4); forwards still running on an
        older view keep reading the old stack, which is freed when they end.
        Returns whether the stack changed (the caller publishes a new view).
        """
        if self.stack is None:
            return False
        if not self.slot_of:
            self.stack, self.free, self.quarantine = None, [], []
            self.generation += 1
            return True
        held = len(self.slot_of)
        if self.capacity <= 4 or held > self.capacity // 4:
            return False
        capacity = max(4, 2 * held)
        new = self._empty_stack(self.stack, capacity)
        slot_of = {}
        for i, (expert, slot) in enumerate(sorted(self.slot_of.items(), key=lambda kv: kv[1])):
            for name, src in self.stack.tensors().items():
                getattr(new, name)[i].copy_(src[slot])
            slot_of[expert] = i
        self.stack, self.slot_of = new, slot_of
        self.free, self.quarantine = list(range(held, capacity)), []  # nothing running reads the new stack yet
        self.generation += 1
        return True

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

    def put(self, expert: int, tensors: dict[str, torch.Tensor], room_bytes: int | None = None,
            spare_bytes: int | None = None) -> None:
        """Copy one expert (roles w1, w3, w2, b1, b3, b2; w*_scale when packed) into a free slot.

        room_bytes: expert bytes the worker may still take (its budget less the
        experts it holds, the planner's count): less than one expert's bytes is
        ``MemoryBudgetError`` (nothing changes). spare_bytes: the budget less
        everything reserved (slot stacks, this layer's included). A full stack
        grows by doubling, but not past what ``spare_bytes`` holds beside the old
        stack while the copy runs, and always by at least the one slot wanted.
        """
        if expert in self.slot_of:
            return
        slot = self.slot_bytes(tensors)
        if room_bytes is not None and room_bytes < slot:
            raise MemoryBudgetError(
                f"no room for another expert: {max(0, room_bytes)} bytes of the budget left, an expert takes {slot}"
            )
        if not self.free:
            want = max(4, 2 * self.capacity)
            if spare_bytes is not None:
                want = max(self.capacity + 1, min(want, max(0, spare_bytes) // max(1, slot)))
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
