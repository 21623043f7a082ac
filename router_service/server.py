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
from moefleet.core.request_stats import observe_request

from . import codec, security, wire
from .proto import fleet_pb2 as pb
from .proto import fleet_pb2_grpc as pb_grpc
from .router import ForwardResult, RequestError, RouterCore


def placement_message(core: RouterCore) -> pb.GetPlacementResponse:
    """The ``GetPlacementResponse`` of what ``core`` serves (the gRPC ``GetPlacement`` reply; the embedded router's too)."""
    spec = core.spec
    reply = pb.GetPlacementResponse(
        version=core.placement.version,
        moe_layers=list(spec.moe_layers),
        hidden_size=spec.layer.hidden_size,
        num_experts=spec.layer.num_experts,
        top_k=spec.layer.top_k,
        family=spec.family,
    )
    for (layer, expert), workers in sorted(core.placement.replicas().items()):
        reply.experts.add(layer=layer, expert=expert, workers=workers)
    return reply

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MoEFleet"].full_name


def parse(raw, message_cls, what: str):
    """A request message from the bytes received (or an already parsed message); INVALID_ARGUMENT if unparseable.

    The service's methods take raw bytes (``add_moefleet_servicer``) so that a
    message gRPC's own deserializer would fail on (answered ``UNKNOWN``) gets a
    documented status instead.
    """
    if isinstance(raw, message_cls):
        return raw
    try:
        return message_cls.FromString(bytes(raw))
    except (DecodeError, TypeError, ValueError) as e:  # TypeError/ValueError: not bytes at all
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: not a valid {message_cls.DESCRIPTOR.full_name}: {e}") from None


def error_reply(request_id: str, e: RequestError) -> pb.ForwardResponse:
    """A ForwardStream item that failed: its status code, message and retry hint."""
    return pb.ForwardResponse(
        request_id=request_id, error_code=e.code.value[0], error_message=e.message, retry_after_ms=e.retry_after_ms or 0
    )


class MoEFleetServicer(pb_grpc.MoEFleetServicer):
    """``moefleet.v1.MoEFleet`` over a RouterCore.

    Requests may arrive parsed (Ray Serve's proxy) or as the bytes received
    (``RouterServer``, which registers the methods with pass-through
    serializers): then they are parsed here (INVALID_ARGUMENT, never gRPC's
    own UNKNOWN, for bytes that are no request) and the hidden states are
    read in place (``wire``).
    raw_replies: build replies as serialized bytes, the output copied once
    (``RouterServer``); otherwise as messages.
    """

    def __init__(self, core: RouterCore, *, raw_replies: bool = False):
        self.core = core
        self.raw_replies = raw_replies

    async def _serve(self, request, deadline: float | None):
        """Answer one request, counted in the router's stats: its status, and when answered its layer's latency."""
        t0 = time.perf_counter()
        code, answered = "UNKNOWN", [None]
        try:
            reply = await self._answer(request, deadline, answered)
            code = "OK"
            return reply
        except RequestError as e:
            code = e.code.name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            stats = self.core.stats
            observe_request(stats.codes, stats.layer_latency, code, answered[0] if code == "OK" else None, time.perf_counter() - t0)

    async def _answer(self, request, deadline: float | None, answered: list):
        """The reply to one request (``answered[0]``: its layer, once parsed)."""
        core = self.core
        t0 = time.perf_counter()
        size = len(request) if isinstance(request, (bytes, bytearray, memoryview)) else request.ByteSize()
        request, hidden, logits = await core.offload(size, self._decode, request)
        core.stages.observe("decode", time.perf_counter() - t0)
        answered[0] = request.layer
        result: ForwardResult = await core.submit(request.layer, hidden, logits, deadline, request_bytes=size)
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
            except (DecodeError, TypeError, ValueError, IndexError) as e:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid moefleet.v1.ForwardRequest: {e}") from None
        elif not isinstance(request, pb.ForwardRequest):
            request = parse(request, pb.ForwardRequest, "request")
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
        reply = error_reply(request_id, e)
        return reply.SerializeToString() if self.raw_replies else reply

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    @staticmethod
    async def _abort(context, e: RequestError):
        trailing = (("grpc-retry-pushback-ms", str(e.retry_after_ms)),) if e.retry_after_ms else ()
        await context.abort(e.code, e.message, trailing_metadata=trailing)

    async def Forward(self, request, context):
        try:
            return await self._serve(request, self._deadline(context))
        except RequestError as e:
            await self._abort(context, e)

    async def ForwardStream(self, request_iterator, context):
        async for reply in self.stream(request_iterator, self._deadline(context)):
            yield reply

    async def stream(self, request_iterator, deadline: float | None):
        """Serve a stream's requests concurrently; yield replies as they complete (failed items carry their status).

        Flow control: at most ``stream_window`` items are being served or waiting
        to be sent. The next request is read only when a reply has been sent, so
        a client that sends faster than the fleet serves (or reads slower) is held
        back by HTTP/2 flow control, and the stream's memory stays bounded.
        """
        window = asyncio.Semaphore(self.core.config.stream_window)
        replies: asyncio.Queue = asyncio.Queue()  # holds at most stream_window items: each holds a window slot
        tasks: set[asyncio.Task] = set()
        end = object()
        unanswered = 0  # items read whose reply has not been taken from the queue

        async def one(raw):
            try:
                reply = await self._serve(raw, deadline)
            except RequestError as e:
                reply = self._error(_request_id(raw), e)
            except Exception as e:  # a bug: answer the item (INTERNAL) rather than leave the stream waiting
                log.exception("router: stream item failed")
                reply = self._error(_request_id(raw), RequestError(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"))
            await replies.put(reply)

        async def read():
            nonlocal unanswered
            it = request_iterator.__aiter__()
            try:
                while True:
                    await window.acquire()
                    try:
                        raw = await it.__anext__()
                    except StopAsyncIteration:
                        window.release()
                        return
                    unanswered += 1
                    t = asyncio.create_task(one(raw))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
            finally:
                await replies.put(end)

        reader = asyncio.create_task(read())
        reading = True
        try:
            while reading or unanswered:
                item = await replies.get()
                if item is end:
                    reading = False
                    if not reader.cancelled() and reader.exception() is not None:
                        raise reader.exception()
                    continue
                unanswered -= 1
                yield item  # returns once the reply is written: the client's reading paces the stream
                window.release()
        finally:
            reader.cancel()
            for t in list(tasks):
                t.cancel()

    async def GetPlacement(self, request, context):
        try:
            parse(request, pb.GetPlacementRequest, "request")
        except RequestError as e:
            await self._abort(context, e)
        return placement_message(self.core)


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


FORWARD_METHOD = f"/{SERVICE_NAME}/Forward"


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a ``Forward`` call before its message is read while the router is full.

    Full: ``max_queued_requests`` requests, ``max_inflight_tokens`` tokens or
    ``max_inflight_bytes`` bytes already admitted and unanswered. The answer is
    the one ``RouterCore`` gives after parsing (RESOURCE_EXHAUSTED with a retry
    hint), at the cost of no receive, parse or decode: under overload the
    router spends almost nothing on what it refuses. A call that finds room
    here is still admitted (or refused) by ``RouterCore.submit``.
    """

    def __init__(self, core: RouterCore):
        self.core = core

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method != FORWARD_METHOD:
            return handler
        why = self.core.full()
        if why is None:
            return handler
        retry_ms = self.core.retry_after_ms()

        def count() -> None:
            stats = self.core.stats
            stats.rejected_full += 1
            observe_request(stats.codes, stats.layer_latency, "RESOURCE_EXHAUSTED", None, 0.0)

        return security.refusal(
            handler, grpc.StatusCode.RESOURCE_EXHAUSTED, f"{why}; retry after {retry_ms} ms",
            trailing_metadata=(("grpc-retry-pushback-ms", str(retry_ms)),), on_refuse=count,
        )


def _serialize(reply) -> bytes:
    return reply if isinstance(reply, bytes) else reply.SerializeToString()


def add_moefleet_servicer(servicer: MoEFleetServicer, server) -> None:
    """Register ``moefleet.v1.MoEFleet`` with requests passed through as bytes (parsed by the servicer),
    and replies sent as the servicer built them (bytes, or a message serialized here).

    The generated ``add_MoEFleetServicer_to_server`` lets gRPC parse requests,
    and gRPC answers a message it cannot parse with ``UNKNOWN``; here every
    input reaches the servicer, which answers ``INVALID_ARGUMENT``.
    """
    handlers = {
        "Forward": grpc.unary_unary_rpc_method_handler(
            servicer.Forward, request_deserializer=None, response_serializer=_serialize
        ),
        "ForwardStream": grpc.stream_stream_rpc_method_handler(
            servicer.ForwardStream, request_deserializer=None, response_serializer=_serialize
        ),
        "GetPlacement": grpc.unary_unary_rpc_method_handler(
            servicer.GetPlacement, request_deserializer=None, response_serializer=_serialize
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
        """Bind and serve; refuses to start without a token where one is required (``security.resolve_token``)."""
        token = security.resolve_token(self.config)
        credentials = security.server_credentials(self.config)
        opts = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
        ]
        self.auth = security.BearerTokenInterceptor(token) if token else None
        interceptors = ([self.auth] if self.auth else []) + [AdmissionInterceptor(self.core)]  # the token is checked first
        self.server = grpc.aio.server(
            options=opts, interceptors=interceptors, maximum_concurrent_rpcs=self.config.max_concurrent_rpcs
        )
        add_moefleet_servicer(MoEFleetServicer(self.core, raw_replies=True), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), self.server
        )
        where = f"{self.config.host}:{self.config.port}"
        self.port = self.server.add_secure_port(where, credentials) if credentials else self.server.add_insecure_port(where)
        if not self.port:
            raise RuntimeError(f"router: cannot bind {where}")
        await self.server.start()
        await self.set_serving(self.core.ready())
        log.info(
            "router: gRPC on %s (%s, %s)", self.address,
            "mutual TLS" if self.config.tls_client_ca else "TLS" if credentials else "plaintext",
            "bearer token required" if token else "no authentication",
        )
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
