"""The ``ExpertGroup`` worker: the weights of a set of (layer, expert) pairs, and their compute.

``ExpertGroupCore`` is plain Python (tested without Ray); ``ExpertGroup`` is
the same class as a Ray actor. One ``forward`` call carries all of this
worker's rows of one layer call, for all of its experts, in the permuted
layout (rows grouped by expert, experts ascending); the worker returns one
partial output row per token, the weighted sum over its experts.

Experts load and unload while the worker serves: each layer's weights live in
preallocated slots (``slots.py``), so a load copies one expert and an unload
none; forwards read an immutable snapshot, so one already running keeps the
weights it started with.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from moefleet.core.calls import WorkerCall, WorkerFailure, WorkerReply
from moefleet.core.cuda_ipc import CudaTensorHandle, export_tensor, open_tensor
from moefleet.core.emulation import EmulatedDevice, emulated_call_s
from moefleet.core.model import MoECheckpoint
from moefleet.core.placement import ExpertKey, expert_runs
from moefleet.core.processes import polling_thread
from moefleet.core.recent import RecentCounts
from moefleet.core.tensors import DTYPES, from_numpy, to_numpy
from moefleet.kernels.experts import fusable, grouped_ffn, moe_experts, packed_kind, resolve_backend
from moefleet.kernels.permute import rows_to_topk

from .slots import LayerSlots, LayerView

log = logging.getLogger(__name__)

SMALL_COMBINE = 1 << 16
"""A worker's combines of fewer elements run in numpy on its compute thread (see ``_experts_stepwise``)."""

RECENT_WINDOW_S = 5.0
"""Workers report the rows they served per layer over this many seconds (measured device load)."""


def _forms(slots: dict) -> dict[str, str]:
    """The form of each layer's experts (``float`` or a packed kind); ``{"*": form}`` when every layer has the same."""
    forms = {str(layer): sl.stack_kwargs.get("quant") or "float" for layer, sl in list(slots.items())}
    kinds = set(forms.values())
    return {"*": kinds.pop()} if len(kinds) == 1 and len(forms) > 1 else forms


@contextlib.contextmanager
def background_priority(nice: int = 10):
    """Run the enclosed work (weight loading) at a lower CPU priority than serving, on this thread only.

    Linux schedules threads individually, so the loading thread yields to the
    threads serving requests; elsewhere this is a no-op.
    """
    tid = threading.get_native_id()
    try:
        before = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, before + nice))
    except (AttributeError, OSError):
        yield
        return
    try:
        yield
    finally:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, before)
        except OSError:  # lowering back needs privileges some containers lack: the thread stays low
            log.debug("could not restore thread priority %d", before)


class DeadlineExpiredError(TimeoutError):
    """A forward call that reached the worker after its deadline: not computed."""


class ExpertNotLoadedError(LookupError):
    """A forward asked for an expert this worker does not hold (a stale placement)."""


class StaleCommandError(RuntimeError):
    """A load/unload refused: its fencing token is not the current leader's (a deposed leader), or it carried none."""


def pin_process_to_cpus(cpus: list[int]) -> list[int]:
    """Pin every thread of this process (and the threads it starts later) to ``cpus``.

    Linux scheduling affinity is per thread: each existing thread is set, and
    new threads inherit the creator's. Returns the CPUs now allowed; a no-op
    (returning []) where affinity is not supported.
    """
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return []
    want = set(int(c) for c in cpus)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, want)
        except OSError:  # a thread that ended meanwhile
            pass
    os.sched_setaffinity(0, want)
    return sorted(os.sched_getaffinity(0))


class ExpertGroupCore:
    """Experts of one worker.

    worker_id: this worker's device id in the placement.
    checkpoint: checkpoint directory the weights load from (lazily, per expert).
    device: 'auto' (CUDA when visible, else CPU), 'cpu' or 'cuda'.
    dtype: compute dtype name; default the checkpoint's.
    memory_budget_bytes: the most this worker's slot stacks may reserve (its device's
        memory for experts); a load past it raises ``MemoryBudgetError``.
    emulate: an emulated device (``moefleet.core.emulation``): computed on the CPU, each call
        then lasts at least the modelled device's time for it, times the slowdown.
    """

    def __init__(
        self,
        worker_id: str,
        checkpoint: str,
        experts: list[ExpertKey] | tuple = (),
        *,
        device: str = "auto",
        dtype: str | None = None,
        backend: str = "auto",
        memory_budget_bytes: int | None = None,
        require_fence: bool = False,
        emulate: EmulatedDevice | dict | None = None,
    ):
        self.worker_id = worker_id
        # an emulated device computes on the CPU and takes its modelled device's time per call (core/emulation.py)
        self.emulate = EmulatedDevice.model_validate(emulate) if isinstance(emulate, dict) else emulate
        if self.emulate is not None:
            device = "cpu"
        self.require_fence = require_fence  # refuse load/unload commands that carry no fencing token
        self.fence_check = None  # token -> whether the lease is held under it now (the store's check_fence)
        self.memory_budget_bytes = memory_budget_bytes  # expert weights' cap on this device (slot stacks included)
        self.ckpt = MoECheckpoint(checkpoint)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype_name = dtype or self.ckpt.spec.dtype
        self.dtype = DTYPES[self.dtype_name]
        self.backend = resolve_backend(backend, self.device)
        self._slots: dict[int, LayerSlots] = {}  # mutated under _load_lock
        self._views: dict[int, LayerView] = {}  # replaced whole; forwards read without locking
        self._running: dict[int, int] = {}  # view generation -> forwards running on it
        self._load_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._in_flight = 0
        self._fence = 0  # highest fencing token a load/unload carried
        self._tokens: dict[ExpertKey, int] = {}
        self._tokens_total = 0
        self._recent = RecentCounts(RECENT_WINDOW_S)  # rows served per layer over the last seconds (monotonic clock)
        self._calls = 0
        self._expired = 0  # calls refused because they arrived after their deadline
        self._busy_s = 0.0
        self._held_report = None  # (views it was computed from, held bytes, reserved bytes, forms, expert runs)
        if experts:
            with self._load_lock:
                self._load_keys(list(experts))
        log.info("worker %s: %s path on %s", worker_id, self.backend, self.device)

    # -- weights ---------------------------------------------------------
    def _oldest_running(self, layer: int) -> int | None:
        with self._stats_lock:
            gens = [g for (lay, g), n in self._running.items() if lay == layer and n > 0]
        return min(gens) if gens else None

    def _layer_slots(self, layer: int) -> LayerSlots:
        slots = self._slots.get(layer)
        if slots is None:
            spec = self.ckpt.layer_spec(layer)
            kind = packed_kind(self.ckpt, layer, self.backend)
            kwargs = {"quant": kind, "swiglu_alpha": spec.swiglu_alpha, "swiglu_limit": spec.swiglu_limit,
                      "config_experts": spec.num_experts}  # launch configs of the layer, not of the slot stack
            if kind == "fp8":
                kwargs["block"] = self.ckpt.quant.weight_block_size
            slots = LayerSlots(spec.expert_kind == "gated", spec.activation, self.device, self.dtype, kwargs)
            self._slots[layer] = slots
        return slots

    def _check_fence(self, token: int | None) -> None:
        """Refuse a command that is not the current leader's (callers hold ``_load_lock``).

        Refused: a token older than one already obeyed; with ``fence_check`` (the
        store), a token that is not the lease's current one, checked atomically
        in Redis, so a deposed leader is refused even by a worker that never
        saw its successor; with ``require_fence``, no token at all. One token
        serves a whole step (its loads and unloads alike), so a replayed token
        is obeyed.
        """
        if token is None:
            if self.require_fence:
                raise StaleCommandError(f"worker {self.worker_id}: command without a fencing token refused (only the leader commands workers)")
            return
        token = int(token)
        if token < self._fence:
            raise StaleCommandError(
                f"worker {self.worker_id}: command with fencing token {token} refused; token {self._fence} was already seen"
            )
        if self.fence_check is not None:
            try:
                current = self.fence_check(token)
            except Exception as e:  # the store cannot say who leads: obey no one
                raise StaleCommandError(f"worker {self.worker_id}: command with fencing token {token} refused; "
                                        f"the lease cannot be checked: {e}") from e
            if not current:
                raise StaleCommandError(
                    f"worker {self.worker_id}: command with fencing token {token} refused; it is not the lease's current token"
                )
        self._fence = token

    def load(self, keys: list[ExpertKey], token: int | None = None) -> list[ExpertKey]:
        """Load experts (idempotent), at background priority: each copies into a free slot. Returns the experts held.

        token: the fencing token of the leader commanding it (see ``StaleCommandError``).
        """
        with self._load_lock:
            self._check_fence(token)
            return self._load_keys(keys)

    def _load_keys(self, keys: list[ExpertKey]) -> list[ExpertKey]:
        with background_priority():
            sizes: dict[int, tuple[int, int]] = {}  # per layer (held, reserved): only the layer loaded into changes
            if self.memory_budget_bytes is not None:
                sizes = {layer: sl.nbytes() for layer, sl in self._slots.items()}
            for layer, expert in sorted({(int(l), int(e)) for l, e in keys}):
                slots = self._layer_slots(layer)
                if expert in slots.slot_of:
                    continue
                slots.release(self._oldest_running(layer))
                packed = slots.stack_kwargs.get("quant") is not None
                room = spare = None
                if self.memory_budget_bytes is not None:  # counted as the planner counts: the experts held
                    sizes[layer] = slots.nbytes()
                    room = self.memory_budget_bytes - sum(h for h, _ in sizes.values())
                    spare = self.memory_budget_bytes - sum(r for _, r in sizes.values())
                try:
                    slots.put(expert, self.ckpt.expert(layer, expert, dtype=self.dtype, packed=packed), room, spare)
                finally:
                    if self.memory_budget_bytes is not None:
                        sizes[layer] = slots.nbytes()
                self._views = {**self._views, layer: slots.view()}
            return self.experts()

    def unload(self, keys: list[ExpertKey], token: int | None = None) -> list[ExpertKey]:
        """Drop experts (idempotent); copies nothing. Returns the experts held afterwards."""
        with self._load_lock:
            self._check_fence(token)
            views = dict(self._views)
            touched = set()
            for layer, expert in {(int(l), int(e)) for l, e in keys}:
                slots = self._slots.get(layer)
                if slots is not None and expert in slots.slot_of:
                    slots.drop(expert)
                    touched.add(layer)
            for layer in touched:
                self._slots[layer].shrink()  # emptied: freed; a quarter full or less: compacted
                views[layer] = self._slots[layer].view()
            self._views = views  # one assignment: readers see the old or the new map
            return self.experts()

    def experts(self) -> list[ExpertKey]:
        return sorted((layer, e) for layer, v in self._views.items() for e in v.slot_of)

    # -- compute ---------------------------------------------------------
    def forward(
        self,
        layer: int,
        hidden: np.ndarray,
        rows: np.ndarray,
        weights: np.ndarray,
        experts: list[int],
        counts: list[int],
        inverse: np.ndarray,
        num_unique: int,
        deadline: float | None = None,
    ) -> np.ndarray:
        """Partial outputs [num_unique, H] in the compute dtype (bf16 as its bits) for this worker's rows of one layer call.

        The plain-arguments form of :meth:`serve` (the shared form of a ``WorkerCall``); raises
        ``DeadlineExpiredError`` / ``ExpertNotLoadedError`` / ``ValueError`` where ``serve`` returns a failure.

        hidden: [T, H] the whole call's hidden states (compute dtype; bf16 as its bits).
        rows: [N] token of each row, grouped by expert in ``experts`` order (ascending).
        weights: [N] combine weight per row. counts: rows per expert.
        inverse: [N] index of each row's token among the unique tokens.
        deadline: ``time.time()`` past which the call is refused, not computed.
        """
        rows = np.asarray(rows, dtype=np.int64) if rows is not None else None
        uniq = np.empty(num_unique, dtype=np.int64)
        if rows is not None and inverse is not None:
            uniq[np.asarray(inverse, dtype=np.int64)] = rows
        call = WorkerCall(
            layer, rows, weights, tuple(experts or ()), tuple(counts or ()), inverse, num_unique, token_index=uniq,
            dtype=self.dtype_name, deadline=deadline,
        )
        reply = self.serve(call, hidden)
        if isinstance(reply, WorkerFailure):
            raise {"expired": DeadlineExpiredError, "not_loaded": ExpertNotLoadedError}.get(reply.kind, ValueError)(reply.message)
        return reply.partial

    def serve(self, call: WorkerCall, host=None, ipc=None) -> WorkerReply | WorkerFailure:
        """One layer call's rows: the partial output of each unique token, weighted and summed over this worker's experts.

        host / ipc: the call's whole batch ``[T, H]`` when ``call.x`` is None: in host memory (numpy, bf16 as
        its bits) or as a CUDA IPC handle; ``call.transport`` says which to read. Only the rows this worker
        computes are materialised on its device. Refusals and failures are returned as a ``WorkerFailure``
        (``moefleet.core.calls``), never raised.
        """
        start = time.time()
        if call.deadline is not None and start >= call.deadline:
            with self._stats_lock:
                self._expired += 1
            return WorkerFailure(self.worker_id, "expired", f"worker {self.worker_id}: layer {call.layer} call arrived after its deadline; not computed")
        # Take the view and register as running on it in one step: a load that frees
        # quarantined slots either sees this forward, or this forward sees the view
        # published after the unload that freed them.
        layer = call.layer
        with self._stats_lock:
            view = self._views.get(layer)
            key = (layer, -1 if view is None else view.generation)
            self._in_flight += 1
            self._running[key] = self._running.get(key, 0) + 1
        t0 = time.perf_counter()
        try:
            missing = [e for e in call.experts if view is None or e not in view.slot_of]
            if missing:
                return WorkerFailure(self.worker_id, "not_loaded", f"worker {self.worker_id} does not hold layer {layer} experts {missing}")
            source = call.x if call.x is not None else (ipc if call.transport == "cuda_ipc" else host)
            if source is None:
                return WorkerFailure(self.worker_id, "bad_call", f"worker {self.worker_id}: layer {layer} call carries no hidden states")
            x, rows, token_index = self._inputs(source, call)
            if self.fused(layer, view):
                t1, t2, out = self._experts_fused(view, x, token_index, call)
            else:
                t1, t2, out = self._experts_stepwise(layer, view, x, rows, call)
            with self._stats_lock:
                for e, c in zip(call.experts, call.counts):
                    self._tokens[(layer, e)] = self._tokens.get((layer, e), 0) + int(c)
                self._tokens_total += int(sum(call.counts))
                self._recent.add(layer, int(sum(call.counts)), time.monotonic())
            partial = export_tensor(out) if call.reply_ipc and out.device.type == "cuda" else to_numpy(out)
            t3 = time.perf_counter()
            ffn = t2 - t1
            if self.emulate is not None:  # the modelled device's time for this call, counted as its expert FFN
                wait = emulated_call_s(self.emulate, call.counts) - (t3 - t0)
                if wait > 0:
                    time.sleep(wait)
                    ffn += time.perf_counter() - t3
            times = {"worker_gather": t1 - t0, "expert_ffn": ffn, "worker_combine": t3 - t2, "start": start, "end": time.time()}
            return WorkerReply(partial, self.dtype_name, times)
        except (ValueError, IndexError, TypeError, RuntimeError) as e:  # a malformed call, or the kernels refused it
            log.warning("worker %s: layer %d call failed: %s", self.worker_id, layer, e)
            return WorkerFailure(self.worker_id, "bad_call" if isinstance(e, (IndexError, TypeError)) else "error", f"worker {self.worker_id}: {e}")
        finally:
            with self._stats_lock:
                self._in_flight -= 1
                self._running[key] -= 1
                if not self._running[key]:
                    del self._running[key]
                self._calls += 1
                self._busy_s += time.perf_counter() - t0

    def _inputs(self, source, call: WorkerCall) -> tuple[torch.Tensor, torch.Tensor | np.ndarray, torch.Tensor | None]:
        """(hidden states on this device, each row's index into them, each unique token's index into them or None).

        Only the rows this worker computes reach its device: from a shared batch on another device (host
        memory for a GPU worker, a peer GPU opened by CUDA IPC) the unique tokens' rows alone are gathered
        where the batch is, then copied; a batch on this very device (the CPU, or this GPU) is read in place.
        """
        if isinstance(source, CudaTensorHandle):
            x = open_tensor(source)
        else:
            x = from_numpy(source, call.dtype)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        rows, token_index = call.rows, call.token_index
        if token_index is not None and x.device != self.device:
            idx = torch.from_numpy(np.ascontiguousarray(token_index, dtype=np.int64)).to(x.device)
            x = x.index_select(0, idx)  # [U, H]: this worker's tokens only, gathered where the batch is
            rows, token_index = call.inverse, None
        if x.device != self.device:
            x = x.to(self.device, non_blocking=True)
        tok = None if token_index is None else torch.from_numpy(np.ascontiguousarray(token_index, dtype=np.int64)).to(self.device)
        return x, rows, tok

    def fused(self, layer: int, view: LayerView) -> bool:
        """Whether this layer's calls take the fused routed-expert kernel (the CUDA path, ``fused_moe``).

        On the Triton backend, float experts with a standard activation whose
        routed weight scales the output: one call gathers the rows inside its
        first GEMM and sums each token's experts in a fixed order (no atomics:
        the same bits on every run). Everything else takes the stepwise path.
        """
        return self.backend == "triton" and fusable(view.stack) and self.ckpt.layer_spec(layer).routed_weight_on != "input"

    def _sync(self) -> float:
        """``time.perf_counter()`` once the device has finished what was queued (CUDA work is asynchronous)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copy to the host that follows would wait anyway
        return time.perf_counter()

    def _experts_fused(self, view, x, token_index, call: WorkerCall) -> tuple[float, float, torch.Tensor]:
        """(inputs ready, experts done, partial [U, H] in the compute dtype) by ``moe_experts`` on the Triton backend.

        The rows (grouped by expert) become the top-k form the kernel takes: for
        each unique token, the slots of its experts here and their weights.
        """
        slot = np.repeat(np.asarray([view.slot_of[e] for e in call.experts], dtype=np.int64), call.counts)
        ids, w = rows_to_topk(slot, call.weights, call.inverse, call.num_unique)  # [U, Kmax], -1 padding
        ids_d, w_d = (torch.from_numpy(a).to(self.device) for a in (ids, w))
        t1 = self._sync()
        out = moe_experts(x, ids_d, w_d, view.stack, "triton", token_index=token_index, out_dtype=self.dtype)
        return t1, self._sync(), out

    def _experts_stepwise(self, layer, view, x, rows, call: WorkerCall) -> tuple[float, float, torch.Tensor]:
        """(rows gathered, FFN done, partial [U, H] in the compute dtype): gather, grouped FFN, weighted ``index_add_`` in fp32."""
        # rows come grouped by expert (ascending); the kernel wants them grouped by slot
        experts, counts = call.experts, call.counts
        slots = [view.slot_of[e] for e in experts]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        order = np.argsort(slots, kind="stable")
        perm = np.concatenate([np.arange(starts[i], starts[i] + counts[i]) for i in order]) if len(order) else np.zeros(0, np.int64)
        offsets = np.zeros(view.stack.num_experts + 1, dtype=np.int64)
        for sl, c in zip(slots, counts):
            offsets[sl + 1] = c
        offsets = torch.from_numpy(np.cumsum(offsets)).to(self.device)
        idx = torch.from_numpy(np.ascontiguousarray(np.asarray(rows)[perm])).to(self.device)
        w = torch.from_numpy(np.ascontiguousarray(np.asarray(call.weights, dtype=np.float32)[perm])).to(self.device)
        x_rows = x.index_select(0, idx)
        if self.ckpt.layer_spec(layer).routed_weight_on == "input":  # Llama 4: the weight scales the input
            x_rows = (x_rows.float() * w[:, None]).to(x_rows.dtype)
            w = torch.ones_like(w)
        t1 = self._sync()
        y = grouped_ffn(x_rows, offsets, view.stack, self.backend)
        t2 = self._sync()
        inv_np = np.ascontiguousarray(np.asarray(call.inverse)[perm])
        weighted = y.float() * w[:, None]
        if self.device.type == "cpu" and weighted.numel() < SMALL_COMBINE:
            # small: numpy on this thread (torch's index_add_ opens a parallel region even for one row)
            acc = np.zeros((call.num_unique, y.shape[-1]), dtype=np.float32)
            np.add.at(acc, inv_np, weighted.numpy())
            return t1, t2, torch.from_numpy(acc).to(self.dtype)
        out = torch.zeros(call.num_unique, y.shape[-1], dtype=torch.float32, device=self.device)
        out.index_add_(0, torch.from_numpy(inv_np).to(self.device), weighted)
        return t1, t2, out.to(self.dtype)

    # -- reporting -------------------------------------------------------
    def stats(self) -> dict:
        """Queue depth, tokens served per expert, memory in use, device."""
        with self._stats_lock:
            tokens = {f"{l}:{e}": n for (l, e), n in sorted(self._tokens.items())}
        info = self.heartbeat_info()
        info.pop("expert_runs", None)
        forms = {str(layer): slots.stack_kwargs.get("quant") or "float" for layer, slots in list(self._slots.items())}
        return {**info, "experts": [list(k) for k in self.experts()], "expert_form": forms, "tokens_served": tokens}

    def heartbeat_info(self) -> dict:
        """What the worker reports to the store every heartbeat: bounded whatever the model's size.

        Counts are totals and per-layer windowed sums (``recent_tokens``), never
        per expert; the experts held are listed as runs per layer (``expert_runs``;
        ``core.placement.held_experts`` reads them), the expert form once when every
        layer has the same. ``stats()`` adds the per-expert totals, the held experts
        as pairs and the form per layer for direct callers.
        """
        views = self._views  # replaced whole by every load and unload: what is held is computed once per change
        cached = self._held_report
        if cached is None or cached[0] is not views:
            sizes = [slots.nbytes() for slots in list(self._slots.values())]  # no lock: a load may be in progress
            cached = (views, sum(h for h, _ in sizes), sum(r for _, r in sizes), _forms(self._slots),
                      expert_runs(sorted((layer, e) for layer, v in views.items() for e in v.slot_of)))
            self._held_report = cached
        _, held, reserved, forms, runs = cached
        with self._stats_lock:
            return {
                "worker_id": self.worker_id,
                "queue_depth": self._in_flight,
                "calls": self._calls,
                "expired": self._expired,
                "busy_s": self._busy_s,
                "tokens_total": self._tokens_total,
                "memory_bytes": held,
                "reserved_bytes": reserved,
                "expert_form": dict(forms),
                "expert_runs": {layer: [list(r) for r in rs] for layer, rs in runs.items()},  # blocks per layer: a few dozen runs for hundreds of experts
                "device": str(self.device),
                "backend": self.backend,
                "accelerator": self._accelerator(),
                "recent_tokens": {
                    "window_s": self._recent.window_s,
                    "layers": {str(l): n for l, n in sorted(self._recent.totals(time.monotonic()).items())},
                },
            }

    def _accelerator(self) -> dict:
        """What the device is: its name and, on a GPU, its total memory (None where there is no fixed budget)."""
        if self.emulate is not None:
            return {"name": self.emulate.label, "memory_bytes": self.memory_budget_bytes, "emulated": self.emulate.type_name}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            return {"name": props.name, "memory_bytes": int(props.total_memory)}
        return {"name": "cpu", "memory_bytes": None}

    def ready(self) -> bool:
        return True


HEARTBEAT_INTERVAL_S = 0.25
HEARTBEAT_TTL_S = 1.0
"""Workers beat every 0.25 s and count as live for 1 s after a beat (the store's clock): a dead
worker is noticed within about 1.25 s plus the controller's poll."""

LIVENESS_GROUP = "liveness"
"""The actor's concurrency group for liveness checks (``ready``, ``pid``): they run on a thread of their
own beside the forwards, so a worker busy with every call it may run at once still answers them. (Ray
keeps ``_ray_system`` for compiled-graph loops; the default group serves forwards, loads and stats.)"""


GRAPH_SLOTS = 4
"""Compiled graphs one worker takes part in at once (routers holding a graph over it)."""
GRAPH_REAP_INTERVAL_S = 1.0
GRAPH_ORPHAN_S = 5.0
"""A graph whose router's heartbeat has been gone this long is closed by the worker."""


@dataclass
class _GraphSlot:
    router_key: str
    tasks: object = None
    missing_since: float | None = None


class ExpertGroupActor(ExpertGroupCore):
    """``ExpertGroupCore`` as a Ray actor.

    It owns its device: on a GPU node the GPU Ray gave it; on a CPU machine
    (local mode) the cores in ``cpus``, to which every thread of the process is
    pinned, with as many torch threads. Without ``cpus`` its torch threads
    follow the CPUs Ray reserved. With ``redis_url`` it heartbeats its stats
    into the fleet's store (``worker:<id>``), which is how the controller
    notices it is alive.

    Forwards run on one compute thread, in the order they arrive: Ray runs
    the actor's calls on a pool of threads (``max_concurrency``), and torch
    gives every thread that computes its own OpenMP team, whose threads
    spin-wait after each call; calls moving from pool thread to pool thread
    left several teams competing for the worker's cores (measured: a quarter
    more CPU for the same expert math). The pool threads still receive
    arguments and send results while the compute thread works.
    """

    def __init__(self, *args, cpus: list[int] | None = None, redis_url: str | None = None, namespace: str = "moefleet", **kwargs):
        import ray

        kwargs.setdefault("require_fence", True)  # only a leader's fenced commands load or unload
        self.cpus = pin_process_to_cpus(cpus or [])
        if self.cpus:
            torch.set_num_threads(len(self.cpus))
        else:
            reserved = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
            torch.set_num_threads(max(1, int(round(reserved))))
        self._compute = ThreadPoolExecutor(
            1, thread_name_prefix="moefleet-expert-compute", initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),)
        )
        super().__init__(*args, **kwargs)
        self._beat_stop = threading.Event()
        self._store = None
        self._graph_lock = threading.Lock()
        self._graphs: dict[str, _GraphSlot] = {}
        self._graph_thread = threading.local()
        if redis_url:
            from moefleet.core.state import StateStore

            self._store = StateStore(redis_url, namespace=namespace, socket_timeout_s=1.0)
            self.fence_check = self._store.check_fence  # a command's token against the lease's current holding
            self._beat()  # registered before ready() returns
            threading.Thread(target=self._beat_loop, name="moefleet-worker-heartbeat", daemon=True).start()
            threading.Thread(target=self._graph_reaper, name="moefleet-graph-reaper", daemon=True).start()

    def serve(self, call, host=None, ipc=None):
        """``ExpertGroupCore.serve`` on the worker's compute thread (its wait there counts in ``to_worker``).

        A plain actor call passes the host batch as an ``ObjectRef`` (Ray hands a zero-copy view) or inline."""
        return self._compute.submit(super().serve, call, host, ipc).result()

    # -- compiled graphs (router_service/graph.py) -------------------------
    def graph_call(self, shared, call):
        """The method a router's compiled graph runs on every execution: ``serve`` this worker's part, or nothing.

        Every execution reaches every worker of the graph; a worker without rows in it gets ``call=None``.
        The graph's loop thread polls its channels between calls: it runs in the idle class
        (``core.processes.polling_thread``) so that its polling never takes the worker's cores from the experts."""
        if not getattr(self._graph_thread, "idle", False):
            self._graph_thread.idle = polling_thread()
        if call is None:
            return None
        return self.serve(call, *(shared or (None, None)))

    def join_graph(self, graph_id: str, router_key: str) -> bool:
        """Reserve one of this worker's ``GRAPH_SLOTS`` for a router's compiled graph (False: all are taken).

        Each compiled graph over this worker runs a loop on a thread of Ray's ``_ray_system`` concurrency
        group (sized ``GRAPH_SLOTS``): a graph past that would never start. Slots of routers whose heartbeat
        (``router_key`` in the store) has expired are freed first."""
        with self._graph_lock:
            if graph_id not in self._graphs and len(self._graphs) >= GRAPH_SLOTS:
                self._reap_graphs(force_check=True)
            if graph_id not in self._graphs and len(self._graphs) >= GRAPH_SLOTS:
                return False
            self._graphs.setdefault(graph_id, _GraphSlot(router_key))
            return True

    def watch_graph(self, graph_id: str, tasks) -> None:
        """Keep the graph's tasks (its channels) so that its loop can be stopped here if its router dies.

        A router that dies without tearing its graph down (a killed model runner) leaves the graph's loop
        polling its input channel forever, a core's worth of CPU each. The worker checks its routers'
        heartbeats every ``GRAPH_REAP_INTERVAL_S`` and closes the channels of a graph whose router is gone,
        which ends that loop and frees its slot."""
        with self._graph_lock:
            slot = self._graphs.get(graph_id)
            if slot is not None:
                slot.tasks = tasks

    def leave_graph(self, graph_id: str) -> None:
        """The router tore its graph down (or never compiled it): free the slot."""
        with self._graph_lock:
            self._graphs.pop(graph_id, None)

    def graphs(self) -> dict[str, str]:
        """The compiled graphs this worker is in: graph id -> the router's key."""
        with self._graph_lock:
            return {g: s.router_key for g, s in self._graphs.items()}

    def _reap_graphs(self, force_check: bool = False) -> None:
        """Close the graphs whose router's heartbeat is gone (callers hold ``_graph_lock``)."""
        if self._store is None or not self._graphs:
            return
        now = time.monotonic()
        try:
            alive = self._store.alive_keys([s.router_key for s in self._graphs.values()])
        except Exception:  # the store is down: nothing can be told, nothing is closed
            return
        for graph_id, slot in list(self._graphs.items()):
            if slot.router_key in alive:
                slot.missing_since = None
                continue
            if slot.missing_since is None:
                slot.missing_since = now
            if force_check or now - slot.missing_since >= GRAPH_ORPHAN_S:
                log.warning("worker %s: router %s is gone; closing its compiled graph %s", self.worker_id, slot.router_key, graph_id)
                if slot.tasks is not None:
                    from ray.dag.compiled_dag_node import do_cancel_executable_tasks

                    try:
                        do_cancel_executable_tasks(self, slot.tasks)
                    except Exception as e:  # closed already
                        log.debug("closing graph %s: %s", graph_id, e)
                del self._graphs[graph_id]

    def _graph_reaper(self) -> None:
        while not self._beat_stop.wait(GRAPH_REAP_INTERVAL_S):
            with self._graph_lock:
                self._reap_graphs()

    def heartbeat_info(self) -> dict:
        return {**super().heartbeat_info(), "pid": os.getpid(), "cpus": self.cpus, "torch_threads": torch.get_num_threads()}

    def _beat(self) -> None:
        info = {"kind": "worker", **self.heartbeat_info()}
        self._store.register_worker(f"worker:{self.worker_id}", info, None, HEARTBEAT_TTL_S)

    def _beat_loop(self) -> None:
        down = False
        while not self._beat_stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                self._beat()
                if down:
                    log.info("worker %s: heartbeats reach the store again", self.worker_id)
                down = False
            except Exception as e:  # the store is down: keep serving, keep trying, say it once
                if not down:
                    log.warning("worker %s: heartbeat failed (%s); retrying every %.2fs", self.worker_id, e, HEARTBEAT_INTERVAL_S)
                down = True

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def endpoint(self) -> tuple[str, str | None, tuple[str, ...]]:
        """Where this worker keeps its tensors: (node id, its GPU's UUID or None, the GPUs it can open).

        A router picks the transport to this worker from it (``router_service/gpu_transport.py``)."""
        from moefleet.core.cuda_ipc import gpu_uuid, visible_gpu_uuids

        if self.device.type != "cuda":
            return self.node_id(), None, ()
        return self.node_id(), gpu_uuid(self.device), visible_gpu_uuids()

    def node_resources(self) -> dict:
        """The Ray resources of the node this worker runs on (for placement checks)."""
        import ray

        node = self.node_id()
        for n in ray.nodes():
            if n["NodeID"] == node:
                return dict(n["Resources"])
        return {}


_ACTOR_CLASS = None


def expert_group_actor_class():
    """The Ray actor class (created on first use, so importing this module needs no Ray).

    ``ready`` and ``pid`` run in the ``LIVENESS_GROUP`` concurrency group. Ray runs each compiled graph's
    loop on a thread of the actor's ``_ray_system`` concurrency group, one thread by default: sized
    ``GRAPH_SLOTS`` here, so that several routers (the gRPC router and embedded ones) each hold a graph
    over the same workers.
    """
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        class ExpertGroup(ExpertGroupActor):
            @ray.method(concurrency_group=LIVENESS_GROUP)
            def ready(self) -> bool:
                return True

            @ray.method(concurrency_group=LIVENESS_GROUP)
            def pid(self) -> int:
                return os.getpid()

        ExpertGroup.__doc__ = ExpertGroupActor.__doc__
        _ACTOR_CLASS = ray.remote(concurrency_groups={LIVENESS_GROUP: 1, "_ray_system": GRAPH_SLOTS})(ExpertGroup)
    return _ACTOR_CLASS
