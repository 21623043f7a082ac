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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np
import torch

from moefleet.core.config import RouterConfig
from moefleet.core.model import MoECheckpoint
from moefleet.core.placement import Placement
from moefleet.core.stages import WORKER_STAGES, StageHistograms
from moefleet.core.tensors import DTYPES, from_numpy, to_numpy
from moefleet.kernels.experts import shared_from_tensors
from moefleet.kernels.layer import GateWeights, combine_shared, fused_route, gate_dtype
from moefleet.kernels.routing import Routing

from .dispatch import NoReplicaError, WorkerBatch, plan_dispatch

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request refused or failed, with the gRPC status code it maps to.

    retry_after_ms: for an overload refusal, when a retry is likely to be admitted.
    """

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


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

    async def forward(self, worker: str, layer: int, shared: Any, batch: WorkerBatch, deadline: float | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """The worker's partial output [U, H] fp32 and its stage times (``ExpertGroupCore.forward_timed``).

        deadline: ``time.time()`` after which the worker must not start the batch (RequestError DEADLINE_EXCEEDED)."""
        ...


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


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. A sum first (one pass, no temporary): finite for every finite
    tensor short of overflow; only when it is not are the elements checked one by one."""
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


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
        self.stages = StageHistograms()  # per-stage durations (moefleet.core.stages), exported by metrics.py
        self.load_counts: dict[tuple[int, int], int] = defaultdict(int)
        self._pending: dict[int, list[_Pending]] = defaultdict(list)
        self._flushers: dict[int, asyncio.Task] = {}
        self._batch_tasks: set[asyncio.Task] = set()
        self._active: dict[int, int] = defaultdict(int)  # layer -> layer calls being served
        self._compute: ThreadPoolExecutor | None = None
        self._queued = 0
        self.inflight_tokens = 0  # admitted, unanswered (admission: max_inflight_tokens)
        self.inflight_bytes = 0  # request message bytes of those (max_inflight_bytes)
        self._service_s = 0.05  # moving average of a request's time in the router: the retry hint
        self._placement_changed = asyncio.Event()
        self._inflight_by_version: dict[tuple[str, int], int] = defaultdict(int)  # (generation, version) -> calls
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

    def oldest_inflight(self) -> tuple[str, int]:
        """(generation, version) of the oldest placement a dispatched, unfinished layer call still uses (current if none).

        A call on another generation than the current one is the oldest: the
        router follows a new table only after the store lost the old one. The
        reconciler unloads an old replica only when every router reports the
        table it published and a version at or past the one that dropped it.
        """
        current = self.placement.generation
        live = [k for k, n in self._inflight_by_version.items() if n > 0]
        older = [k for k in live if k[0] != current]
        if older:
            return min(older, key=lambda k: k[1])
        return (current, min((v for _, v in live), default=self.placement.version))

    def oldest_inflight_version(self) -> int:
        """The version of ``oldest_inflight()``."""
        return self.oldest_inflight()[1]

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
        if self.config.nonfinite == "reject" and not all_finite(hidden):
            bad = int((~torch.isfinite(hidden)).any(dim=-1).sum())
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"hidden: {bad} token(s) hold NaN or Inf (policy: reject)")
        if router_logits is not None:
            if list(router_logits.shape) != [hidden.shape[0], ls.num_experts]:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"router_logits.shape: expected [{hidden.shape[0]}, {ls.num_experts}], got {list(router_logits.shape)}",
                )
            if self.config.nonfinite == "reject" and not all_finite(router_logits):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "router_logits: NaN or Inf (policy: reject)")

    # -- serving ---------------------------------------------------------
    async def submit(
        self,
        layer: int,
        hidden: torch.Tensor,
        router_logits: torch.Tensor | None = None,
        deadline: float | None = None,
        *,
        request_bytes: int | None = None,
    ) -> ForwardResult:
        """Serve one request: validated, admitted, then batched with concurrent requests for the same layer where allowed.

        deadline: ``time.monotonic()`` after which the request is failed, not computed.
        request_bytes: size of the request message (default: the tensors' bytes), counted against max_inflight_bytes.
        """
        t0 = time.perf_counter()
        self.validate(layer, hidden, router_logits)
        self.stages.observe("validate", time.perf_counter() - t0)
        tokens = int(hidden.shape[0])
        if request_bytes is None:
            request_bytes = hidden.nbytes + (0 if router_logits is None else router_logits.nbytes)
        self._admit(tokens, request_bytes)
        t_admitted = time.monotonic()
        try:
            batchable = (
                router_logits is None
                and self.config.batch_window_ms > 0
                and self.spec.layer_spec(layer).capacity is None  # capacity is counted per call
            )
            if not batchable or self._layer_idle(layer):
                # Nothing of this layer waits or runs: a window would only delay this request.
                self._check_deadline(deadline)
                result = await self.forward(layer, hidden, router_logits, deadline=deadline)
            else:
                fut = asyncio.get_running_loop().create_future()
                self._pending[layer].append(_Pending(hidden, deadline, fut))
                if layer not in self._flushers or self._flushers[layer].done():
                    self._flushers[layer] = asyncio.create_task(self._flush_after_window(layer))
                result = await fut
            self._service_s += 0.2 * (time.monotonic() - t_admitted - self._service_s)
            return result
        finally:
            self._queued -= 1
            self.inflight_tokens -= tokens
            self.inflight_bytes -= request_bytes

    def _admit(self, tokens: int, nbytes: int) -> None:
        """Count a request in, or refuse it at once (RESOURCE_EXHAUSTED with a retry hint) when a limit would be passed."""
        c = self.config
        if self._queued >= c.max_queued_requests:
            why = f"router queue full: {self._queued} requests waiting or in flight (max_queued_requests={c.max_queued_requests})"
        elif self.inflight_tokens + tokens > c.max_inflight_tokens:
            why = f"router overloaded: {self.inflight_tokens} tokens in flight + {tokens} exceed max_inflight_tokens={c.max_inflight_tokens}"
        elif self.inflight_bytes + nbytes > c.max_inflight_bytes:
            why = f"router overloaded: {self.inflight_bytes} bytes in flight + {nbytes} exceed max_inflight_bytes={c.max_inflight_bytes}"
        else:
            self._queued += 1
            self.inflight_tokens += tokens
            self.inflight_bytes += nbytes
            self.stats.requests += 1
            return
        self.stats.rejected_full += 1
        retry_ms = self.retry_after_ms()
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{why}; retry after {retry_ms} ms", retry_after_ms=retry_ms)

    def full(self) -> str | None:
        """Why no request at all can be admitted now (a limit reached), or None."""
        c = self.config
        if self._queued >= c.max_queued_requests:
            return f"router queue full: {self._queued} requests waiting or in flight (max_queued_requests={c.max_queued_requests})"
        if self.inflight_tokens >= c.max_inflight_tokens:
            return f"router overloaded: {self.inflight_tokens} tokens in flight (max_inflight_tokens={c.max_inflight_tokens})"
        if self.inflight_bytes >= c.max_inflight_bytes:
            return f"router overloaded: {self.inflight_bytes} bytes in flight (max_inflight_bytes={c.max_inflight_bytes})"
        return None

    def retry_after_ms(self) -> int:
        """When a refused request should come back: a request's recent average time in the router (10 ms .. 10 s)."""
        return int(min(10_000, max(10, round(self._service_s * 1000))))

    def _layer_idle(self, layer: int) -> bool:
        return self.config.dispatch_when_idle and not self._pending[layer] and not self._active[layer]

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
        now = time.monotonic()
        for p in batch:
            self.stages.observe("queue", now - p.enqueued)
        hidden = torch.cat([p.hidden for p in batch]) if len(batch) > 1 else batch[0].hidden
        deadline = None if any(p.deadline is None for p in batch) else max(p.deadline for p in batch)
        try:
            result = await self.forward(layer, hidden, deadline=deadline)
        except Exception as e:
            if len(batch) > 1 and isinstance(e, RequestError) and e.code == grpc.StatusCode.UNAVAILABLE:
                # Some request needed an expert no live worker holds: serve each on its own, so only the
                # requests that cannot be served fail.
                await asyncio.gather(*(self._run_alone(layer, p) for p in batch))
                return
            for p in batch:  # every waiting request gets the failure
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

    async def _run_alone(self, layer: int, p: _Pending) -> None:
        """One request of a failed batch, served by itself; its own failure goes to it alone."""
        if p.future.done():
            return
        try:
            result = await self.forward(layer, p.hidden, deadline=p.deadline)
        except Exception as e:  # noqa: BLE001 - delivered to the request it belongs to
            if not p.future.done():
                p.future.set_exception(e)
            return
        if not p.future.done():
            p.future.set_result(result)

    async def forward(
        self, layer: int, hidden: torch.Tensor, router_logits: torch.Tensor | None = None, *, deadline: float | None = None
    ) -> ForwardResult:
        """One layer call (already validated): gate, dispatch, combine.

        deadline: ``time.monotonic()``; workers skip the call's batches they would start after it (DEADLINE_EXCEEDED).
        """
        t_start = time.perf_counter()
        self._active[layer] += 1
        try:
            return await self._forward(layer, hidden, router_logits, deadline)
        finally:
            self._active[layer] -= 1
            self.stats.forward_s += time.perf_counter() - t_start

    OFFLOAD_BYTES = 4 << 20
    """Hidden states of at least this many bytes (1024 tokens at H=1024, fp32) have a call's tensor work
    (gate, transport put, combine; the server's decode and reply) done on the router's compute threads, so
    the event loop keeps serving other calls meanwhile. Below, the work takes a millisecond or two in all and
    runs inline: each hop to a thread and back cost about half a millisecond on a loaded 2-core machine
    (benchmarks/RESULTS.md, serving cost)."""

    async def offload(self, nbytes: int, fn, *args):
        """``fn(*args)``: on a compute thread when ``nbytes >= OFFLOAD_BYTES``, else inline."""
        if nbytes < self.OFFLOAD_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.compute_pool(), fn, *args)

    def compute_pool(self) -> ThreadPoolExecutor:
        """Threads for the router's tensor work (large calls, shared experts); torch ops release the GIL."""
        if self._compute is None:
            self._compute = ThreadPoolExecutor(max_workers=2, thread_name_prefix="moefleet-router-compute")
        return self._compute

    async def _forward(
        self, layer: int, hidden: torch.Tensor, router_logits: torch.Tensor | None, deadline: float | None = None
    ) -> ForwardResult:
        ls = self.spec.layer_spec(layer)
        nbytes = hidden.numel() * hidden.element_size()
        routing, hidden_c, shared_ref = await self.offload(nbytes, self._route_and_share, layer, hidden, router_logits)
        ids = routing.topk_ids.numpy()
        weights = routing.topk_weights.numpy()
        self._count_load(layer, ids, ls.num_experts)
        shared_mod = self.shared[layer]
        shared_task = (
            asyncio.get_running_loop().run_in_executor(self.compute_pool(), self._timed_shared, shared_mod, hidden_c)
            if shared_mod is not None
            else None
        )  # the shared experts run beside the workers
        partials: list[tuple[WorkerBatch, np.ndarray]] = []
        exclude: set[str] = set()
        attempt = 0
        todo = np.ones(ids.shape, dtype=bool)  # assignments still to serve
        version = self.placement.version
        st = self.stages
        while True:
            t2 = time.perf_counter()
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
            t3 = time.perf_counter()
            st.observe("dispatch_plan", t3 - t2)
            version = self.placement.version
            table = (self.placement.generation, version)
            self._inflight_by_version[table] += 1
            try:
                results = await asyncio.gather(*(self._call(layer, shared_ref, b, deadline) for b in batches), return_exceptions=True)
            finally:
                self._inflight_by_version[table] -= 1
                if not self._inflight_by_version[table]:
                    del self._inflight_by_version[table]
            st.observe("workers", time.perf_counter() - t3)
            failed = []
            for b, r in zip(batches, results):
                if isinstance(r, BaseException):
                    failed.append((b, r))
                    continue
                partials.append((b, r))
                todo.reshape(-1)[self._slots_of(b, ids)] = False
            if not failed:
                break
            expired = [r for _, r in failed if isinstance(r, RequestError)]  # a worker refused it: deadline passed
            if expired:
                self.stats.expired += 1
                raise expired[0]
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
        out = await self.offload(nbytes, self._combine, hidden.shape[0], ls.hidden_size, partials, shared_out, hidden.dtype)
        return ForwardResult(out, routing, version)

    def _route_and_share(
        self, layer: int, hidden: torch.Tensor, router_logits: torch.Tensor | None
    ) -> tuple[Routing, torch.Tensor, Any]:
        """Gate and route ``hidden [T, H]``; hand it to the transport in the compute dtype (stages: gate, object_store_put)."""
        t0 = time.perf_counter()
        gate = self.gates[layer]
        logits = gate.logits(hidden) if router_logits is None else router_logits.float()
        routing = fused_route(logits, self.spec.layer_spec(layer), gate, "torch")
        t1 = time.perf_counter()
        hidden_c = hidden.to(self.dtype)
        shared_ref = self.transport.share(to_numpy(hidden_c))
        self.stages.observe("gate", t1 - t0)
        self.stages.observe("object_store_put", time.perf_counter() - t1)
        return routing, hidden_c, shared_ref

    def _combine(
        self,
        num_tokens: int,
        hidden_size: int,
        partials: list[tuple[WorkerBatch, np.ndarray]],
        shared_out: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The workers' partial outputs (+ shared experts) as the call's output ``[T, H]`` in ``dtype`` (stage: combine).

        Summed in fp32 in batch order, then the shared experts, then the cast. One
        worker that served every token returned the routed sum itself: it is used as is.
        """
        t0 = time.perf_counter()
        if len(partials) == 1 and len(partials[0][0].unique_tokens) == num_tokens:
            out = from_numpy(np.asarray(partials[0][1]), "float32")  # its unique tokens are 0..T-1 in order
        else:
            out = torch.zeros(num_tokens, hidden_size, dtype=torch.float32)
            for b, partial in partials:
                out.index_add_(0, torch.from_numpy(b.unique_tokens), from_numpy(np.asarray(partial), "float32"))
        if shared_out is not None:
            out = out + shared_out.float()
        out = out.to(dtype)
        self.stages.observe("combine", time.perf_counter() - t0)
        return out

    def _timed_shared(self, shared_mod, hidden: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return shared_mod(hidden)
        finally:
            self.stages.observe("shared_experts", time.perf_counter() - t0)

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

    async def _call(self, layer: int, shared_ref: Any, batch: WorkerBatch, deadline: float | None = None) -> np.ndarray:
        self.outstanding[batch.worker] += batch.num_rows
        # the worker's clock: wall time (monotonic clocks are per machine)
        wall_deadline = None if deadline is None else time.time() + (deadline - time.monotonic())
        sent = time.time()
        try:
            partial, times = await self.transport.forward(batch.worker, layer, shared_ref, batch, deadline=wall_deadline)
        finally:
            self.outstanding[batch.worker] -= batch.num_rows
        got = time.time()
        st = self.stages
        st.observe("to_worker", times["start"] - sent)
        for name in WORKER_STAGES:
            st.observe(name, times[name])
        st.observe("return", got - times["end"])
        return partial

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
