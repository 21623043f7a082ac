"""Python clients of the router service: ``FleetClient`` (blocking) and ``AsyncFleetClient`` (asyncio)."""

from __future__ import annotations

import grpc
import torch

from . import codec, wire
from .proto import fleet_pb2 as pb
from .proto import fleet_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE = 256 << 20


class FleetError(RuntimeError):
    """A call the fleet refused or failed: ``code`` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


SERVICE = pb.DESCRIPTOR.services_by_name["MoEFleet"].full_name
FORWARD = f"/{SERVICE}/Forward"
FORWARD_STREAM = f"/{SERVICE}/ForwardStream"


def request_bytes(layer: int, hidden: torch.Tensor, router_logits, return_routing: bool, request_id: str = "") -> bytes:
    """A serialized ``ForwardRequest``; the hidden states' bytes are copied once (``wire.encode``)."""
    req = pb.ForwardRequest(layer=layer, return_routing=return_routing, request_id=request_id)
    if router_logits is not None:
        req.router_logits.CopyFrom(codec.encode(router_logits))
    return wire.encode(req, "hidden", codec.describe(req.hidden, hidden))


def parse_reply(raw: bytes) -> tuple[pb.ForwardResponse, memoryview | None]:
    """A serialized ``ForwardResponse``, its output's bytes left in place (see ``wire.decode``)."""
    return wire.decode(raw, pb.ForwardResponse, "output")


def result(reply: pb.ForwardResponse, data, return_routing: bool):
    """The output tensor (writable, one copy), with the routing when asked for."""
    out = codec.decode(reply.output, "output", data=data)
    if not return_routing:
        return out
    ids = codec.decode(reply.topk_ids, "topk_ids", float_only=False).long()
    return out, ids, codec.decode(reply.topk_weights, "topk_weights")


def _options(max_message_bytes: int):
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


class FleetClient:
    """Blocking client. ``forward(layer, hidden[T, H]) -> output[T, H]``.

    metadata: sent with every call, e.g. ``(("application", "moefleet"),)`` to pick
    the application behind Ray Serve's gRPC proxy.
    """

    def __init__(self, address: str, *, timeout: float | None = 60.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE, metadata=()):
        self.address = address
        self.timeout = timeout
        self.metadata = tuple(metadata)
        self.channel = grpc.insecure_channel(address, options=_options(max_message_bytes))
        self.stub = pb_grpc.MoEFleetStub(self.channel)
        self._forward = self.channel.unary_unary(FORWARD, request_serializer=None, response_deserializer=None)

    def forward(self, layer: int, hidden: torch.Tensor, *, router_logits=None, return_routing: bool = False, timeout=None):
        try:
            raw = self._forward(
                request_bytes(layer, hidden, router_logits, return_routing), timeout=timeout or self.timeout, metadata=self.metadata
            )
        except grpc.RpcError as e:
            raise FleetError(e.code(), e.details()) from None
        return result(*parse_reply(raw), return_routing)

    def placement(self) -> pb.GetPlacementResponse:
        try:
            return self.stub.GetPlacement(pb.GetPlacementRequest(), timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise FleetError(e.code(), e.details()) from None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the channel connects and the health service says SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        stub = health_pb2_grpc.HealthStub(self.channel)
        import time

        deadline = time.monotonic() + timeout
        while True:
            status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.address} not SERVING after {timeout}s")
            time.sleep(0.1)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncFleetClient:
    """asyncio client; the same calls as ``FleetClient``, awaitable, plus ``forward_stream``."""

    def __init__(self, address: str, *, timeout: float | None = 60.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE, metadata=()):
        self.address = address
        self.timeout = timeout
        self.metadata = tuple(metadata)
        self.channel = grpc.aio.insecure_channel(address, options=_options(max_message_bytes))
        self.stub = pb_grpc.MoEFleetStub(self.channel)
        self._forward = self.channel.unary_unary(FORWARD, request_serializer=None, response_deserializer=None)
        self._stream = self.channel.stream_stream(FORWARD_STREAM, request_serializer=None, response_deserializer=None)

    async def forward(self, layer: int, hidden: torch.Tensor, *, router_logits=None, return_routing: bool = False, timeout=None):
        try:
            raw = await self._forward(
                request_bytes(layer, hidden, router_logits, return_routing), timeout=timeout or self.timeout, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as e:
            raise FleetError(e.code(), e.details()) from None
        return result(*parse_reply(raw), return_routing)

    async def forward_stream(self, calls, *, return_routing: bool = False):
        """Pipelined calls over one stream: ``calls`` is an iterable of (layer, hidden).

        Yields ``(index, result)`` as replies arrive (in any order); a failed item
        yields ``(index, FleetError)``.
        """
        calls = list(calls)

        async def requests():
            for i, (layer, hidden) in enumerate(calls):
                yield request_bytes(layer, hidden, None, return_routing, request_id=str(i))

        async for raw in self._stream(requests(), timeout=self.timeout, metadata=self.metadata):
            reply, data = parse_reply(raw)
            i = int(reply.request_id)
            if reply.error_code:
                yield i, FleetError(_code(reply.error_code), reply.error_message)
            else:
                yield i, result(reply, data, return_routing)

    async def placement(self) -> pb.GetPlacementResponse:
        return await self.stub.GetPlacement(pb.GetPlacementRequest(), timeout=self.timeout, metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()


def _code(value: int) -> grpc.StatusCode:
    for c in grpc.StatusCode:
        if c.value[0] == value:
            return c
    return grpc.StatusCode.UNKNOWN
