"""The router as a Ray actor: a grpc.aio server in the actor's event loop, following the placement in Redis.

Ray restarts a router whose process died (local mode starts it with
``max_restarts=-1``); the new incarnation starts serving by itself on the same
address (the port is part of its config), so clients reconnect to it.
"""

from __future__ import annotations

import asyncio
import logging

from moefleet.core.config import RouterConfig
from moefleet.core.state import StateStore

from .router import RouterCore
from .runtime import RouterRuntime
from .server import RouterServer
from .transport import RayTransport

log = logging.getLogger(__name__)


class RouterActor:
    """One router replica. ``start()`` returns its gRPC address."""

    def __init__(self, checkpoint: str, config: dict, redis_url: str, namespace: str, router_id: str, dtype: str | None = None,
                 compiled_graphs: bool | str | None = None):
        self.config = RouterConfig(**config)
        self.compiled_graphs = self.config.compiled_graphs if compiled_graphs is None else compiled_graphs
        self.checkpoint = checkpoint
        self.redis_url = redis_url
        self.namespace = namespace
        self.router_id = router_id
        self.dtype = dtype
        self.core: RouterCore | None = None
        self.server: RouterServer | None = None
        self.runtime: RouterRuntime | None = None
        self._starting = None
        import ray

        if ray.get_runtime_context().was_current_actor_reconstructed:  # a restart after the process died: serve again
            log.warning("router %s: restarted; serving again on port %s", router_id, self.config.port)
            ray.get_runtime_context().current_actor.start.remote()

    async def start(self) -> str:
        """Start serving (once; a second call returns the address)."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        return await asyncio.shield(self._starting)

    async def _start(self) -> str:
        import torch

        # The router's own tensor work (gate, combine) is light; more threads would spin in
        # OpenMP while it awaits the workers, taking CPU from them on a shared machine.
        torch.set_num_threads(1)
        self.store = StateStore(self.redis_url, namespace=self.namespace, socket_timeout_s=1.0)
        device = router_device()
        transport = RayTransport(self.namespace, router_key=f"router:{self.router_id}", device=device,
                                 compiled_graphs=self.compiled_graphs)
        self.core = RouterCore(self.checkpoint, self.config, transport, dtype=self.dtype, device=device)
        self.server = RouterServer(self.core, self.config)
        address = await self.server.start()
        self.metrics_port = None
        if self.config.metrics_port is not None:
            from .metrics import serve_metrics

            self.metrics_port = serve_metrics(self.core, self.router_id, self.config.host, self.config.metrics_port)
        self.runtime = RouterRuntime(
            self.core, self.store, self.router_id, info={"address": address, "metrics_port": self.metrics_port}
        )
        self.runtime.on_placement = lambda _p: asyncio.ensure_future(self.server.set_serving(self.core.ready()))
        self.runtime.start()
        await self.server.set_serving(self.core.ready())
        try:
            await self.runtime.heartbeat()
        except Exception as e:  # Redis down: the loop keeps trying
            log.warning("router %s: first heartbeat failed: %s", self.router_id, e)
        log.info("router %s serving on %s", self.router_id, address)
        return address

    async def address(self) -> str | None:
        """The gRPC address once serving (None while starting)."""
        return None if self.server is None or self.server.server is None else self.server.address

    async def stats(self) -> dict:
        s = self.core.stats
        import os

        return {
            "router_id": self.router_id,
            "pid": os.getpid(),
            "metrics_port": self.metrics_port,
            "placement_version": self.core.placement.version,
            "placement_generation": self.core.placement.generation,
            "queued": self.core._queued,
            "inflight_tokens": self.core.inflight_tokens,
            "inflight_bytes": self.core.inflight_bytes,
            "dead_workers": sorted(self.core.dead),
            "stages": self.core.stages.totals(),  # stage -> (seconds, count) since start
            "transport": self.core.transport_report(),
            **s.__dict__,
        }

    async def stop(self) -> None:
        if self.runtime is not None:
            await self.runtime.stop()
        if self.server is not None:
            await self.server.stop()
        if self.core is not None:
            await asyncio.get_running_loop().run_in_executor(None, lambda: self.core.transport.close(wait=True))


def router_device() -> str:
    """Where a router actor keeps its tensors: its GPU when Ray gave it one (the gate and combine run there), else the CPU."""
    import ray
    import torch

    gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return "cuda" if gpus and torch.cuda.is_available() else "cpu"


def router_actor_class():
    import ray

    return ray.remote(RouterActor)
