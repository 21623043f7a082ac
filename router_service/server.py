"""The gRPC face of the router: ``moefleet.v1.MoEFleet`` plus standard health and reflection.

Thin: decode and check the request, hand it to ``RouterCore``, encode the
reply; every refusal is a gRPC status with a message naming the problem.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moefleet.core.config import RouterConfig

from . import codec
from .proto import fleet_pb2 as pb
from .proto import fleet_pb2_grpc as pb_grpc
from moefleet.core.request_stats import observe_request
from .router import ForwardResult, RequestError, RouterCore

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MoEFleet"].full_name


class MoEFleetServicer(pb_grpc.MoEFleetServicer):
    def __init__(self, core: RouterCore):
        self.core = core

    async def _serve(self, request: pb.ForwardRequest, deadline: float | None) -> pb.ForwardResponse:
        """Answer one request, counted in the router's stats: its status, and when answered its layer's latency."""
        t0 = time.perf_counter()
        code, layer = "UNKNOWN", None
        try:
            reply = await self._answer(request, deadline)
            code, layer = "OK", request.layer
            return reply
        except RequestError as e:
            code = e.code.name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            stats = self.core.stats
            observe_request(stats.codes, stats.layer_latency, code, layer, time.perf_counter() - t0)

    async def _answer(self, request: pb.ForwardRequest, deadline: float | None) -> pb.ForwardResponse:
        try:
            hidden = codec.decode(request.hidden, "hidden", ndim=2)
            logits = (
                codec.decode(request.router_logits, "router_logits", ndim=2) if request.HasField("router_logits") else None
            )
        except codec.TensorError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        result: ForwardResult = await self.core.submit(request.layer, hidden, logits, deadline)
        reply = pb.ForwardResponse(
            output=codec.encode(result.output), request_id=request.request_id, placement_version=result.placement_version
        )
        if request.return_routing:
            reply.topk_ids.CopyFrom(codec.encode(result.routing.topk_ids.to(dtype=codec.torch.int32)))
            reply.topk_weights.CopyFrom(codec.encode(result.routing.topk_weights.float()))
        return reply

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def Forward(self, request, context):
        try:
            return await self._serve(request, self._deadline(context))
        except RequestError as e:
            await context.abort(e.code, e.message)

    async def ForwardStream(self, request_iterator, context):
        async for reply in self.stream(request_iterator, self._deadline(context)):
            yield reply

    async def stream(self, request_iterator, deadline: float | None):
        """Serve a stream of requests concurrently; yield replies as they complete (failed items carry their status)."""
        replies: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def one(req):
            try:
                reply = await self._serve(req, deadline)
            except RequestError as e:
                reply = pb.ForwardResponse(request_id=req.request_id, error_code=e.code.value[0], error_message=e.message)
            await replies.put(reply)

        async def read():
            async for req in request_iterator:
                t = asyncio.create_task(one(req))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            await replies.put(None)

        reader = asyncio.create_task(read())
        reading = True
        try:
            while reading or tasks or not replies.empty():
                item = await replies.get()
                if item is None:
                    reading = False
                    continue
                yield item
        finally:
            reader.cancel()
            for t in list(tasks):
                t.cancel()

    async def GetPlacement(self, request, context):
        spec = self.core.spec
        reply = pb.GetPlacementResponse(
            version=self.core.placement.version,
            moe_layers=list(spec.moe_layers),
            hidden_size=spec.layer.hidden_size,
            num_experts=spec.layer.num_experts,
            top_k=spec.layer.top_k,
            family=spec.family,
        )
        for (layer, expert), workers in sorted(self.core.placement.replicas().items()):
            reply.experts.add(layer=layer, expert=expert, workers=workers)
        return reply


class RouterServer:
    """A grpc.aio server around a RouterCore, with health and reflection."""

    def __init__(self, core: RouterCore, config: RouterConfig):
        self.core = core
        self.config = config
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None

    async def start(self) -> str:
        opts = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
        ]
        self.server = grpc.aio.server(options=opts)
        pb_grpc.add_MoEFleetServicer_to_server(MoEFleetServicer(self.core), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if not self.port:
            raise RuntimeError(f"router: cannot bind {self.config.host}:{self.config.port}")
        await self.server.start()
        await self.set_serving(self.core.ready())
        return self.address

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            r = self.health.set(name, status)
            if asyncio.iscoroutine(r):
                await r

    async def stop(self, grace: float = 2.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
