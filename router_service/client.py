"""Python clients of the router service: ``FleetClient`` (blocking), ``AsyncFleetClient`` (asyncio), and
``ForwardStream`` (many calls in flight on one stream, from any thread).

All take the router's bearer token (``token=``, default ``$MOEFLEET_AUTH_TOKEN``)
and TLS settings: ``tls_ca`` (the CA bundle that signed the router's certificate;
``tls=True`` alone uses the system roots) and, for mutual TLS, ``tls_cert`` and
``tls_key`` (paths or PEM bytes).

Requests and replies are built and read with ``wire``: the tensors' bytes are
copied once to send and once to hand the caller a tensor of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from concurrent.futures import Future

import grpc
import torch

from . import codec, wire
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
        self._tls = dict(tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        self.channel = _channel(address, _options(max_message_bytes), aio=False, **self._tls)
        self.stub = pb_grpc.MoEFleetStub(self.channel)
        self._forward = self.channel.unary_unary(FORWARD, request_serializer=None, response_deserializer=None)
        self._max_message_bytes = max_message_bytes
        self._stream: ForwardStream | None = None
        self._stream_lock = threading.Lock()

    def forward(self, layer: int, hidden: torch.Tensor, *, router_logits=None, return_routing: bool = False, timeout=None):
        try:
            raw = self._forward(
                request_bytes(layer, hidden, router_logits, return_routing), timeout=timeout or self.timeout, metadata=self.metadata
            )
        except grpc.RpcError as e:
            raise _error(e) from None
        return result(*parse_reply(raw), return_routing)

    def placement(self) -> pb.GetPlacementResponse:
        try:
            return self.stub.GetPlacement(pb.GetPlacementRequest(), timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

    def stream(self) -> "ForwardStream":
        """This client's ``ForwardStream`` (opened on first use, closed with the client)."""
        with self._stream_lock:
            if self._stream is None:
                self._stream = ForwardStream(self.address, max_message_bytes=self._max_message_bytes, metadata=self.metadata,
                                             token="", **self._tls)
            return self._stream

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
        if self._stream is not None:
            self._stream.close()
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ForwardStream:
    """Layer calls pipelined on one ``ForwardStream`` RPC: many in flight, submitted from any threads.

    ``submit(layer, hidden)`` sends the call and returns a ``concurrent.futures.Future``
    of its output at once; ``forward(layer, hidden)`` waits for it. Calls of
    several sequences (threads) and layers travel on the one stream, so the
    router sees them together: it serves them side by side and batches those
    for the same layer, and its workers find the next call waiting when they
    finish one. Replies come in any order, matched by request id. A failed
    call's future raises ``FleetError`` with its status; a broken stream fails
    every call in flight on it, and the next ``submit`` opens a new one.

    The stream runs on a thread of its own (an asyncio loop and a grpc.aio
    channel); requests are encoded in the callers' threads, replies decoded on
    the stream's thread.
    """

    def __init__(
        self,
        address: str,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        metadata=(),
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | bytes | None = None,
        tls_cert: str | bytes | None = None,
        tls_key: str | bytes | None = None,
    ):
        self.address = address
        self.metadata = _metadata(metadata, token)
        self._tls = dict(tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        self._max_message_bytes = max_message_bytes
        self._ids = itertools.count()
        self._pending: dict[str, tuple[Future, bool]] = {}  # request id -> (future, return_routing)
        self._lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="moefleet-forward-stream", daemon=True)
        self._thread.start()
        self._channel = None
        self._queue: asyncio.Queue | None = None  # requests of the open stream; None: no stream open
        asyncio.run_coroutine_threadsafe(self._open_channel(), self._loop).result()

    async def _open_channel(self) -> None:
        self._channel = _channel(self.address, _options(self._max_message_bytes), aio=True, **self._tls)
        self._call = self._channel.stream_stream(FORWARD_STREAM, request_serializer=None, response_deserializer=None)

    def submit(self, layer: int, hidden: torch.Tensor, *, return_routing: bool = False) -> Future:
        """Send one layer call; its future gives the output [T, H] (with ``return_routing``, ``(output, ids, weights)``)."""
        fut: Future = Future()
        rid = str(next(self._ids))
        raw = request_bytes(layer, hidden, None, return_routing, request_id=rid)  # encoded in the caller's thread
        with self._lock:
            if self._closed:
                raise RuntimeError("ForwardStream is closed")
            self._pending[rid] = (fut, return_routing)
        self._loop.call_soon_threadsafe(self._send, raw)
        return fut

    def forward(self, layer: int, hidden: torch.Tensor, *, return_routing: bool = False, timeout: float | None = None):
        """``submit(...).result()``: the output of one layer call, sent on the stream."""
        return self.submit(layer, hidden, return_routing=return_routing).result(timeout)

    def _send(self, raw: bytes) -> None:
        if self._queue is None:  # open a stream; it stays open while the client sends on it
            self._queue = asyncio.Queue()
            asyncio.ensure_future(self._run(self._queue))
        self._queue.put_nowait(raw)

    async def _run(self, queue: asyncio.Queue) -> None:
        async def requests():
            while True:
                raw = await queue.get()
                if raw is None:
                    return
                yield raw

        try:
            async for raw in self._call(requests(), metadata=self.metadata):
                self._resolve(raw)
            error = FleetError(grpc.StatusCode.UNAVAILABLE, "the stream ended before every call was answered")
        except grpc.aio.AioRpcError as e:
            error = _error(e)
        except asyncio.CancelledError:
            error = FleetError(grpc.StatusCode.CANCELLED, "ForwardStream closed")
        if self._queue is queue:
            self._queue = None
        with self._lock:  # every call of this stream still waiting fails with it
            pending, self._pending = self._pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(error)

    def _resolve(self, raw: bytes) -> None:
        reply, data = parse_reply(raw)
        with self._lock:
            entry = self._pending.pop(reply.request_id, None)
        if entry is None:
            return
        fut, return_routing = entry
        if reply.error_code:
            fut.set_exception(FleetError(_code(reply.error_code), reply.error_message))
            return
        try:
            fut.set_result(result(reply, data, return_routing))
        except codec.TensorError as e:
            fut.set_exception(FleetError(grpc.StatusCode.INTERNAL, f"reply: {e}"))

    def close(self) -> None:
        """End the stream (calls in flight fail with CANCELLED) and its thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True

        async def shut():
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()
            await self._channel.close()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

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
        self._forward = self.channel.unary_unary(FORWARD, request_serializer=None, response_deserializer=None)
        self._stream = self.channel.stream_stream(FORWARD_STREAM, request_serializer=None, response_deserializer=None)

    async def forward(self, layer: int, hidden: torch.Tensor, *, router_logits=None, return_routing: bool = False, timeout=None):
        try:
            raw = await self._forward(
                request_bytes(layer, hidden, router_logits, return_routing), timeout=timeout or self.timeout, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None
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
                yield i, FleetError(_code(reply.error_code), reply.error_message, reply.retry_after_ms or None)
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
