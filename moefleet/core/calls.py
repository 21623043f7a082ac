"""What a router sends a worker for one layer call, and what comes back: ``WorkerCall``, ``WorkerReply``, ``WorkerFailure``.

One ``WorkerCall`` carries all of one worker's rows of one layer call: the
rows grouped by expert (experts ascending), each row's combine weight, and
where each row's hidden state is. The hidden states reach the worker one of
two ways (``WorkerCall.x``):

- **shared**: ``x is None``. Every worker on the router's node reads the
  call's whole batch ``[T, H]`` from one shared copy (a compiled graph's
  shared-memory channel, or one object in Ray's store; a CUDA IPC handle on
  a GPU node) and materialises only its own rows (``token_index``).
- **rows**: ``x`` holds only the worker's unique tokens ``[U, H]`` (a worker
  on another node: only the rows it computes cross the network).

In both, ``rows`` indexes the tensor the worker reads (the shared batch, or
``x``), ``inverse`` maps each row to its unique token, and the worker returns
one partial output row per unique token, ``[U, H]``, already weighted and
summed over its experts, in its compute dtype (``WorkerReply.partial``). The
router sums the partials in fp32 on its own device.

Failures a worker can tell (an expert it no longer holds, a deadline passed
before it started, a bad call) come back as a ``WorkerFailure`` value, not an
exception: on a compiled graph an exception would be wrapped by Ray, and a
value keeps the graph's other outputs readable. A worker that is gone shows
as Ray's actor errors instead.

Plain dataclasses with slots, not pydantic models: one of each per worker per
layer call, on the hot path (validation would cost more than the call's
Python work). Their fields are checked where they are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

FAILURE_KINDS = ("expired", "not_loaded", "bad_call", "error")


@dataclass(slots=True)
class WorkerCall:
    """One worker's part of one layer call (module docstring).

    layer: the MoE layer. rows: [N] int64, the row of the tensor read (the
    shared batch, or ``x``) of each assignment, grouped by expert.
    weights: [N] float32 combine weight per row. experts: expert ids present,
    ascending; counts: rows per expert. inverse: [N] position of each row's
    token among the unique tokens (0..num_unique-1). token_index: [U] the row
    of the tensor read for each unique token; None when that tensor is exactly
    the unique tokens in order (rows mode). x: the unique tokens' hidden states
    (rows mode: numpy [U, H], bf16 as its uint16 bits; or a CUDA IPC handle),
    None in shared mode. dtype: dtype name of the hidden states.
    deadline: wall clock (``time.time()``) after which the worker must not start
    it. sent: wall clock when the router sent it (its ``to_worker`` stage).
    transport: how it travelled (``moefleet.core.cost_model.TRANSPORTS``): in shared
    mode it says which copy of the shared batch to read, the host one
    (``shared_memory``, ``local``) or the CUDA IPC handle (``cuda_ipc``).
    reply_ipc: return the partial as a CUDA IPC handle (a router on this node that
    can open the worker's GPU); otherwise as host numpy.
    """

    layer: int
    rows: np.ndarray
    weights: np.ndarray
    experts: tuple[int, ...]
    counts: tuple[int, ...]
    inverse: np.ndarray
    num_unique: int
    token_index: np.ndarray | None = None
    x: Any = None
    dtype: str = "float32"
    deadline: float | None = None
    sent: float = 0.0
    transport: str = "shared_memory"
    reply_ipc: bool = False

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])

    @property
    def shared(self) -> bool:
        """Whether the hidden states come from the call's shared batch (not in ``x``)."""
        return self.x is None


@dataclass(slots=True)
class WorkerReply:
    """A worker's answer: ``partial`` [U, H] (numpy in ``dtype``, bf16 as bits; or a CUDA IPC handle), and its stage times.

    times: seconds of ``worker_gather``, ``expert_ffn``, ``worker_combine``
    (``moefleet.core.stages.WORKER_STAGES``), and ``start`` / ``end``, the wall
    clock when the worker began and ended the call.
    """

    partial: Any
    dtype: str
    times: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class WorkerFailure:
    """A call the worker refused or failed (module docstring).

    kind: ``expired`` (its deadline passed before it started: not computed),
    ``not_loaded`` (the worker does not hold an expert it was sent: a stale
    placement, worth a retry elsewhere), ``bad_call`` (the call itself is
    malformed) or ``error`` (anything else). message: for the caller's error.
    """

    worker: str
    kind: str
    message: str

    def __post_init__(self):
        if self.kind not in FAILURE_KINDS:
            raise ValueError(f"kind: expected one of {FAILURE_KINDS}, got {self.kind!r}")
