"""The gRPC face of the router: ``moefleet.v1.MoEFleet`` plus standard health and reflection.

Thin: decode and check the request, hand it to ``RouterCore``, encode the
reply; every refusal is a gRPC status with a message naming the problem.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moefleet.core.config import RouterConfig

from . import codec, wire
from .proto import fleet_pb2 as pb
from .proto import fleet_pb2_grpc as pb_grpc
from .router import ForwardResult, RequestError, RouterCore

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MoEFleet"].full_name


class MoEFleetServicer(pb_grpc.MoEFleetServicer):
    """``moefleet.v1.MoEFleet`` over a RouterCore.

    Requests may arrive parsed (Ray Serve's proxy) or as the bytes received
    (``RouterServer``, which registers the methods with pass-through
    serializers): then the hidden states are read in place (``wire``).
    raw_replies: build replies as serialized bytes, the output copied once
    (``RouterServer``); otherwise as messages.
    """

    def __init__(self, core: RouterCore, *, raw_replies: bool = False):
        self.core = core
        self.raw_replies = raw_replies

    async def _serve(self, request, deadline: float | None):
        core = self.core
        t0 = time.perf_counter()
        size = len(request) if isinstance(request, (bytes, bytearray, memoryview)) else request.ByteSize()
        request, hidden, logits = await core.offload(size, self._decode, request)
        core.stages.observe("decode", time.perf_counter() - t0)
        result: ForwardResult = await core.submit(request.layer, hidden, logits, deadline)
        t1 = time.perf_counter()
        reply = await core.offload(size, self._reply, request, result)
        t2 = time.perf_counter()
        core.stages.observe("reply", t2 - t1)
        core.stages.observe("router_total", t2 - t0)
        return reply

    @staticmethod
    def _decode(request):
        """(request, hidden [T, H], router_logits or None); hidden is read-only where it is a view of the bytes received."""
        data = None
        if isinstance(request, (bytes, bytearray, memoryview)):
            try:
                request, data = wire.decode(request, pb.ForwardRequest, "hidden")
            except DecodeError as e:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid moefleet.v1.ForwardRequest: {e}") from None
        try:
            hidden = codec.decode(request.hidden, "hidden", ndim=2, data=data, writable=False)
            logits = (
                codec.decode(request.router_logits, "router_logits", ndim=2) if request.HasField("router_logits") else None
            )
        except codec.TensorError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        return request, hidden, logits

    def _reply(self, request: pb.ForwardRequest, result: ForwardResult):
        reply = pb.ForwardResponse(request_id=request.request_id, placement_version=result.placement_version)
        if request.return_routing:
            reply.topk_ids.CopyFrom(codec.encode(result.routing.topk_ids.to(dtype=codec.torch.int32)))
            reply.topk_weights.CopyFrom(codec.encode(result.routing.topk_weights.float()))
        if not self.raw_replies:
            reply.output.CopyFrom(codec.encode(result.output))
            return reply
        return wire.encode(reply, "output", codec.describe(reply.output, result.output))

    def _error(self, request_id: str, e: RequestError):
        reply = pb.ForwardResponse(request_id=request_id, error_code=e.code.value[0], error_message=e.message)
        return reply.SerializeToString() if self.raw_replies else reply

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
                reply = self._error(_request_id(req), e)
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


def _request_id(raw) -> str:
    """The request_id of a request, even an unparseable one when its bytes still hold it (else empty)."""
    if isinstance(raw, pb.ForwardRequest):
        return raw.request_id
    try:
        msg = pb.ForwardRequest()
        msg.MergeFromString(bytes(raw))
        return msg.request_id
    except Exception:  # noqa: BLE001 - best effort on bytes already known to be bad
        return ""


def _serialize(reply) -> bytes:
    return reply if isinstance(reply, bytes) else reply.SerializeToString()


def add_moefleet_servicer(servicer: MoEFleetServicer, server) -> None:
    """Register ``moefleet.v1.MoEFleet`` with requests passed through as bytes (parsed by the servicer)
    and replies sent as the servicer built them (bytes, or a message serialized here)."""
    handlers = {
        "Forward": grpc.unary_unary_rpc_method_handler(servicer.Forward, request_deserializer=None, response_serializer=_serialize),
        "ForwardStream": grpc.stream_stream_rpc_method_handler(
            servicer.ForwardStream, request_deserializer=None, response_serializer=_serialize
        ),
        "GetPlacement": grpc.unary_unary_rpc_method_handler(
            servicer.GetPlacement, request_deserializer=pb.GetPlacementRequest.FromString, response_serializer=_serialize
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE_NAME, handlers)


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
        add_moefleet_servicer(MoEFleetServicer(self.core, raw_replies=True), self.server)
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
