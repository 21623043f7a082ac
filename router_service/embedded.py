"""The router core in the caller's own process: a model runner inside Ray calls its workers with no gRPC hop.

``EmbeddedRouter`` runs a ``RouterCore`` in this process (a Ray driver or
actor attached to the fleet's cluster and namespace) and serves
``forward(layer, hidden)`` from the caller's thread: validation, admission,
the gate and routing on the hidden states' device, dispatch, the workers'
rows on this router's compiled graph (``transport.py``), the combine — the
same path the gRPC router runs, without the gRPC hop, the protobuf copies and
the event loop between the caller and its workers. Several threads may call
at once (one per sequence of a pipelined model): their calls are in flight
together on the graph.

Beside the calls, a background event loop runs the router's ``RouterRuntime``
— it follows the placement in Redis, heartbeats ``router:<id>`` (kind
``embedded``: it shows in ``moe-fleet status``, takes part in drains, its
graph is closed by the workers if this process dies) and flushes its token
counts into the load windows the controller plans with.

Errors are those of ``FleetClient``: ``FleetError`` with the gRPC status code
the gRPC router would have answered (``INVALID_ARGUMENT``, ``NOT_FOUND``,
``RESOURCE_EXHAUSTED``, ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
import time
import uuid

import torch

from moefleet.core.config import RouterConfig
from moefleet.core.processes import INLINE_BYTES, inline_limit
from moefleet.core.request_stats import observe_request
from moefleet.core.state import StateStore

from .client import FleetError
from .proto import fleet_pb2 as pb
from .router import RequestError, RouterCore
from .runtime import RouterRuntime
from .server import placement_message
from .transport import RayTransport

log = logging.getLogger(__name__)


class EmbeddedRouter:
    """A router core in this process, serving its caller's layer calls (module docstring).

    checkpoint, redis_url, namespace: the fleet's. config: the router's limits (``RouterConfig``; its
    server fields are unused). dtype: the fleet's compute dtype (default the checkpoint's).
    device: where the gate, routing and combine run (default: the device of the hidden states of the first
    call; CPU until then). compiled_graphs: which workers a compiled graph carries (``auto``: those on GPUs; ``on``/True:
    every worker of this node; ``off``/False: plain actor calls only); default the config's ``compiled_graphs``.
    """

    def __init__(
        self,
        checkpoint: str,
        redis_url: str,
        namespace: str,
        *,
        config: RouterConfig | None = None,
        dtype: str | None = None,
        device: str | torch.device | None = None,
        router_id: str | None = None,
        compiled_graphs: bool | str | None = None,
        start_timeout_s: float = 30.0,
    ):
        import ray

        if not ray.is_initialized():
            raise RuntimeError("EmbeddedRouter: this process is not attached to the fleet's Ray cluster (ray.init first)")
        if inline_limit() < INLINE_BYTES:
            log.warning("embedded router: Ray's inline limit in this process is %d bytes (the fleet's: %d); batches "
                        "above it go through the object store. Set RAY_max_direct_call_object_size=%d before ray.init "
                        "(moefleet.connect(embedded=True) does when it attaches).", inline_limit(), INLINE_BYTES, INLINE_BYTES)
        self.router_id = router_id or f"embedded-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.config = config or RouterConfig()
        self.store = StateStore(redis_url, namespace=namespace, socket_timeout_s=1.0)
        self._device_pinned = device is not None
        dev = torch.device(device or "cpu")
        if compiled_graphs is None:
            compiled_graphs = self.config.compiled_graphs
        transport = RayTransport(namespace, router_key=f"router:{self.router_id}", device=dev, compiled_graphs=compiled_graphs)
        self.core = RouterCore(checkpoint, self.config, transport, dtype=dtype, device=dev)
        self.spec = self.core.spec
        self.runtime = RouterRuntime(self.core, self.store, self.router_id, kind="embedded", info={"pid": os.getpid()})
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"moefleet-{self.router_id}", daemon=True)
        self._thread.start()
        self._closed = False
        self._device_lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(start_timeout_s)
        log.info("embedded router %s: placement v%d", self.router_id, self.core.placement.version)

    async def _start(self) -> None:
        self.runtime.start()
        try:
            await self.runtime.heartbeat()
        except Exception as e:  # Redis down: the loop keeps trying
            log.warning("embedded router %s: first heartbeat failed: %s", self.router_id, e)

    # -- the client's API -------------------------------------------------
    def forward(self, layer: int, hidden: torch.Tensor, *, router_logits=None, return_routing: bool = False, timeout=None):
        """``output [T, H]`` of MoE layer ``layer`` for ``hidden [T, H]`` (with ``return_routing``: ``(output, ids, weights)``).

        Raises ``FleetError`` with the status the gRPC router would answer.
        """
        if self._closed:
            raise FleetError(_code("UNAVAILABLE"), "the embedded router is closed")
        core = self.core
        t0 = time.perf_counter()
        code = "UNKNOWN"
        tokens = nbytes = 0
        admitted = False
        try:
            if not isinstance(hidden, torch.Tensor):
                raise RequestError(_code("INVALID_ARGUMENT"), f"hidden: expected a torch.Tensor, got {type(hidden).__name__}")
            if router_logits is not None and not isinstance(router_logits, torch.Tensor):
                raise RequestError(_code("INVALID_ARGUMENT"), "router_logits: expected a torch.Tensor")
            if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise RequestError(_code("INVALID_ARGUMENT"), f"hidden: dtype {hidden.dtype} is not float32, bfloat16 or float16")
            core.validate(layer, hidden, router_logits)
            if hidden.device != core.device and not self._device_pinned:
                with self._device_lock:  # route and combine where the caller's tensors are (its first call says where)
                    if hidden.device != core.device:
                        core.set_device(hidden.device)
            tokens = int(hidden.shape[0])
            nbytes = hidden.numel() * hidden.element_size() + (0 if router_logits is None else router_logits.numel() * 4)
            with core._lock:
                core._admit(tokens, nbytes)
            admitted = True
            if not core.ready():
                raise RequestError(_code("UNAVAILABLE"), "the fleet's placement does not cover every expert yet; retry shortly")
            deadline = None if timeout is None else time.monotonic() + float(timeout)
            result = core.forward_blocking(layer, hidden, router_logits, deadline=deadline)
            code = "OK"
        except RequestError as e:
            code = e.code.name
            raise FleetError(e.code, e.message, e.retry_after_ms) from None
        finally:
            if admitted:
                with core._lock:
                    core._queued -= 1
                    core.inflight_tokens -= tokens
                    core.inflight_bytes -= nbytes
            with core._lock:
                observe_request(core.stats.codes, core.stats.layer_latency, code, layer if code == "OK" else None,
                                time.perf_counter() - t0)
        out = result.output
        if not return_routing:
            return out
        return out, result.routing.topk_ids.long(), result.routing.topk_weights.float()

    def placement(self) -> pb.GetPlacementResponse:
        """The placement this router serves, as ``FleetClient.placement()`` returns it."""
        return placement_message(self.core)

    def stream(self) -> "EmbeddedStream":
        """Calls submitted from one thread and run side by side (``attach``'s per-sequence calls)."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="moefleet-embedded-call")
        return EmbeddedStream(self, self._pool)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the placement covers every expert (the gRPC client's SERVING)."""
        deadline = time.monotonic() + timeout
        while not self.core.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"embedded router {self.router_id}: no complete placement after {timeout}s")
            time.sleep(0.05)

    def stats(self) -> dict:
        return {"router_id": self.router_id, "kind": "embedded", "transport": self.core.transport_report(),
                "stages": self.core.stages.totals(), **self.core.stats.__dict__}

    def close(self) -> None:
        """Leave the fleet: deregister, stop following the placement, tear the compiled graph down."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self.runtime.stop(), self._loop).result(10)
        except Exception as e:  # the store is down: the record expires by itself
            log.warning("embedded router %s: stop: %s", self.router_id, e)
        self.core.transport.close(wait=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EmbeddedStream:
    """``submit(layer, hidden) -> Future`` and ``forward`` over an embedded router (the ``ForwardStream`` interface)."""

    def __init__(self, router: EmbeddedRouter, pool: concurrent.futures.ThreadPoolExecutor):
        self.router = router
        self.pool = pool

    def submit(self, layer: int, hidden: torch.Tensor, *, return_routing: bool = False) -> concurrent.futures.Future:
        return self.pool.submit(self.router.forward, layer, hidden, return_routing=return_routing)

    def forward(self, layer: int, hidden: torch.Tensor, *, return_routing: bool = False, timeout: float | None = None):
        return self.router.forward(layer, hidden, return_routing=return_routing, timeout=timeout)

    def close(self) -> None:
        pass


def _code(name: str):
    import grpc

    return getattr(grpc.StatusCode, name)
