"""Python clients of the router service: ``FleetClient`` (blocking) and ``AsyncFleetClient`` (asyncio).

Both take the router's bearer token (``token=``, default ``$MOEFLEET_AUTH_TOKEN``)
and TLS settings: ``tls_ca`` (the CA bundle that signed the router's certificate;
``tls=True`` alone uses the system roots) and, for mutual TLS, ``tls_cert`` and
``tls_key`` (paths or PEM bytes).
"""

from __future__ import annotations

import os

import grpc
import torch

from . import codec
from .proto import fleet_pb2 as pb
from .proto import fleet_pb2_grpc as pb_grpc
from .security import AUTH_TOKEN_ENV, bearer_metadata, channel_credentials

DEFAULT_MAX_MESSAGE = 256 << 20


class FleetError(RuntimeError):
    """A call the fleet refused or failed: ``code`` is the gRPC status code.

    retry_after_ms: for RESOURCE_EXHAUSTED from an overloaded router, when to retry (else None).
    """

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


def _error(e: grpc.RpcError) -> FleetError:
    retry = None
    for key, value in e.trailing_metadata() or ():
        if key == "grpc-retry-pushback-ms":
            try:
                retry = int(value)
            except ValueError:
                pass
    return FleetError(e.code(), e.details(), retry)


def _channel(address: str, options, *, aio: bool, tls: bool, tls_ca, tls_cert, tls_key):
    mod = grpc.aio if aio else grpc
    if tls or tls_ca is not None or tls_cert is not None:
        return mod.secure_channel(address, channel_credentials(tls_ca, tls_cert, tls_key), options=options)
    return mod.insecure_channel(address, options=options)


def _metadata(metadata, token: str | None) -> tuple:
    token = token if token is not None else os.environ.get(AUTH_TOKEN_ENV, "").strip() or None
    return tuple(metadata) + ((bearer_metadata(token),) if token else ())


def _request(layer: int, hidden: torch.Tensor, router_logits, return_routing: bool, request_id: str = "") -> pb.ForwardRequest:
    req = pb.ForwardRequest(layer=layer, hidden=codec.encode(hidden), return_routing=return_routing, request_id=request_id)
    if router_logits is not None:
        req.router_logits.CopyFrom(codec.encode(router_logits))
    return req


def _result(reply: pb.ForwardResponse, return_routing: bool):
    out = codec.decode(reply.output, "output")
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

    token: the router's bearer token (default ``$MOEFLEET_AUTH_TOKEN``; none if unset).
    tls / tls_ca / tls_cert / tls_key: TLS to the router (module docstring).
    metadata: sent with every call, e.g. ``(("application", "moefleet"),)`` to pick
    the application behind Ray Serve's gRPC proxy.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | bytes | None = None,
        tls_cert: str | bytes | None = None,
        tls_key: str | bytes | None = None,
        timeout: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        metadata=(),
    ):
        self.address = address
        self.timeout = timeout
        self.metadata = _metadata(metadata, token)
        self.channel = _channel(
            address, _options(max_message_bytes), aio=False, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key
        )
        self.stub = pb_grpc.MoEFleetStub(self.channel)

    def forward(self, layer: int, hidden: torch.Tensor, *, router_logits=None, return_routing: bool = False, timeout=None):
        try:
            reply = self.stub.Forward(
                _request(layer, hidden, router_logits, return_routing), timeout=timeout or self.timeout, metadata=self.metadata
            )
        except grpc.RpcError as e:
            raise _error(e) from None
        return _result(reply, return_routing)

    def placement(self) -> pb.GetPlacementResponse:
        try:
            return self.stub.GetPlacement(pb.GetPlacementRequest(), timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

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

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | bytes | None = None,
        tls_cert: str | bytes | None = None,
        tls_key: str | bytes | None = None,
        timeout: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        metadata=(),
    ):
        self.address = address
        self.timeout = timeout
        self.metadata = _metadata(metadata, token)
        self.channel = _channel(
            address, _options(max_message_bytes), aio=True, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key
        )
        self.stub = pb_grpc.MoEFleetStub(self.channel)

    async def forward(self, layer: int, hidden: torch.Tensor, *, router_logits=None, return_routing: bool = False, timeout=None):
        try:
            reply = await self.stub.Forward(
                _request(layer, hidden, router_logits, return_routing), timeout=timeout or self.timeout, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None
        return _result(reply, return_routing)

    async def forward_stream(self, calls, *, return_routing: bool = False):
        """Pipelined calls over one stream: ``calls`` is an iterable of (layer, hidden).

        Yields ``(index, result)`` as replies arrive (in any order); a failed item
        yields ``(index, FleetError)``.
        """
        calls = list(calls)

        async def requests():
            for i, (layer, hidden) in enumerate(calls):
                yield _request(layer, hidden, None, return_routing, request_id=str(i))

        async for reply in self.stub.ForwardStream(requests(), timeout=self.timeout, metadata=self.metadata):
            i = int(reply.request_id)
            if reply.error_code:
                yield i, FleetError(_code(reply.error_code), reply.error_message, reply.retry_after_ms or None)
            else:
                yield i, _result(reply, return_routing)

    async def placement(self) -> pb.GetPlacementResponse:
        return await self.stub.GetPlacement(pb.GetPlacementRequest(), timeout=self.timeout, metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()


def _code(value: int) -> grpc.StatusCode:
    for c in grpc.StatusCode:
        if c.value[0] == value:
            return c
    return grpc.StatusCode.UNKNOWN
