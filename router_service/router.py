"""The router's serving path: validate, gate, dispatch to workers, combine; micro-batching.

``RouterCore`` knows nothing of gRPC or Ray: the server turns its
``RequestError``s into gRPC statuses, and a ``WorkerTransport`` carries
batches to workers (``transport.py``: Ray actors, or in-process workers).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np
import torch

from moefleet.core.config import RouterConfig
from moefleet.core.cuda_ipc import CudaTensorHandle, open_tensor
from moefleet.core.model import MoECheckpoint
from moefleet.core.placement import Placement
from moefleet.core.stages import WORKER_STAGES, StageHistograms
from moefleet.core.tensors import DTYPES, from_numpy
from moefleet.kernels.experts import resolve_backend, shared_from_tensors
from moefleet.kernels.layer import GateWeights, fused_route, gate_dtype
from moefleet.kernels.routing import Routing

from .dispatch import NoReplicaError, WorkerBatch, plan_dispatch
from .health import WorkerHealth, avoid

log = logging.getLogger(__name__)


SMALL_COMBINE = 1 << 16
"""Outputs of fewer elements (64 tokens at H=1024) are summed with numpy on the calling thread (see ``_combine``)."""


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
    itself is gone (its process died, it was retired); the router stops
    sending to it until the placement changes. unavailable: Ray could not
    reach it for now (``ActorUnavailableError``): the call's rows go to other
    replicas where there are some, and back to it where there are none.
    A retryable call that is neither reached a worker holding a stale placement.
    """

    def __init__(self, worker: str, cause: BaseException, retryable: bool, dead: bool = False, unavailable: bool = False):
        super().__init__(f"worker {worker}: {type(cause).__name__}: {cause}")
        self.worker = worker
        self.cause = cause
        self.retryable = retryable
        self.dead = dead
        self.unavailable = unavailable


class Stalled(Exception):
    """A worker call still running past its budget (``health.py``): the router hedges its rows or waits on.

    wait: ``await stalled.wait()`` (router's event loop) or ``stalled.wait_blocking(timeout)`` gives the call's
    outcome when it comes; ``on_done(fn)`` runs ``fn()`` then (the worker answered again)."""

    def __init__(self, worker: str, budget_s: float, task=None, future=None):
        super().__init__(f"worker {worker}: no answer within its budget of {budget_s:.2f} s (stalled)")
        self.worker = worker
        self.budget_s = budget_s
        self._task = task  # asyncio.Task of the call (event-loop path)
        self._future = future  # concurrent.futures.Future of the call (blocking path)

    async def wait(self):
        return await self._task

    def wait_blocking(self, timeout: float | None):
        return self._future.result(timeout)

    def on_done(self, fn) -> None:
        (self._task or self._future).add_done_callback(lambda _f: fn())


class WorkerTransport(Protocol):
    """How a layer call's rows reach workers (``transport.py``).

    ``prepare`` builds the call's messages (a ``WorkerCall`` per batch, the shared batch, their bytes);
    ``run`` / ``run_blocking`` carry them and return per batch a ``WorkerReply`` or that batch's error
    (``RequestError`` for a refusal, ``WorkerCallError`` for a failed call). ``set_workers`` tells it the
    placement's workers (it may prepare a compiled graph over them)."""

    kind: str

    def set_workers(self, workers) -> None: ...

    def mode(self, worker: str) -> str: ...

    def prepare(self, layer: int, hidden: torch.Tensor, batches: list[WorkerBatch], deadline: float | None) -> Any: ...

    async def run(self, prepared: Any, batches: list[WorkerBatch]) -> list: ...

    def run_blocking(self, prepared: Any, batches: list[WorkerBatch], timeout_s: float | None = None, meanwhile=None) -> list: ...

    def tick(self) -> None: ...

    def close(self, wait: bool = False) -> None: ...


@dataclass
class _Call:
    """One layer call in progress: its routing, the rows still to serve, the partials received."""

    layer: int
    hidden: torch.Tensor  # as the caller gave it
    hidden_c: torch.Tensor  # on the router's device, in the compute dtype
    routing: Routing
    ids: np.ndarray  # [T, K] on the host, for dispatch planning
    weights: np.ndarray
    todo: np.ndarray  # [T, K] assignments still to serve
    deadline: float | None  # wall clock, for the workers
    started: float  # perf_counter at the gate
    version: int = 0
    table: tuple[str, int] = ("", 0)  # (generation, version) the call was dispatched on
    sent: float = 0.0
    attempt: int = 0
    stale: bool = False
    worker_s: float = 0.0  # the slowest worker's compute (gather, experts, combine) in this call
    exclude: set = field(default_factory=set)
    partials: list = field(default_factory=list)
    budgets: dict = field(default_factory=dict)  # worker -> seconds this dispatch may take there


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

    def __init__(
        self, checkpoint: str, config: RouterConfig, transport: WorkerTransport, *, dtype: str | None = None,
        device: str | torch.device | None = None,
    ):
        self.ckpt = MoECheckpoint(checkpoint)
        self.device = torch.device(device or "cpu")  # gate, routing, shared experts and combine run here
        self.route_backend = resolve_backend("auto", self.device)
        self.spec = self.ckpt.spec
        self.config = config
        self.transport = transport
        self.dtype_name = dtype or self.spec.dtype
        self.dtype = DTYPES[self.dtype_name]
        self.gates: dict[int, GateWeights] = {}
        self.shared = {}
        for layer in self.spec.moe_layers:
            ls = self.spec.layer_spec(layer)
            self.gates[layer] = GateWeights(**self.ckpt.gate(layer), dtype=gate_dtype(ls, self.dtype)).to(self.device)
            sh = shared_from_tensors(self.ckpt.shared(layer, dtype=self.dtype), ls.activation)
            self.shared[layer] = None if sh is None else sh.to(device=self.device, dtype=self.dtype)
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
        self._lock = threading.Lock()  # counters shared by callers on several threads (the embedded router)
        self._placement_cv = threading.Condition()
        self.transport_bytes: dict[tuple[str, str], int] = defaultdict(int)  # (direction, transport) -> bytes
        self.health = WorkerHealth()  # per-worker budgets from recent speed; stalled workers in quarantine

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
        with self._placement_cv:
            self._placement_cv.notify_all()
        self.transport.set_workers({w for layer in self._replicas.values() for ws in layer.values() for w in ws})
        log.info("router: placement version %d", placement.version)

    def set_device(self, device: str | torch.device) -> None:
        """Run the gate, routing, shared experts and combine on ``device`` from now on (the embedded router follows
        its caller's tensors); the transport picks its paths to the workers again."""
        device = torch.device(device)
        self.gates = {layer: g.to(device) for layer, g in self.gates.items()}
        self.shared = {layer: None if s is None else s.to(device=device) for layer, s in self.shared.items()}
        self.device = device
        self.route_backend = resolve_backend("auto", device)
        set_device = getattr(self.transport, "set_device", None)
        if set_device is not None:
            set_device(device)
        log.info("router: tensors on %s", device)

    def transport_report(self) -> dict[str, Any]:
        """How this router reaches its workers: the transport, each worker's path, its compiled graph, the bytes moved."""
        t = self.transport
        report: dict[str, Any] = {"kind": getattr(t, "kind", type(t).__name__), "device": str(self.device)}
        modes = getattr(t, "modes", None)
        report["workers"] = modes() if callable(modes) else {}
        graphs = getattr(t, "graphs", None)
        g = None if graphs is None else graphs.current
        report["graph"] = None if g is None else {
            "id": g.graph_id, "workers": list(g.workers), "alive": g.alive, "executions": g.executions,
        }
        report["calls"] = dict(getattr(t, "stats", {}) or {})
        with self._lock:
            report["bytes"] = {f"{d}:{tr}": n for (d, tr), n in sorted(self.transport_bytes.items())}
        return report

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
        nbytes = hidden.numel() * hidden.element_size()
        call = await self.offload(nbytes, self._start, layer, hidden, router_logits, deadline)
        shared_mod = self.shared[layer]
        shared_task = (
            asyncio.get_running_loop().run_in_executor(self.compute_pool(), self._timed_shared, shared_mod, call.hidden_c)
            if shared_mod is not None
            else None
        )  # the shared experts run beside the workers
        try:
            while True:
                batches, prepared = await self.offload(nbytes, self._dispatch, call)
                self._enter(call)
                try:
                    outcomes = await self.transport.run(prepared, batches, call.budgets)
                    for i, r in enumerate(outcomes):
                        if isinstance(r, Stalled) and not self._hedge(call, batches[i], r):
                            outcomes[i] = await self._wait_stalled(r, call.deadline)
                finally:
                    self._leave(call)
                if self._absorb(call, batches, prepared, outcomes):
                    break
                if call.stale:
                    await self._await_placement_change(0.5)
            shared_out = None if shared_task is None else await shared_task
        except BaseException:
            if shared_task is not None:
                shared_task.cancel()
            raise
        out = await self.offload(nbytes, self._combine, call, shared_out)
        return ForwardResult(out, call.routing, call.version)

    def forward_blocking(
        self, layer: int, hidden: torch.Tensor, router_logits: torch.Tensor | None = None, *, deadline: float | None = None
    ) -> ForwardResult:
        """``forward`` from a caller's own thread (the embedded router): no event loop between the caller and its workers.

        Thread-safe: several threads may call at once (their calls are in flight together on the transport).
        """
        t_start = time.perf_counter()
        with self._lock:
            self._active[layer] += 1
        try:
            call = self._start(layer, hidden, router_logits, deadline)
            shared_mod = self.shared[layer]
            shared_out = None
            while True:
                batches, prepared = self._dispatch(call)
                self._enter(call)
                try:

                    def shared_meanwhile():  # the shared experts while the workers compute
                        nonlocal shared_out
                        shared_out = self._timed_shared(shared_mod, call.hidden_c)

                    meanwhile = shared_meanwhile if shared_mod is not None and shared_out is None else None
                    outcomes = self.transport.run_blocking(prepared, batches, call.budgets, meanwhile=meanwhile)
                    for i, r in enumerate(outcomes):
                        if isinstance(r, Stalled) and not self._hedge(call, batches[i], r):
                            outcomes[i] = self._wait_stalled_blocking(r, call.deadline)
                finally:
                    self._leave(call)
                if self._absorb(call, batches, prepared, outcomes):
                    break
                if call.stale:
                    with self._placement_cv:
                        self._placement_cv.wait(0.5)
            if shared_mod is not None and shared_out is None:
                shared_out = self._timed_shared(shared_mod, call.hidden_c)
            out = self._combine(call, shared_out)
            return ForwardResult(out, call.routing, call.version)
        finally:
            with self._lock:
                self._active[layer] -= 1
                self.stats.forward_s += time.perf_counter() - t_start

    def _start(self, layer: int, hidden: torch.Tensor, router_logits: torch.Tensor | None, deadline: float | None) -> _Call:
        """Gate and route ``hidden [T, H]`` on the router's device; the call's state (stage: gate)."""
        t0 = time.perf_counter()
        hidden_d = hidden if hidden.device == self.device else hidden.to(self.device)
        gate = self.gates[layer]
        logits = gate.logits(hidden_d) if router_logits is None else router_logits.to(self.device).float()
        routing = fused_route(logits, self.spec.layer_spec(layer), gate, self.route_backend)
        hidden_c = hidden_d if hidden_d.dtype == self.dtype else hidden_d.to(self.dtype)
        ids = routing.topk_ids.cpu().numpy()  # dispatch is planned on the host
        weights = routing.topk_weights.float().cpu().numpy()
        self.stages.observe("gate", time.perf_counter() - t0)
        self._count_load(layer, ids, self.spec.layer_spec(layer).num_experts)
        # the worker's clock: wall time (monotonic clocks are per machine)
        wall = None if deadline is None else time.time() + (deadline - time.monotonic())
        return _Call(layer, hidden, hidden_c, routing, ids, weights, np.ones(ids.shape, dtype=bool), wall, t0)

    def _dispatch(self, call: _Call) -> tuple[list[WorkerBatch], Any]:
        """Plan the rows still to serve and build the workers' messages (stages: dispatch_plan, transport_prepare)."""
        t0 = time.perf_counter()
        sub_ids = np.where(call.todo, call.ids, -1)
        replicas = self._replicas_for(call.layer, call.exclude)
        try:
            with self._lock:  # the outstanding counts and the rounding's generator are shared by every caller
                batches = plan_dispatch(sub_ids, call.weights, replicas, self.outstanding, self.placement.speeds, self._rng)
                for b in batches:
                    self.outstanding[b.worker] += b.num_rows
                call.budgets = self._budgets(batches)
        except NoReplicaError as e:
            if self.dead or call.exclude:
                with self._lock:
                    self.stats.failed_fast += 1
                down = sorted(set(self.dead) | call.exclude)
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"layer {call.layer}: {e}: its replicas were on worker(s) {down}, which are down; "
                    "the controller is re-placing them, retry shortly",
                ) from e
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"layer {call.layer}: {e}") from e
        t1 = time.perf_counter()
        self.stages.observe("dispatch_plan", t1 - t0)
        prepared = self.transport.prepare(call.layer, call.hidden_c, batches, call.deadline)
        call.version = self.placement.version
        call.table = (self.placement.generation, call.version)
        self.stages.observe("transport_prepare", time.perf_counter() - t1)
        return batches, prepared

    def _enter(self, call: _Call) -> None:
        with self._lock:
            self._inflight_by_version[call.table] += 1
        call.sent = time.perf_counter()

    def _leave(self, call: _Call) -> None:
        with self._lock:
            self._inflight_by_version[call.table] -= 1
            if not self._inflight_by_version[call.table]:
                del self._inflight_by_version[call.table]
        self.stages.observe("workers", time.perf_counter() - call.sent)

    def _absorb(self, call: _Call, batches: list[WorkerBatch], prepared, outcomes: list) -> bool:
        """Take one dispatch's outcomes into the call: True when every row is served, False to re-dispatch the rest.

        Raises RequestError when the call cannot be served: a worker refused it (deadline), a failure a retry
        would not fix, or retries used up. Sets ``call.stale`` when a worker held an older placement.
        """
        wall_now = time.time()
        failed = []
        served = []
        st = self.stages
        with self._lock:
            for b in batches:
                self.outstanding[b.worker] -= b.num_rows
            for direction, by in (("to_workers", prepared.bytes.to_workers), ("from_workers", prepared.bytes.from_workers)):
                for transport, n in by.items():
                    self.transport_bytes[(direction, transport)] += n
        for b, r in zip(batches, outcomes):
            if isinstance(r, BaseException):
                failed.append((b, r))
                continue
            times = r.times
            st.observe("to_worker", times["start"] - prepared.calls[b.worker].sent)
            for name in WORKER_STAGES:
                st.observe(name, times[name])
            st.observe("return", wall_now - times["end"])
            compute_s = sum(times[name] for name in WORKER_STAGES)
            call.worker_s = max(call.worker_s, compute_s)
            with self._lock:
                self.health.observe(b.worker, b.num_rows, compute_s)
            call.partials.append((b, r))
            served.append(b)
        if not failed:
            return True
        for b in served:  # what the next dispatch must not send again
            call.todo.reshape(-1)[self._slots_of(b, call.ids)] = False
        expired = [r for _, r in failed if isinstance(r, RequestError)]  # a worker refused it: deadline passed
        if expired:
            with self._lock:
                self.stats.expired += 1
            raise expired[0]
        call.attempt += 1
        errors = "; ".join(str(r) for _, r in failed)
        retryable = all(isinstance(r, Stalled) or (isinstance(r, WorkerCallError) and r.retryable) for _, r in failed)
        if call.attempt > self.config.worker_retries or not retryable:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"layer {call.layer}: worker call failed: {errors}")
        with self._lock:
            self.stats.retries += 1
        log.warning("router: layer %d re-dispatch after %s", call.layer, errors)
        call.stale = False
        for b, r in failed:
            if isinstance(r, Stalled):
                call.exclude.add(b.worker)  # its rows go to the other replicas; its late answer is discarded
            elif r.dead:
                call.exclude.add(b.worker)
                self.mark_dead(b.worker)
            elif r.unavailable:
                call.exclude.add(b.worker)  # other replicas first; back to it where it is the only one
            else:
                call.stale = True  # the placement moved on: wait for this router to see the new one
        # a dead worker's rows go straight to the other replicas; experts without one fail fast in _dispatch
        return False

    def _combine(self, call: _Call, shared_out: torch.Tensor | None) -> torch.Tensor:
        """The workers' partial outputs (+ shared experts) as the call's output ``[T, H]`` in the request's dtype (stage: combine).

        Summed in fp32 on the router's device, in batch order, then the shared experts, then the cast. A
        partial is a view of the transport's buffer: it is read here and never kept (a graph reuses the buffer
        once released), so the output is always a tensor of its own.
        """
        t0 = time.perf_counter()
        num_tokens, hidden_size = call.hidden.shape
        partials = call.partials
        if len(partials) == 1 and len(partials[0][0].unique_tokens) == num_tokens:
            out = self._partial_tensor(partials[0][1]).to(torch.float32, copy=True)  # its unique tokens are 0..T-1 in order
        elif self.device.type == "cpu" and num_tokens * hidden_size < SMALL_COMBINE:
            # small: numpy, on this thread (torch's index_add_ opens a parallel region for a single row, and its
            # threads' wake-up costs more than the sum when the cores are busy with the workers)
            acc = np.zeros((num_tokens, hidden_size), dtype=np.float32)
            for b, reply in partials:
                acc[b.unique_tokens] += self._partial_tensor(reply).float().numpy()  # a batch's tokens are unique
            out = torch.from_numpy(acc)
        else:
            out = torch.zeros(num_tokens, hidden_size, dtype=torch.float32, device=self.device)
            for b, reply in partials:
                idx = torch.from_numpy(b.unique_tokens).to(self.device)
                out.index_add_(0, idx, self._partial_tensor(reply).float())
        call.partials = []
        if shared_out is not None:
            out += shared_out.float()
        out = out.to(call.hidden.dtype)
        t1 = time.perf_counter()
        self.stages.observe("combine", t1 - t0)
        with self._lock:
            self.stats.batches += 1
            self.stats.tokens_computed += num_tokens
        self.stages.observe("call_overhead", max(0.0, t1 - call.started - call.worker_s))
        return out

    def _partial_tensor(self, reply) -> torch.Tensor:
        p = reply.partial
        t = open_tensor(p) if isinstance(p, CudaTensorHandle) else from_numpy(np.asarray(p), reply.dtype)
        return t if t.device == self.device else t.to(self.device)

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
        """The layer's replicas without dead workers, and without the call's excluded ones (stalled, unreachable,
        dead) and quarantined ones where another replica is left (``health.avoid``): a worker that is only slow or
        briefly unreachable is tried again rather than its rows failed."""
        reps = self._replicas.get(layer, {})
        if self.dead:
            now = time.monotonic()
            for w, t in list(self.dead.items()):
                if now - t > self.DEAD_RETRY_S:
                    self.dead.pop(w, None)
        quarantined = self.health.quarantined
        if not self.dead and not exclude and not quarantined:
            return reps
        return avoid(reps, set(quarantined) | set(exclude), set(self.dead))

    # -- stragglers ------------------------------------------------------
    def _budgets(self, batches: list[WorkerBatch]) -> dict[str, float]:
        """Seconds each worker of a dispatch may take, from its recent speed and the rows queued before this call
        (callers hold ``_lock``; ``outstanding`` already counts this call's rows)."""
        return {b.worker: self.health.budget(b.worker, b.num_rows, self.outstanding[b.worker] - b.num_rows) for b in batches}

    def _hedge(self, call: _Call, batch: WorkerBatch, stalled: Stalled) -> bool:
        """A worker passed its budget: quarantine it; True when every expert of its batch has another live replica
        (the batch is re-dispatched there and its late answer discarded), False to wait for the worker."""
        worker = batch.worker
        with self._lock:
            first = not self.health.is_quarantined(worker)
            self.health.stalled(worker, time.monotonic())
        if first:
            log.warning("router: %s passed its budget of %.2f s; quarantined until it answers", worker, stalled.budget_s)
            self.transport.avoid(set(self.health.quarantined))
        stalled.on_done(lambda: self._answered(worker))
        reps = self._replicas.get(call.layer, {})
        gone = set(self.dead) | call.exclude | set(self.health.quarantined)
        return all(any(w not in gone for w in reps.get(e, ())) for e in batch.experts)

    def _answered(self, worker: str) -> None:
        with self._lock:
            was = self.health.answered(worker)
        if was:
            log.info("router: %s answers again; out of quarantine", worker)
            self.transport.avoid(set(self.health.quarantined))

    async def _wait_stalled(self, stalled: Stalled, deadline: float | None):
        """The rows of a stalled worker that no other replica holds: wait for them (until the call's deadline)."""
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        try:
            return await asyncio.wait_for(asyncio.shield(stalled.wait()), timeout)
        except asyncio.TimeoutError:
            return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{stalled}; the deadline passed waiting for it")

    def _wait_stalled_blocking(self, stalled: Stalled, deadline: float | None):
        import concurrent.futures

        timeout = None if deadline is None else max(0.0, deadline - time.time())
        try:
            return stalled.wait_blocking(timeout)
        except concurrent.futures.TimeoutError:
            return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{stalled}; the deadline passed waiting for it")

    async def _await_placement_change(self, timeout: float) -> None:
        self._placement_changed.clear()
        try:
            await asyncio.wait_for(self._placement_changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _count_load(self, layer: int, ids: np.ndarray, num_experts: int) -> None:
        t0 = time.perf_counter()
        flat = ids.reshape(-1)
        counts = np.bincount(flat[flat >= 0], minlength=num_experts)
        with self._lock:
            for e in np.flatnonzero(counts):
                self.load_counts[(layer, int(e))] += int(counts[e])
            self.stats.telemetry_s += time.perf_counter() - t0

    def take_load_counts(self) -> dict[tuple[int, int], int]:
        """Token counts per (layer, expert) since the last call (for telemetry)."""
        with self._lock:
            counts, self.load_counts = dict(self.load_counts), defaultdict(int)
        return counts
