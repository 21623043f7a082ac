"""A real grpc.aio router on loopback in this process, over in-process workers (no Ray): for tests of the gRPC face."""

from __future__ import annotations

import asyncio
import threading

from moefleet.core.config import RouterConfig
from moefleet.core.placement import spread_placement
from moefleet.expert_workers.group import ExpertGroupCore
from moefleet.router_service.router import RouterCore
from moefleet.router_service.server import RouterServer
from moefleet.router_service.transport import LocalTransport


class InProcessRouter:
    """``RouterServer`` + ``RouterCore`` + two ``ExpertGroupCore`` workers, its event loop in a thread of its own."""

    def __init__(self, checkpoint: str, config: RouterConfig, num_workers: int = 2):
        from moefleet.core.model import MoECheckpoint

        spec = MoECheckpoint(checkpoint).spec
        placement = spread_placement(list(spec.moe_layers), spec.layer.num_experts, [f"w{i}" for i in range(num_workers)])
        self.workers = {d: ExpertGroupCore(d, checkpoint, keys, backend="torch") for d, keys in placement.assignments.items()}
        self.core = RouterCore(checkpoint, config, LocalTransport(self.workers))
        self.core.set_placement(placement)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="router-loop")
        self.thread.start()
        self.server = RouterServer(self.core, config)
        try:
            self.address = self.run(self.server.start())
        except BaseException:
            self.close(stop_server=False)
            raise

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self, stop_server: bool = True) -> None:
        if stop_server and self.server.server is not None:
            self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __enter__(self) -> "InProcessRouter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
