"""The router's serving path: validate, gate, dispatch to workers, combine; micro-batching.

``RouterCore`` knows nothing of gRPC or Ray: the server turns its
``RequestError``s into gRPC statuses, and a ``WorkerTransport`` carries
batches to workers (``transport.py``: Ray actors, or in-process workers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np
import torch

from moefleet.core.config import RouterConfig
from moefleet.core.model import MoECheckpoint
from moefleet.core.placement import Placement
from moefleet.core.tensors import DTYPES, to_numpy
from moefleet.kernels.experts import shared_from_tensors
from moefleet.kernels.layer import GateWeights, combine_shared, fused_route, gate_dtype
from moefleet.kernels.routing import Routing

from .dispatch import NoReplicaError, WorkerBatch, plan_dispatch

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request refused or failed, with the gRPC status code it maps to."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class WorkerCallError(Exception):
    """A worker call failed.

    retryable: another placement or replica may succeed. dead: the worker
    itself is gone or unreachable (its process died, it was retired); the
    router stops sending to it until the placement changes. A retryable call
    that is not ``dead`` reached a worker holding a stale placement.
    """

    def __init__(self, worker: str, cause: BaseException, retryable: bool, dead: bool = False):
        super().__init__(f"worker {worker}: {type(cause).__name__}: {cause}")
        self.worker = worker
        self.cause = cause
        self.retryable = retryable
        self.dead = dead


class WorkerTransport(Protocol):
    """How batches reach workers. ``share`` is called once per layer call."""

    def share(self, hidden: np.ndarray) -> Any: ...

    async def forward(self, worker: str, layer: int, shared: Any, batch: WorkerBatch) -> np.ndarray: ...


@dataclass
class ForwardResult:
    output: torch.Tensor  # [T, H] in the request dtype
    routing: Routing
    placement_version: int


@dataclass
class _Pending:
    hidden: torch.Tensor
    deadline: float | None
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class RouterStats:
    requests: int = 0
    batches: int = 0
    tokens_computed: int = 0
    expired: int = 0
    cancelled: int = 0
    rejected_full: int = 0
    retries: int = 0
    failed_fast: int = 0  # layer calls failed at once because an expert's every replica was on dead workers
    dead_workers_seen: int = 0
    forward_s: float = 0.0  # wall time inside forward()
    telemetry_s: float = 0.0  # time spent counting tokens per expert and flushing the counts
    codes: dict[str, int] = field(default_factory=dict)  # replies by gRPC status name (core/request_stats.py)
    layer_latency: dict[str, dict] = field(default_factory=dict)  # per-layer latency histogram (core/request_stats.py)


class RouterCore:
    """Serves layer calls of one model against the workers of the current placement."""

    def __init__(self, checkpoint: str, config: RouterConfig, transport: WorkerTransport, *, dtype: str | None = None):
        self.ckpt = MoECheckpoint(checkpoint)
        self.spec = self.ckpt.spec
        self.config = config
        self.transport = transport
        self.dtype_name = dtype or self.spec.dtype
        self.dtype = DTYPES[self.dtype_name]
        self.gates: dict[int, GateWeights] = {}
        self.shared = {}
        for layer in self.spec.moe_layers:
            ls = self.spec.layer_spec(layer)
            self.gates[layer] = GateWeights(**self.ckpt.gate(layer), dtype=gate_dtype(ls, self.dtype))
            sh = shared_from_tensors(self.ckpt.shared(layer, dtype=self.dtype), ls.activation)
            self.shared[layer] = None if sh is None else sh.to(dtype=self.dtype)
        self.placement = Placement()
        self._replicas: dict[int, dict[int, list[str]]] = {}
        self.outstanding: dict[str, float] = defaultdict(float)
        self.stats = RouterStats()
        self.load_counts: dict[tuple[int, int], int] = defaultdict(int)
        self._pending: dict[int, list[_Pending]] = defaultdict(list)
        self._flushers: dict[int, asyncio.Task] = {}
        self._batch_tasks: set[asyncio.Task] = set()
        self._queued = 0
        self._placement_changed = asyncio.Event()
        self._inflight_by_version: dict[int, int] = defaultdict(int)
        self.dead: dict[str, float] = {}  # worker -> monotonic time it was found dead
        self._rng = np.random.default_rng()

    # -- placement -------------------------------------------------------
    def set_placement(self, placement: Placement) -> None:
        """Switch to ``placement`` (calls already dispatched finish on the old one).

        An older version of the same table is ignored; a placement of another
        generation (the store lost its data and the table was started again)
        is taken whatever its version. Workers marked dead are tried again on
        the new placement (the controller may have restarted them).
        """
        same_table = placement.generation == self.placement.generation
        if same_table and placement.version < self.placement.version:
            return
        replicas: dict[int, dict[int, list[str]]] = defaultdict(dict)
        for (layer, expert), workers in placement.replicas().items():
            replicas[layer][expert] = workers
        self._replicas = dict(replicas)
        self.placement = placement
        self.dead.clear()
        self._placement_changed.set()
        log.info("router: placement version %d", placement.version)

    def oldest_inflight_version(self) -> int:
        """The oldest placement version a dispatched, unfinished layer call still uses (current if none).

        The reconciler unloads an old replica only when every router reports a
        value at or past the version that dropped it.
        """
        live = [v for v, n in self._inflight_by_version.items() if n > 0]
        return min(live) if live else self.placement.version

    def ready(self) -> bool:
        """Every expert of every MoE layer has a replica."""
        for layer in self.spec.moe_layers:
            if len(self._replicas.get(layer, {})) < self.spec.layer_spec(layer).num_experts:
                return False
        return True

    # -- validation ------------------------------------------------------
    def validate(self, layer: int, hidden: torch.Tensor, router_logits: torch.Tensor | None) -> None:
        """Raise RequestError naming the problem; the checks cost O(T*H) at most."""
        if layer not in self.spec.moe_layers:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, f"layer {layer} is not a MoE layer of this model (MoE layers: {list(self.spec.moe_layers)})"
            )
        ls = self.spec.layer_spec(layer)
        if hidden.dim() != 2:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"hidden.shape: expected [T, {ls.hidden_size}], got {list(hidden.shape)}")
        if hidden.shape[0] == 0:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "hidden: empty batch (T = 0)")
        if hidden.shape[1] != ls.hidden_size:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"hidden.shape: hidden size {hidden.shape[1]} != the model's {ls.hidden_size}"
            )
        if hidden.shape[0] > self.config.max_request_tokens:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"hidden: {hidden.shape[0]} tokens exceed max_request_tokens={self.config.max_request_tokens}",
            )
        if self.config.nonfinite == "reject" and not bool(torch.isfinite(hidden).all()):
            bad = int((~torch.isfinite(hidden)).any(dim=-1).sum())
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"hidden: {bad} token(s) hold NaN or Inf (policy: reject)")
        if router_logits is not None:
            if list(router_logits.shape) != [hidden.shape[0], ls.num_experts]:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"router_logits.shape: expected [{hidden.shape[0]}, {ls.num_experts}], got {list(router_logits.shape)}",
                )
            if self.config.nonfinite == "reject" and not bool(torch.isfinite(router_logits).all()):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "router_logits: NaN or Inf (policy: reject)")

    # -- serving ---------------------------------------------------------
    async def submit(
        self, layer: int, hidden: torch.Tensor, router_logits: torch.Tensor | None = None, deadline: float | None = None
    ) -> ForwardResult:
        """Serve one request: validated, then batched with concurrent requests for the same layer where allowed.

        deadline: ``time.monotonic()`` after which the request is failed, not computed.
        """
        self.validate(layer, hidden, router_logits)
        if self._queued >= self.config.max_queued_requests:
            self.stats.rejected_full += 1
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"router queue full: {self._queued} requests waiting or in flight (max_queued_requests={self.config.max_queued_requests})",
            )
        self._queued += 1
        self.stats.requests += 1
        try:
            batchable = (
                router_logits is None
                and self.config.batch_window_ms > 0
                and self.spec.layer_spec(layer).capacity is None  # capacity is counted per call
            )
            if not batchable:
                self._check_deadline(deadline)
                return await self.forward(layer, hidden, router_logits)
            fut = asyncio.get_running_loop().create_future()
            self._pending[layer].append(_Pending(hidden, deadline, fut))
            if layer not in self._flushers or self._flushers[layer].done():
                self._flushers[layer] = asyncio.create_task(self._flush_after_window(layer))
            return await fut
        finally:
            self._queued -= 1

    def _check_deadline(self, deadline: float | None) -> None:
        if deadline is not None and time.monotonic() >= deadline:
            self.stats.expired += 1
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired before the request was computed")

    async def _flush_after_window(self, layer: int) -> None:
        """After the window, dispatch what is waiting as batches, without waiting for earlier batches to finish.

        Batches overlap: while the workers compute one, the router gates and
        dispatches the next, so workers do not idle between calls.
        """
        await asyncio.sleep(self.config.batch_window_ms / 1000.0)
        while self._pending[layer]:
            batch = self._take_batch(layer)
            if batch:
                task = asyncio.create_task(self._run_batch(layer, batch))
                self._batch_tasks.add(task)
                task.add_done_callback(self._batch_tasks.discard)

    def _take_batch(self, layer: int) -> list[_Pending]:
        pending = self._pending[layer]
        batch: list[_Pending] = []
        tokens = 0
        dtype = None
        now = time.monotonic()
        while pending:
            p = pending[0]
            if p.future.done():  # the caller went away (cancelled, or its deadline passed)
                pending.pop(0)
                self.stats.cancelled += 1
                continue
            if p.deadline is not None and now >= p.deadline:
                pending.pop(0)
                self.stats.expired += 1
                p.future.set_exception(RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired while queued; not computed"))
                continue
            n = p.hidden.shape[0]
            if batch and (tokens + n > self.config.max_batch_tokens or p.hidden.dtype != dtype):
                break
            batch.append(pending.pop(0))
            tokens += n
            dtype = p.hidden.dtype
        return batch

    async def _run_batch(self, layer: int, batch: list[_Pending]) -> None:
        hidden = torch.cat([p.hidden for p in batch]) if len(batch) > 1 else batch[0].hidden
        try:
            result = await self.forward(layer, hidden)
        except Exception as e:  # every waiting request gets the failure
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        start = 0
        for p in batch:
            n = p.hidden.shape[0]
            if not p.future.done():
                sl = slice(start, start + n)
                p.future.set_result(
                    ForwardResult(
                        result.output[sl],
                        Routing(result.routing.topk_ids[sl], result.routing.topk_weights[sl]),
                        result.placement_version,
                    )
                )
            start += n

    async def forward(self, layer: int, hidden: torch.Tensor, router_logits: torch.Tensor | None = None) -> ForwardResult:
        """One layer call (already validated): gate, dispatch, combine."""
        t_start = time.perf_counter()
        try:
            return await self._forward(layer, hidden, router_logits)
        finally:
            self.stats.forward_s += time.perf_counter() - t_start

    async def _forward(self, layer: int, hidden: torch.Tensor, router_logits: torch.Tensor | None) -> ForwardResult:
        ls = self.spec.layer_spec(layer)
        gate = self.gates[layer]
        logits = gate.logits(hidden) if router_logits is None else router_logits.float()
        routing = fused_route(logits, ls, gate, "torch")
        ids = routing.topk_ids.numpy()
        self._count_load(layer, ids, ls.num_experts)
        hidden_c = hidden.to(self.dtype)
        shared_ref = self.transport.share(to_numpy(hidden_c))
        loop = asyncio.get_running_loop()
        shared_mod = self.shared[layer]
        shared_task = loop.run_in_executor(None, shared_mod, hidden_c) if shared_mod is not None else None
        out = torch.zeros(hidden.shape[0], ls.hidden_size, dtype=torch.float32)
        weights = routing.topk_weights.numpy()
        exclude: set[str] = set()
        attempt = 0
        todo = np.ones(ids.shape, dtype=bool)  # assignments still to serve
        version = self.placement.version
        while True:
            sub_ids = np.where(todo, ids, -1)
            replicas = self._replicas_for(layer, exclude)
            try:
                batches = plan_dispatch(sub_ids, weights, replicas, self.outstanding, self.placement.speeds, self._rng)
            except NoReplicaError as e:
                if self.dead or exclude:
                    self.stats.failed_fast += 1
                    down = sorted(set(self.dead) | exclude)
                    raise RequestError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"layer {layer}: {e}: its replicas were on worker(s) {down}, which are down; "
                        "the controller is re-placing them, retry shortly",
                    ) from e
                raise RequestError(grpc.StatusCode.UNAVAILABLE, f"layer {layer}: {e}") from e
            version = self.placement.version
            self._inflight_by_version[version] += 1
            try:
                results = await asyncio.gather(*(self._call(layer, shared_ref, b) for b in batches), return_exceptions=True)
            finally:
                self._inflight_by_version[version] -= 1
                if not self._inflight_by_version[version]:
                    del self._inflight_by_version[version]
            failed = []
            for b, r in zip(batches, results):
                if isinstance(r, BaseException):
                    failed.append((b, r))
                    continue
                out.index_add_(0, torch.from_numpy(b.unique_tokens), torch.from_numpy(np.asarray(r)))
                todo.reshape(-1)[self._slots_of(b, ids)] = False
            if not failed:
                break
            attempt += 1
            errors = "; ".join(str(r) for _, r in failed)
            if attempt > self.config.worker_retries or not all(isinstance(r, WorkerCallError) and r.retryable for _, r in failed):
                raise RequestError(grpc.StatusCode.UNAVAILABLE, f"layer {layer}: worker call failed: {errors}")
            self.stats.retries += 1
            log.warning("router: layer %d re-dispatch after %s", layer, errors)
            stale = False
            for b, r in failed:
                if r.dead:
                    exclude.add(b.worker)
                    self.mark_dead(b.worker)
                else:
                    stale = True  # the placement moved on: wait for this router to see the new one
            if stale:
                await self._await_placement_change(0.5)
            # a dead worker's rows go straight to the other replicas; experts without one fail fast above
        self.stats.batches += 1
        self.stats.tokens_computed += hidden.shape[0]
        shared_out = None if shared_task is None else await shared_task
        if shared_out is not None:
            out += shared_out.float()
        return ForwardResult(out.to(hidden.dtype), routing, version)

    @staticmethod
    def _slots_of(batch: WorkerBatch, ids: np.ndarray) -> np.ndarray:
        """Flat (token, slot) indices a batch served."""
        k = ids.shape[1]
        expert_of_row = np.repeat(np.asarray(batch.experts), batch.counts)
        slots = batch.rows[:, None] * k + np.arange(k)[None, :]
        match = ids.reshape(-1)[slots] == expert_of_row[:, None]
        return slots[match]

    DEAD_RETRY_S = 2.0
    """A worker found dead is avoided until the placement changes, or this long (then tried again)."""

    def mark_dead(self, worker: str) -> None:
        if worker not in self.dead:
            self.stats.dead_workers_seen += 1
            log.warning("router: worker %s is down; sending its rows to other replicas", worker)
        self.dead[worker] = time.monotonic()

    def _replicas_for(self, layer: int, exclude: set[str]) -> dict[int, list[str]]:
        reps = self._replicas.get(layer, {})
        if self.dead:
            now = time.monotonic()
            for w, t in list(self.dead.items()):
                if now - t > self.DEAD_RETRY_S:
                    del self.dead[w]
            exclude = exclude | set(self.dead)
        if not exclude:
            return reps
        return {e: [w for w in ws if w not in exclude] for e, ws in reps.items()}

    async def _await_placement_change(self, timeout: float) -> None:
        self._placement_changed.clear()
        try:
            await asyncio.wait_for(self._placement_changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _call(self, layer: int, shared_ref: Any, batch: WorkerBatch) -> np.ndarray:
        self.outstanding[batch.worker] += batch.num_rows
        try:
            return await self.transport.forward(batch.worker, layer, shared_ref, batch)
        finally:
            self.outstanding[batch.worker] -= batch.num_rows

    def _count_load(self, layer: int, ids: np.ndarray, num_experts: int) -> None:
        t0 = time.perf_counter()
        flat = ids.reshape(-1)
        counts = np.bincount(flat[flat >= 0], minlength=num_experts)
        for e in np.flatnonzero(counts):
            self.load_counts[(layer, int(e))] += int(counts[e])
        self.stats.telemetry_s += time.perf_counter() - t0

    def take_load_counts(self) -> dict[tuple[int, int], int]:
        """Token counts per (layer, expert) since the last call (for telemetry)."""
        counts, self.load_counts = dict(self.load_counts), defaultdict(int)
        return counts
