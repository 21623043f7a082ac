"""How a layer call's rows reach the workers and their partial outputs come back.

A transport takes one layer call — the hidden states in the compute dtype on
the router's device, and the dispatch plan's ``WorkerBatch``es — and returns,
per batch, the worker's ``WorkerReply`` or the error of that batch
(``run``, from the router's event loop; ``run_blocking``, from a caller's
thread: the embedded router). What each worker receives is decided per worker
(``gpu_transport.choose_transport``, the cost model's names):

* ``shared_memory`` (same node, host memory): the call's batch is written
  once and every such worker reads it in place, materialising only its rows;
* ``cuda_ipc`` (same node, GPUs both can open): a handle to the router's batch,
  and the partial comes back as a handle;
* ``rows`` (another node, or not yet known): the worker's unique tokens only.

``RayTransport`` carries the calls on a compiled graph per worker set
(``graph.py``: shared-memory channels, about 0.7 ms per execution) over the
workers its policy names (``graph_members``: by default, ``auto``, the workers
of the router's node that compute on GPUs — a graph's channel reader keeps a
core of each of its workers busy, and a CPU worker needs its cores for the
experts), serves the others through plain actor calls, and falls back to plain actor calls while a graph is being compiled, when a worker
has no free graph slot, or when a graph broke (a worker died: the router's
retry finds the dead worker through a plain call and re-dispatches its rows).
On plain calls the shared batch goes into Ray's object store once
(``ray.put``, zero-copy views for the readers) above Ray's inline limit.

``LocalTransport``: workers in this process (``ExpertGroupCore``), for the
in-process fleet and tests of the serving path without a cluster.

Every call's bytes are counted by the cost model's ``call_bytes``
(``moefleet.core.cost_model``), the function the simulator charges with.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch

from moefleet.core.calls import WorkerCall, WorkerFailure, WorkerReply
from moefleet.core.cost_model import CallBytes, WorkerPart, call_bytes
from moefleet.core.cuda_ipc import export_tensor
from moefleet.core.placement import WORKER_PREFIX, worker_actor_name  # noqa: F401  (re-exported)
from moefleet.core.processes import inline_limit
from moefleet.core.tensors import dtype_name, to_numpy

from .dispatch import WorkerBatch
from .gpu_transport import CUDA_IPC, ROWS, SHARED_MEMORY, Endpoint, choose_transport, local_endpoint
from .graph import GraphBrokenError, GraphSet, WorkerGraph
from .router import RequestError, Stalled, WorkerCallError

log = logging.getLogger(__name__)

Outcome = WorkerReply | BaseException

GRAPH_POLICIES = ("auto", "on", "off")


def graph_policy(value: bool | str) -> str:
    """``compiled_graphs`` as one of ``GRAPH_POLICIES`` (True is ``on``, False ``off``)."""
    if value is True:
        return "on"
    if value is False:
        return "off"
    if isinstance(value, str) and value in GRAPH_POLICIES:
        return value
    raise ValueError(f"compiled_graphs: {value!r} is not one of {', '.join(GRAPH_POLICIES)} (or a bool)")


def graph_members(policy: str, router: Endpoint, workers: dict[str, Endpoint | None]) -> tuple[str, ...]:
    """The workers a router's compiled graph covers, under ``policy`` (pure).

    workers: each worker's Endpoint (None while unknown: never in a graph). Only workers on the router's node
    (shared memory or CUDA IPC): a graph whose channels cross nodes can take a raylet down when it is torn down
    with a value in flight (Ray 2.60: a failed check in its mutable-object provider). ``auto`` keeps those that
    compute on a GPU: a graph's reader loop polls its channel on a core of the worker's process, which costs a
    GPU worker a spare host core and a CPU worker a share of the cores its experts run on (measured on a 2-core
    machine: a torch workload beside an idle graph ran 1.5x slower).
    """
    policy = graph_policy(policy)
    if policy == "off":
        return ()
    keep = []
    for w, ep in sorted(workers.items()):
        if ep is None or choose_transport(router, ep)[0] not in (SHARED_MEMORY, CUDA_IPC):
            continue
        if policy == "auto" and ep.gpu is None:
            continue
        keep.append(w)
    return tuple(keep)


@dataclass
class Prepared:
    """One layer call's messages: a ``WorkerCall`` per worker, the shared batch (host and/or CUDA IPC), its bytes."""

    calls: dict[str, WorkerCall]
    host: np.ndarray | None = None
    ipc: Any = None
    bytes: CallBytes = field(default_factory=CallBytes)
    host_ref: Any = None  # the host batch in Ray's object store (plain calls above the inline limit)

    @property
    def shared(self) -> tuple:
        return (self.host, self.ipc)


def prepare_calls(
    layer: int, hidden: torch.Tensor, batches: list[WorkerBatch], modes: dict[str, str], deadline: float | None
) -> Prepared:
    """The messages of one layer call (pure but for torch's copies): ``hidden`` [T, H] in the compute dtype.

    shared_memory / cuda_ipc workers read the shared batch at their rows (``token_index``: their unique
    tokens); a rows worker gets its unique tokens' hidden states in its call and reads them in order.
    local: as shared_memory (a worker in this process reads the batch in place).
    """
    need_host = any(modes[b.worker] in (SHARED_MEMORY, "local") for b in batches)
    need_ipc = any(modes[b.worker] == CUDA_IPC for b in batches)
    host = to_numpy(hidden) if need_host else None
    ipc = export_tensor(hidden) if need_ipc else None
    dt = dtype_name(hidden.dtype)
    now = time.time()
    calls: dict[str, WorkerCall] = {}
    parts = []
    for b in batches:
        mode = modes[b.worker]
        if mode == ROWS:
            uniq = torch.from_numpy(b.unique_tokens)
            x = to_numpy(hidden.index_select(0, uniq.to(hidden.device)))
            calls[b.worker] = WorkerCall(
                layer, b.inverse, b.weights, tuple(b.experts), tuple(b.counts), b.inverse, len(b.unique_tokens),
                token_index=None, x=x, dtype=dt, deadline=deadline, sent=now, transport=ROWS,
            )
        else:
            calls[b.worker] = WorkerCall(
                layer, b.rows, b.weights, tuple(b.experts), tuple(b.counts), b.inverse, len(b.unique_tokens),
                token_index=b.unique_tokens, x=None, dtype=dt, deadline=deadline, sent=now, transport=mode,
                reply_ipc=mode == CUDA_IPC,
            )
        parts.append(WorkerPart(b.worker, b.num_rows, len(b.unique_tokens), mode, len(b.experts)))
    size = hidden.element_size()
    nbytes = call_bytes(int(hidden.shape[0]), int(hidden.shape[1]), size, size, parts)
    return Prepared(calls, host, ipc, nbytes)


def outcome(worker: str, value: Any) -> Outcome:
    """A worker's answer as the router takes it: the reply, or the error of that batch."""
    if isinstance(value, WorkerReply):
        return value
    if isinstance(value, WorkerFailure):
        if value.kind == "expired":
            return _expired(worker)
        if value.kind == "not_loaded":  # the placement moved on: worth a retry on the new one
            return WorkerCallError(worker, LookupError(value.message), retryable=True)
        return WorkerCallError(worker, RuntimeError(value.message), retryable=False)
    if isinstance(value, BaseException):
        return value
    return WorkerCallError(worker, RuntimeError(f"worker {worker} gave no reply ({type(value).__name__})"), retryable=True)


class RayTransport:
    """Workers are named ``ExpertGroup`` actors in ``namespace`` (module docstring).

    router_key: this router's heartbeat key (``router:<id>``), by which workers tell that the router behind a
    graph is alive; None for a router without heartbeats (then workers never close its graphs themselves).
    device: where the router keeps its tensors. compiled_graphs: which workers a compiled graph carries
    (``graph_members``): ``auto`` (those on GPUs), ``on``/True (every worker of the node), ``off``/False (plain
    actor calls only).
    """

    def __init__(self, namespace: str, *, router_key: str | None = None, device: str | torch.device = "cpu",
                 compiled_graphs: bool | str = "auto"):
        import ray

        self._ray = ray
        self.namespace = namespace
        self.router_key = router_key
        self.endpoint: Endpoint = local_endpoint(ray.get_runtime_context().get_node_id(), device)
        self._handles: dict[str, Any] = {}
        self._modes: dict[str, str] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._mode_lock = threading.Lock()
        self.inline_bytes = inline_limit()  # what Ray inlines here (raised in serving processes: core/processes.py)
        self.graph_policy = graph_policy(compiled_graphs)
        self.graphs = GraphSet(self._build_graph, enabled=self.graph_policy != "off")
        self._workers: tuple[str, ...] = ()
        self._avoided: set[str] = set()
        self.stats = {"graph_calls": 0, "plain_calls": 0, "graph_fallbacks": 0, "graph_abandoned": 0}

    @property
    def kind(self) -> str:
        """``compiled_graph`` while a live graph carries calls, else ``actor_calls``."""
        g = self.graphs.current
        return "compiled_graph" if g is not None and g.alive else "actor_calls"

    def set_device(self, device: str | torch.device) -> None:
        """The router keeps its tensors on ``device`` now: learn every path again, compile a new graph."""
        self.endpoint = local_endpoint(self.endpoint.node, device)
        with self._mode_lock:
            workers = tuple(self._modes)
            self._modes.clear()
            self._endpoints.clear()
        self.graphs.rebuild()
        if workers:
            self.set_workers(workers)

    # -- workers --------------------------------------------------------
    def handle(self, worker: str):
        h = self._handles.get(worker)
        if h is None:
            h = self._ray.get_actor(worker_actor_name(worker), namespace=self.namespace)
            self._handles[worker] = h
        return h

    def forget(self, worker: str) -> None:
        self._handles.pop(worker, None)
        with self._mode_lock:
            self._modes.pop(worker, None)
            self._endpoints.pop(worker, None)

    def mode(self, worker: str) -> str:
        """How this router reaches ``worker`` (``gpu_transport``); ``rows`` until its endpoint is known (correct anywhere)."""
        return self._modes.get(worker, ROWS)

    def modes(self) -> dict[str, str]:
        return dict(self._modes)

    def resolve(self, workers, timeout_s: float = 10.0) -> None:
        """Learn where ``workers`` keep their tensors (blocking: from a background thread)."""
        todo = [w for w in workers if w not in self._modes]
        refs = {}
        for w in todo:
            try:
                refs[w] = self.handle(w).endpoint.remote()
            except ValueError:  # not started yet: rows until it is known
                continue
        for w, ref in refs.items():
            try:
                node, gpu, visible = self._ray.get(ref, timeout=timeout_s)
            except Exception as e:  # dead or slow: it stays a rows worker
                log.debug("endpoint of %s unknown: %s", w, e)
                continue
            ep = Endpoint(node, gpu, tuple(visible))
            mode, why = choose_transport(self.endpoint, ep)
            with self._mode_lock:
                self._modes[w] = mode
                self._endpoints[w] = ep
            log.info("router: %s reached by %s (%s)", w, mode, why)

    def set_workers(self, workers) -> None:
        """The placement's workers: learn their endpoints and compile a graph over them (in the background)."""
        workers = tuple(sorted(set(workers)))
        self._workers = workers
        for w in list(self._handles):
            if w not in workers:
                self.forget(w)
        if self.graphs.enabled:
            self.graphs.want(tuple(w for w in workers if w not in self._avoided))  # the build resolves endpoints first
        else:
            threading.Thread(target=self.resolve, args=(workers,), name="moefleet-endpoints", daemon=True).start()

    def avoid(self, workers) -> None:
        """Keep ``workers`` (stalled) out of the compiled graph until they answer again (then ``avoid`` without them)."""
        workers = set(workers)
        if workers == self._avoided:
            return
        self._avoided = workers
        if self.graphs.enabled and self._workers:
            self.graphs.want(tuple(w for w in self._workers if w not in workers))

    def _build_graph(self, workers: tuple[str, ...]) -> WorkerGraph | None:
        import uuid

        self.resolve(workers)
        with self._mode_lock:
            known = {w: self._endpoints.get(w) for w in workers}
        workers = graph_members(self.graph_policy, self.endpoint, known)  # the others: plain actor calls
        if not workers:
            return None
        handles = {w: self.handle(w) for w in workers}
        graph_id = uuid.uuid4().hex[:12]
        joined = []
        try:
            for w in workers:
                if not self._ray.get(handles[w].join_graph.remote(graph_id, self.router_key), timeout=10):
                    log.warning("router: %s has no free compiled-graph slot; serving through plain actor calls", w)
                    return None
                joined.append(w)
            shared = {w for w in workers if self.mode(w) in (SHARED_MEMORY, CUDA_IPC)}
            t0 = time.perf_counter()
            graph = WorkerGraph(list(workers), handles, shared, graph_id=graph_id)
            for w in workers:
                handles[w].watch_graph.remote(graph_id, graph.executable_tasks.get(w))
            graph.on_teardown = lambda: [self._leave(handles[w], graph_id) for w in workers]
            log.info("router: compiled graph %s over %s in %.2f s", graph_id, list(workers), time.perf_counter() - t0)
            joined = []
            return graph
        finally:
            for w in joined:  # not built: give the slots back
                self._leave(handles[w], graph_id)

    @staticmethod
    def _leave(handle, graph_id: str) -> None:
        try:
            handle.leave_graph.remote(graph_id)
        except Exception:  # the worker is gone: its slots went with it
            pass

    # -- calls ------------------------------------------------------------
    def prepare(self, layer: int, hidden: torch.Tensor, batches: list[WorkerBatch], deadline: float | None) -> Prepared:
        return prepare_calls(layer, hidden, batches, {b.worker: self.mode(b.worker) for b in batches}, deadline)

    async def run(self, prepared: Prepared, batches: list[WorkerBatch], budgets: dict[str, float] | None = None) -> list[Outcome]:
        """Each batch's outcome: the batches of workers in this router's graph as one graph execution, the others
        (workers on other nodes; workers outside the graph) as plain actor calls, all at once.

        With ``budgets`` (worker -> seconds), a plain call still running past its worker's budget comes back as
        ``Stalled``; a graph execution past the largest budget of its workers is abandoned (a stalled worker holds
        every execution of a graph) and its batches go through plain calls.
        """
        graph, in_graph, plain = self._split(batches)
        out: list = [None] * len(batches)
        graph_wait = None
        if in_graph:
            try:
                if graph.has_slot():
                    fut = graph.submit(prepared.shared, {batches[i].worker: prepared.calls[batches[i].worker] for i in in_graph})
                else:  # every execution slot is taken: wait for one off the event loop
                    calls = {batches[i].worker: prepared.calls[batches[i].worker] for i in in_graph}
                    fut = await asyncio.get_running_loop().run_in_executor(None, graph.submit, prepared.shared, calls)
                graph_wait = asyncio.wrap_future(fut)
            except GraphBrokenError as e:
                self._fell_back(e)
                plain, in_graph = sorted(plain + in_graph), []
        tasks = {i: asyncio.ensure_future(self._plain(batches[i].worker, prepared)) for i in plain}
        if graph_wait is not None:
            limit = _graph_budget(budgets, batches, in_graph)
            done, _ = await asyncio.wait({graph_wait}, timeout=limit)
            if not done:
                self._abandon(graph, limit)
            try:
                self._take(graph, await graph_wait, batches, in_graph, out)
            except GraphBrokenError as e:
                self._fell_back(e)
                for i in in_graph:
                    tasks[i] = asyncio.ensure_future(self._plain(batches[i].worker, prepared))
        if tasks:
            self.stats["plain_calls"] += 1
            idx = sorted(tasks)
            got = await within_budgets([tasks[i] for i in idx], [batches[i] for i in idx], budgets)
            for i, r in zip(idx, got):
                out[i] = r
        return out

    def _split(self, batches: list[WorkerBatch]) -> tuple[WorkerGraph | None, list[int], list[int]]:
        """(the live graph, indices of batches it carries, indices of batches that go through plain calls)."""
        graph = self.graphs.live()
        if graph is None:
            return None, [], list(range(len(batches)))
        in_graph = [i for i, b in enumerate(batches) if b.worker in graph.index]
        return graph, in_graph, [i for i, b in enumerate(batches) if b.worker not in graph.index]

    def _take(self, graph: WorkerGraph, values: list, batches: list[WorkerBatch], in_graph: list[int], out: list) -> None:
        """A graph execution's replies into ``out`` at its batches' places."""
        self.stats["graph_calls"] += 1
        for i in in_graph:
            out[i] = outcome(batches[i].worker, values[graph.index[batches[i].worker]])

    def _fell_back(self, e: BaseException) -> None:
        self.stats["graph_fallbacks"] += 1
        log.info("router: %s; this call goes through plain actor calls", e)
        self.graphs.tick()

    def _abandon(self, graph: WorkerGraph, limit: float | None) -> None:
        self.stats["graph_abandoned"] = self.stats.get("graph_abandoned", 0) + 1
        graph.abandon(f"graph {graph.graph_id}: an execution passed its budget of {limit:.2f} s (a worker stalled)")

    def run_blocking(
        self, prepared: Prepared, batches: list[WorkerBatch], budgets: dict[str, float] | None = None, meanwhile=None
    ) -> list[Outcome]:
        """``run`` from the caller's thread; ``meanwhile()`` runs once the workers have their calls."""
        import concurrent.futures

        graph, in_graph, plain = self._split(batches)
        out: list = [None] * len(batches)
        fut = None
        if in_graph:
            try:
                fut = graph.submit(prepared.shared, {batches[i].worker: prepared.calls[batches[i].worker] for i in in_graph})
            except GraphBrokenError as e:
                self._fell_back(e)
                plain, in_graph = sorted(plain + in_graph), []
        futures = {i: self._submit_plain_future(batches[i].worker, prepared) for i in plain}
        if meanwhile is not None:
            meanwhile()
        if fut is not None:
            limit = _graph_budget(budgets, batches, in_graph)
            try:
                try:
                    values = fut.result(limit)
                except concurrent.futures.TimeoutError:
                    self._abandon(graph, limit)
                    values = fut.result()
                self._take(graph, values, batches, in_graph, out)
            except GraphBrokenError as e:
                self._fell_back(e)
                for i in in_graph:
                    futures[i] = self._submit_plain_future(batches[i].worker, prepared)
        if futures:
            self.stats["plain_calls"] += 1
        start = time.monotonic()
        for i, f in futures.items():
            limit = (budgets or {}).get(batches[i].worker)
            try:
                out[i] = f.result(None if limit is None else max(0.0, limit - (time.monotonic() - start)))
            except concurrent.futures.TimeoutError:
                out[i] = Stalled(batches[i].worker, limit, future=f)
        return out

    def _submit_plain_future(self, worker: str, prepared: Prepared):
        """A plain call's outcome as a concurrent future (an immediate one when the call cannot be made)."""
        import concurrent.futures

        ref = self._submit_plain(worker, prepared)
        if isinstance(ref, BaseException):
            f: concurrent.futures.Future = concurrent.futures.Future()
            f.set_result(ref)
            return f
        return self._outcome_future(worker, ref)

    def _outcome_future(self, worker: str, ref):
        """A concurrent future of a plain call's outcome (never raising: errors are outcomes)."""
        import concurrent.futures

        fut: concurrent.futures.Future = concurrent.futures.Future()

        def done(f):
            try:
                fut.set_result(outcome(worker, f.result()))
            except BaseException as e:  # noqa: BLE001 - classified like the async path
                fut.set_result(self._ray_error(worker, e))

        ref.future().add_done_callback(done)
        return fut

    def _submit_plain(self, worker: str, prepared: Prepared):
        call = prepared.calls[worker]
        try:
            handle = self.handle(worker)
        except ValueError as e:  # no actor of that name: retired, dead and not restarted, or not started yet
            return WorkerCallError(worker, e, retryable=True, dead=True)
        host = None
        if call.transport == SHARED_MEMORY:
            host = prepared.host
            if host is not None and host.nbytes > self.inline_bytes:
                if prepared.host_ref is None:  # into the object store once for every worker of the call
                    prepared.host_ref = self._ray.put(host)
                host = prepared.host_ref
        return handle.serve.remote(call, host, prepared.ipc if call.transport == CUDA_IPC else None)

    async def _plain(self, worker: str, prepared: Prepared) -> Outcome:
        ref = self._submit_plain(worker, prepared)
        if isinstance(ref, BaseException):
            return ref
        try:
            return outcome(worker, await ref)
        except Exception as e:  # noqa: BLE001 - classified below
            return self._ray_error(worker, e)

    def _ray_error(self, worker: str, e: BaseException) -> BaseException:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

        if isinstance(e, RayTaskError):
            # The worker ran the call and raised (not a failure it reports as a value): it is alive.
            return WorkerCallError(worker, e.as_instanceof_cause(), retryable=False)
        if isinstance(e, ActorUnavailableError):  # not reachable for now (a restart, a slow link): not dead
            return WorkerCallError(worker, e, retryable=True, unavailable=True)
        if isinstance(e, (ActorDiedError, RayActorError)):
            self.forget(worker)
            return WorkerCallError(worker, e, retryable=True, dead=True)
        if isinstance(e, GetTimeoutError):
            return WorkerCallError(worker, e, retryable=True)
        return WorkerCallError(worker, e, retryable=False)

    def tick(self) -> None:
        self.graphs.tick()

    def close(self, wait: bool = False) -> None:
        graphs = self.graphs.close()
        if wait:
            for g in graphs:
                g.teardown()
            self.graphs.join_teardowns()
        elif graphs:
            threading.Thread(target=lambda: [g.teardown() for g in graphs], name="moefleet-graph-teardown", daemon=True).start()


class LocalTransport:
    """Workers are ``ExpertGroupCore`` objects in this process, run on a thread pool."""

    kind = "local"

    def __init__(self, workers: dict[str, Any]):
        self.workers = workers
        self.stats: dict[str, int] = {}

    def set_workers(self, workers) -> None:
        pass

    def avoid(self, workers) -> None:
        pass

    def mode(self, worker: str) -> str:
        return "local"

    def prepare(self, layer: int, hidden: torch.Tensor, batches: list[WorkerBatch], deadline: float | None) -> Prepared:
        return prepare_calls(layer, hidden, batches, {b.worker: "local" for b in batches}, deadline)

    def _one(self, worker: str, prepared: Prepared) -> Outcome:
        w = self.workers.get(worker)
        if w is None:
            return WorkerCallError(worker, LookupError(f"no worker {worker}"), retryable=True, dead=True)
        return outcome(worker, w.serve(prepared.calls[worker], prepared.host))

    async def run(self, prepared: Prepared, batches: list[WorkerBatch], budgets: dict[str, float] | None = None) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(loop.run_in_executor(None, functools.partial(self._one, b.worker, prepared))) for b in batches]
        return await within_budgets(tasks, batches, budgets)

    def run_blocking(
        self, prepared: Prepared, batches: list[WorkerBatch], budgets: dict[str, float] | None = None, meanwhile=None
    ) -> list[Outcome]:
        out = [self._one(b.worker, prepared) for b in batches]
        if meanwhile is not None:
            meanwhile()
        return out

    def tick(self) -> None:
        pass

    def close(self, wait: bool = False) -> None:
        pass


def _graph_budget(budgets: dict[str, float] | None, batches: list[WorkerBatch], in_graph: list[int]) -> float | None:
    """How long a graph execution may take: the largest budget of the workers it carries (None: no limit)."""
    return max(budgets.get(batches[i].worker, 0.0) for i in in_graph) if budgets else None


async def within_budgets(tasks: list, batches: list[WorkerBatch], budgets: dict[str, float] | None) -> list[Outcome]:
    """The tasks' outcomes, each awaited up to its worker's budget; one still running then is ``Stalled`` (it runs on)."""
    if not budgets:
        return list(await asyncio.gather(*tasks))
    loop = asyncio.get_running_loop()
    start = loop.time()
    limits = [budgets.get(b.worker, float("inf")) for b in batches]
    out: list = [None] * len(batches)
    waiting = set(range(len(batches)))
    while waiting:
        now = loop.time() - start
        for i in [i for i in waiting if tasks[i].done()]:
            out[i] = tasks[i].result()
            waiting.discard(i)
        for i in [i for i in waiting if now >= limits[i]]:
            out[i] = Stalled(batches[i].worker, limits[i], task=tasks[i])
            waiting.discard(i)
        if waiting:
            await asyncio.wait([tasks[i] for i in waiting], timeout=min(limits[i] for i in waiting) - now,
                               return_when=asyncio.FIRST_COMPLETED)
    return out


def _expired(worker: str) -> RequestError:
    return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline expired before worker {worker} started the batch; not computed")
