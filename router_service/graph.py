"""The router -> workers hop as a Ray Compiled Graph: one graph per router per worker set.

A plain Ray actor call costs about 2.2 ms on the development machine, two in
parallel 2.2 ms at one token and 7.3 ms at 32; the same two workers behind a
compiled graph answer in 0.7 ms (DESIGN.md). A layer call is one graph
execution: the router writes every worker's part into the graph's channels
(shared memory on a node), each worker's ``graph_call`` runs its part, and the
router reads every worker's reply.

``WorkerGraph`` is one compiled graph over a fixed, ordered set of workers:

* **inputs**: ``inp[0]``, the call's whole batch, read by the workers of the
  router's node (one shared-memory channel, several readers: the batch is
  written once), then one channel per worker with its ``WorkerCall``; a worker
  on another node reads only its own channel, whose call carries its rows.
  Every execution reaches every worker of the graph; one without rows in it
  gets ``None`` and answers ``None`` at once.
* **submission** (``submit``) writes the inputs from the caller's thread and
  returns a ``concurrent.futures.Future``; **one reader thread** reads the
  executions' outputs in order (a compiled graph's outputs come in submission
  order) and completes the futures. Several executions are in flight at once
  (``max_inflight``): a pipelined model keeps its workers busy.
* **failure**: an execution whose outputs cannot be read (a worker died; the
  graph was torn down) fails with ``GraphBrokenError``, as does every
  execution after it; the graph is dead from then on and its owner
  (``GraphSet``) serves through plain calls and compiles a new one.

Replies hold zero-copy views of the graph's output buffers, which the graph
reuses only once they are released: the router consumes a reply (sums it into
the call's output) before it keeps anything of it, and never hands a view to
its caller.

``GraphSet`` owns a router's graph over the current placement's workers:
compiled off the hot path in a background thread when the worker set changes
(calls go through plain actor calls meanwhile), swapped in when ready, and the
old graph torn down once its executions have drained. Workers take part in at
most ``GRAPH_SLOTS`` graphs (``ExpertGroupActor.join_graph``); a router that
finds no free slot on a worker serves it through plain calls, and a worker
closes the graph of a router whose heartbeat is gone.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any, Callable

from moefleet.core.processes import polling_thread

log = logging.getLogger(__name__)

MAX_INFLIGHT = 8
"""Executions one graph has in flight at once (pipelined layer calls)."""


class GraphBrokenError(RuntimeError):
    """The graph cannot deliver this execution (a worker died, the graph was torn down): serve it another way."""


class WorkerGraph:
    """One compiled graph over ``workers`` (module docstring).

    handles: worker -> actor handle. shared_workers: workers that read the
    call's shared batch (``inp[0]``); the others get their rows in their call.
    """

    def __init__(
        self,
        workers: list[str],
        handles: dict[str, Any],
        shared_workers: set[str],
        *,
        graph_id: str | None = None,
        max_inflight: int = MAX_INFLIGHT,
        submit_timeout_s: float = 10.0,
    ):
        import ray
        from ray.dag import InputNode, MultiOutputNode

        self.graph_id = graph_id or uuid.uuid4().hex[:12]
        self.workers = list(workers)
        self.index = {w: i for i, w in enumerate(self.workers)}
        self.shared_workers = set(shared_workers) & set(self.workers)
        self.max_inflight = max_inflight
        first = 1 if self.shared_workers else 0
        with InputNode() as inp:
            outputs = [
                handles[w].graph_call.bind(inp[0] if w in self.shared_workers else None, inp[first + i])
                for i, w in enumerate(self.workers)
            ]
            dag = MultiOutputNode(outputs)
        # +1: the graph counts an execution in flight until its refs are released, after the reader took them
        self.compiled = dag.experimental_compile(_max_inflight_executions=max_inflight + 1, _submit_timeout=submit_timeout_s)
        # one empty execution: every worker's loop thread runs graph_call once and drops to the idle class
        ray.get(self.compiled.execute(*([None] if self.shared_workers else []), *([None] * len(self.workers))), timeout=60)
        self.executable_tasks = {w: self.compiled.actor_to_executable_tasks.get(handles[w]) for w in self.workers}
        self._submit_lock = threading.Lock()
        self._cv = threading.Condition()
        self._inflight: collections.deque[tuple[list, Future, float]] = collections.deque()
        self._slots = threading.Semaphore(max_inflight)
        self.dead: BaseException | None = None
        self.on_teardown: Callable[[], Any] | None = None  # e.g. give the workers' graph slots back
        self.executions = 0
        self._stop = False
        self._reader = threading.Thread(target=self._read_loop, name=f"moefleet-graph-{self.graph_id}", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self.dead is None

    def has_slot(self) -> bool:
        """Whether ``submit`` would find an execution slot without waiting (a hint: another thread may take it)."""
        return self.inflight() < self.max_inflight

    def inflight(self) -> int:
        with self._cv:
            return len(self._inflight)

    def oldest_inflight_s(self) -> float:
        """How long the oldest execution in flight has waited (0 when none)."""
        with self._cv:
            return time.monotonic() - self._inflight[0][2] if self._inflight else 0.0

    def submit(self, shared, calls: dict[str, Any], timeout_s: float = 10.0) -> Future:
        """Write one execution: ``shared`` for the shared readers, ``calls[worker]`` (or None) for each worker.

        Returns a future of ``[reply or None per worker, in self.workers order]``; raises
        ``GraphBrokenError`` at once when the graph is dead or no execution slot frees in ``timeout_s``.
        """
        if self.dead is not None:
            raise GraphBrokenError(f"graph {self.graph_id} is down: {self.dead}")
        if not self._slots.acquire(timeout=timeout_s):
            raise GraphBrokenError(f"graph {self.graph_id}: no execution slot freed in {timeout_s:.1f} s")
        args = ([shared] if self.shared_workers else []) + [calls.get(w) for w in self.workers]
        fut: Future = Future()
        try:
            with self._submit_lock:
                if self.dead is not None:
                    raise GraphBrokenError(f"graph {self.graph_id} is down: {self.dead}")
                refs = self.compiled.execute(*args)
                with self._cv:
                    self._inflight.append((refs, fut, time.monotonic()))
                    self._cv.notify()
                self.executions += 1
        except GraphBrokenError:
            self._slots.release()
            raise
        except Exception as e:  # the graph's channels are closed or stuck: it is of no further use
            self._slots.release()
            self._fail(e)
            raise GraphBrokenError(f"graph {self.graph_id}: submit failed: {type(e).__name__}: {e}") from e
        return fut

    def _read_loop(self) -> None:
        polling_thread()  # its reads spin while the workers compute: only on CPU time nothing else wants
        while True:
            with self._cv:
                while not self._inflight and not self._stop:
                    self._cv.wait()
                if self._stop and not self._inflight:
                    return
                refs, fut, _ = self._inflight[0]
            try:
                values = [ref.get(timeout=-1) for ref in refs]
            except BaseException as e:  # noqa: BLE001 - any failure ends the graph: its executions go elsewhere
                self._fail(e)
                return
            with self._cv:
                self._inflight.popleft()
            del refs
            self._slots.release()
            if not fut.done():
                fut.set_result(values)

    def _fail(self, e: BaseException) -> None:
        """Mark the graph dead and fail every execution in flight (their callers re-dispatch)."""
        with self._cv:
            if self.dead is None:
                self.dead = e
                log.warning("graph %s over %s is down: %s: %s", self.graph_id, self.workers, type(e).__name__, e)
            pending = list(self._inflight)
            self._inflight.clear()
            self._stop = True
            self._cv.notify_all()
        for _, fut, _ in pending:
            if not fut.done():
                fut.set_exception(GraphBrokenError(f"graph {self.graph_id} is down: {type(e).__name__}: {e}"))

    def abandon(self, why: str) -> None:
        """Stop using this graph (a worker of it stalled): fail what is in flight; ``teardown`` later."""
        self._fail(GraphBrokenError(why))

    def drained(self) -> bool:
        return self.inflight() == 0

    def teardown(self) -> None:
        """Close the graph's channels and end its loops on the workers (blocks up to Ray's teardown timeout)."""
        if self.dead is None:
            self._fail(GraphBrokenError(f"graph {self.graph_id} torn down"))
        try:
            self.compiled.teardown()
        except Exception as e:  # a worker already gone: nothing left to close there
            log.debug("graph %s teardown: %s", self.graph_id, e)
        if self.on_teardown is not None:
            self.on_teardown()
        self._reader.join(10)


class GraphSet:
    """A router's compiled graph over the workers it serves through (module docstring).

    build: ``build(workers) -> WorkerGraph | None`` (None: no graph for this set,
    e.g. a worker refused a slot); runs on a background thread.
    """

    def __init__(self, build: Callable[[tuple[str, ...]], WorkerGraph | None], *, enabled: bool = True):
        self._build = build
        self.enabled = enabled
        self.current: WorkerGraph | None = None
        self._wanted: tuple[str, ...] = ()
        self._building: tuple[str, ...] | None = None
        self._retired: list[WorkerGraph] = []
        self._lock = threading.Lock()
        self.builds = 0
        self.build_failures = 0
        self.last_error: str | None = None
        self._closed = False
        self._teardowns: list[threading.Thread] = []

    def want(self, workers: tuple[str, ...]) -> None:
        """The placement's workers are ``workers``: compile a graph over them unless the current one is it."""
        workers = tuple(sorted(workers))
        with self._lock:
            self._wanted = workers
            if not self.enabled or self._closed or not workers:
                return
            cur = self.current
            if cur is not None and cur.alive and getattr(cur, "wanted", tuple(cur.workers)) == workers:
                return
            if self._building is not None:
                return  # the builder looks at _wanted again when it is done
            self._building = workers
        threading.Thread(target=self._build_loop, name="moefleet-graph-build", daemon=True).start()

    def rebuild(self) -> None:
        """Retire the current graph (its executions drain) so that the next ``want`` compiles a new one."""
        with self._lock:
            if self.current is not None:
                self._retired.append(self.current)
                self.current = None
        self._reap()

    def graph_for(self, workers) -> WorkerGraph | None:
        """The live graph when it covers every worker in ``workers``, else None (serve through plain calls)."""
        g = self.live()
        if g is None:
            return None
        for w in workers:
            if w not in g.index:
                return None
        return g

    def live(self) -> WorkerGraph | None:
        """The current graph if it is alive (a dead one is retired and a new one compiled)."""
        g = self.current
        if g is None or not g.alive:
            if g is not None:
                self._retire_dead()
            return None
        return g

    def _retire_dead(self) -> None:
        with self._lock:
            g = self.current
            if g is None or g.alive:
                return
            self.current = None
            self._retired.append(g)
            wanted = self._wanted
        self._reap()
        self.want(wanted)  # a new graph over the same workers (a dead worker is replaced by the placement)

    def _build_loop(self) -> None:
        while True:
            with self._lock:
                target = self._building
            graph = None
            try:
                graph = self._build(target)
                if graph is not None:
                    graph.wanted = target  # the worker set asked for (the graph may cover fewer: see RayTransport)
                self.builds += 1 if graph is not None else 0
            except Exception as e:  # serve through plain calls; try again on the next placement change
                self.build_failures += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("router: compiled graph over %s not built (%s); serving through plain actor calls", target, self.last_error)
            with self._lock:
                if self._closed:
                    if graph is not None:
                        self._retired.append(graph)
                    self._building = None
                    break
                if graph is not None:
                    old, self.current = self.current, graph
                    if old is not None:
                        self._retired.append(old)
                if self._wanted == target or not self._wanted:
                    self._building = None
                    break
                self._building = self._wanted
        self._reap()

    def _reap(self) -> None:
        """Tear down retired graphs whose executions have drained (on a background thread: teardown blocks)."""
        with self._lock:
            done = [g for g in self._retired if g.drained() or not g.alive]
            self._retired = [g for g in self._retired if g not in done]
        if done:
            t = threading.Thread(target=lambda: [g.teardown() for g in done], name="moefleet-graph-teardown", daemon=True)
            with self._lock:
                self._teardowns = [x for x in self._teardowns if x.is_alive()] + [t]
            t.start()

    def tick(self) -> None:
        """Housekeeping from the router's loop: retire a dead graph, tear down drained old ones."""
        g = self.current
        if g is not None and not g.alive:
            self._retire_dead()
        elif self._retired:
            self._reap()

    def close(self) -> list[WorkerGraph]:
        """Stop building; return every graph to tear down (the caller decides whether to wait)."""
        with self._lock:
            self._closed = True
            graphs = self._retired + ([self.current] if self.current is not None else [])
            self._retired, self.current = [], None
        return graphs

    def join_teardowns(self, timeout_s: float = 60.0) -> None:
        """Wait for the teardowns running in the background (before this process leaves Ray: a reader thread
        still inside Ray's channel code when Ray shuts down takes the process with it)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            threads = list(self._teardowns)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
