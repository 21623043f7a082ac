"""The router as a Ray actor: a grpc.aio server in the actor's event loop, following the placement in Redis."""

from __future__ import annotations

import asyncio
import logging
import time

from moefleet.core.config import RouterConfig
from moefleet.core.state import StateStore

from .router import RouterCore
from .server import RouterServer
from .transport import RayTransport

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.1
HEARTBEAT_TTL_S = 3.0


class RouterActor:
    """One router replica. ``start()`` returns its gRPC address."""

    def __init__(self, checkpoint: str, config: dict, redis_url: str, namespace: str, router_id: str, dtype: str | None = None):
        self.config = RouterConfig(**config)
        self.checkpoint = checkpoint
        self.redis_url = redis_url
        self.namespace = namespace
        self.router_id = router_id
        self.dtype = dtype
        self.core: RouterCore | None = None
        self.server: RouterServer | None = None
        self._watch = None
        self._telemetry: asyncio.Task | None = None

    async def start(self) -> str:
        import torch

        # The router's own tensor work (gate, combine) is light; more threads would spin in
        # OpenMP while it awaits the workers, taking CPU from them on a shared machine.
        torch.set_num_threads(1)
        self.store = StateStore(self.redis_url, namespace=self.namespace)
        self.core = RouterCore(self.checkpoint, self.config, RayTransport(self.namespace), dtype=self.dtype)
        placement = self.store.get_placement()
        if placement is not None:
            self.core.set_placement(placement)
        self.server = RouterServer(self.core, self.config)
        address = await self.server.start()
        self.metrics_port = None
        if self.config.metrics_port is not None:
            from .metrics import serve_metrics

            self.metrics_port = serve_metrics(self.core, self.router_id, self.config.host, self.config.metrics_port)
        loop = asyncio.get_running_loop()
        self._watch = self.store.watch_placement(
            lambda p: loop.call_soon_threadsafe(self._on_placement, p), since_version=self.core.placement.version
        )
        await self._heartbeat()
        self._telemetry = asyncio.create_task(self._flush_telemetry())
        log.info("router %s serving on %s", self.router_id, address)
        return address

    def _on_placement(self, placement) -> None:
        self.core.set_placement(placement)
        asyncio.ensure_future(self.server.set_serving(self.core.ready()))
        asyncio.ensure_future(self._heartbeat())

    async def _heartbeat(self) -> None:
        """Tell the controller which placement this router serves and the oldest one still in flight."""
        info = {
            "kind": "router",
            "address": self.server.address,
            "metrics_port": self.metrics_port,
            "placement_version": self.core.placement.version,
            "oldest_inflight_version": self.core.oldest_inflight_version(),
        }
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            None, lambda: self.store.register_worker(f"router:{self.router_id}", info, time.time(), HEARTBEAT_TTL_S)
        )

    async def _flush_telemetry(self) -> None:
        """Token counts per expert go to Redis once per interval, in one round trip; heartbeats more often."""
        loop = asyncio.get_running_loop()
        last_flush = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            try:
                await self._heartbeat()
            except Exception as e:  # reported; the next beat retries
                log.warning("router %s: heartbeat failed: %s", self.router_id, e)
            if time.monotonic() - last_flush < self.config.telemetry_interval_s:
                continue
            last_flush = time.monotonic()
            counts = self.core.take_load_counts()
            if counts:
                t0 = time.perf_counter()
                try:
                    await loop.run_in_executor(
                        None, lambda: self.store.record_load(counts, time.time(), self.config.load_window_s, self.router_id)
                    )
                except Exception as e:  # telemetry must not stop serving; say so
                    log.warning("router %s: telemetry flush failed: %s", self.router_id, e)
                self.core.stats.telemetry_s += time.perf_counter() - t0

    async def address(self) -> str:
        return self.server.address

    async def stats(self) -> dict:
        s = self.core.stats
        return {
            "router_id": self.router_id,
            "metrics_port": self.metrics_port,
            "placement_version": self.core.placement.version,
            "queued": self.core._queued,
            **s.__dict__,
        }

    async def stop(self) -> None:
        try:
            self.store.deregister_worker(f"router:{self.router_id}")
        except Exception as e:  # the record expires by itself
            log.warning("router %s: deregister failed: %s", self.router_id, e)
        if self._watch is not None:
            self._watch.stop()
        if self._telemetry is not None:
            self._telemetry.cancel()
        if self.server is not None:
            await self.server.stop()


def router_actor_class():
    import ray

    return ray.remote(RouterActor)
