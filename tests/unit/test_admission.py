"""Overload and hostile input in the serving path without Ray or sockets: admission, deadlines at the
workers, stream flow control, and decoding any bytes into a documented refusal."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moefleet import MoEModel
from moefleet.core.config import RouterConfig
from moefleet.core.placement import spread_placement
from moefleet.expert_workers.group import DeadlineExpiredError, ExpertGroupCore
from moefleet.router_service import codec
from moefleet.router_service.proto import fleet_pb2 as pb
from moefleet.router_service.router import RequestError, RouterCore
from moefleet.router_service.server import MoEFleetServicer, parse
from moefleet.router_service.transport import LocalTransport
from tests import hf_models


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    model, _ = hf_models.build("mixtral")
    model.save_pretrained(path)
    return str(path)


def _core(checkpoint, **router_kw):
    model = MoEModel.from_pretrained(checkpoint)
    spec = model.spec
    placement = spread_placement(list(spec.moe_layers), spec.layer.num_experts, ["w0", "w1"])
    workers = {d: ExpertGroupCore(d, checkpoint, keys, backend="torch") for d, keys in placement.assignments.items()}
    core = RouterCore(checkpoint, RouterConfig(**router_kw), LocalTransport(workers))
    core.set_placement(placement)
    return model, workers, core


def _settled(core) -> tuple:
    return core._queued, core.inflight_tokens, core.inflight_bytes


def test_tokens_in_flight_are_admitted_up_to_the_limit_and_released(checkpoint):
    model, _, core = _core(checkpoint, batch_window_ms=100, max_inflight_tokens=20, max_request_tokens=10)
    layer, h = model.moe_layers[0], model.spec.layer.hidden_size
    xs = [torch.randn(n, h) for n in (10, 6, 5, 4)]  # 10 + 6 admitted; 5 would make 21; 4 makes 20

    async def run():
        return await asyncio.gather(*(core.submit(layer, x) for x in xs), return_exceptions=True)

    results = asyncio.run(run())
    assert isinstance(results[2], RequestError) and results[2].code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_inflight_tokens=20" in results[2].message and results[2].retry_after_ms >= 10
    for i in (0, 1, 3):
        assert (results[i].output - model.layer(layer)(xs[i])).abs().max().item() <= 1e-5
    assert core.stats.rejected_full == 1 and core.stats.requests == 3
    assert _settled(core) == (0, 0, 0)


def test_bytes_in_flight_are_admitted_up_to_the_limit(checkpoint):
    model, _, core = _core(checkpoint, batch_window_ms=100, max_inflight_bytes=4096, max_message_bytes=4096)
    layer, h = model.moe_layers[0], model.spec.layer.hidden_size

    async def run():
        x = torch.randn(2, h)
        return await asyncio.gather(*(core.submit(layer, x, request_bytes=1500) for _ in range(3)), return_exceptions=True)

    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, RequestError)]
    assert len(refused) == 1 and "max_inflight_bytes=4096" in refused[0].message
    assert _settled(core) == (0, 0, 0)


def test_bytes_in_flight_are_admitted_exactly_up_to_the_limit(checkpoint):
    """At the boundary: requests that fill max_inflight_bytes to the byte are admitted; one byte more is refused."""
    model, _, core = _core(checkpoint, batch_window_ms=100, max_inflight_bytes=4096, max_message_bytes=4096)
    layer, h = model.moe_layers[0], model.spec.layer.hidden_size

    async def run():
        x = torch.randn(2, h)
        return await asyncio.gather(*(core.submit(layer, x, request_bytes=n) for n in (2048, 2048, 1)), return_exceptions=True)

    first, second, third = asyncio.run(run())
    assert not isinstance(first, BaseException) and not isinstance(second, BaseException)  # 4096 bytes: at the limit
    assert isinstance(third, RequestError) and third.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4096 bytes in flight + 1 exceed max_inflight_bytes=4096" in third.message
    assert core.stats.rejected_full == 1 and _settled(core) == (0, 0, 0)


def test_cancelled_requests_release_what_they_held(checkpoint):
    model, _, core = _core(checkpoint, batch_window_ms=200, dispatch_when_idle=False)  # all five wait in the window
    layer, h = model.moe_layers[0], model.spec.layer.hidden_size

    async def run():
        tasks = [asyncio.create_task(core.submit(layer, torch.randn(3, h))) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert core.inflight_tokens == 15
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.3)  # the flusher finds the cancelled futures

    asyncio.run(run())
    assert _settled(core) == (0, 0, 0) and core.stats.tokens_computed == 0


def test_retry_hint_follows_the_time_requests_spend_in_the_router(checkpoint):
    model, _, core = _core(checkpoint, batch_window_ms=150, dispatch_when_idle=False)
    layer, h = model.moe_layers[0], model.spec.layer.hidden_size
    before = core.retry_after_ms()

    async def run():
        for _ in range(10):
            await core.submit(layer, torch.randn(2, h))

    asyncio.run(run())
    assert before == 50 and core.retry_after_ms() >= 100  # each request waited the 150 ms window


def test_expired_work_is_refused_by_the_workers_not_computed(checkpoint):
    model, workers, core = _core(checkpoint)
    layer, h = model.moe_layers[0], model.spec.layer.hidden_size
    with pytest.raises(DeadlineExpiredError):
        workers["w0"].forward(layer, torch.randn(2, h).numpy(), *([None] * 5), 1, deadline=time.time() - 1)

    async def run():
        return await core.forward(layer, torch.randn(4, h), deadline=time.monotonic() - 0.001)

    with pytest.raises(RequestError) as e:
        asyncio.run(run())
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "not computed" in e.value.message
    stats = [w.stats() for w in workers.values()]
    assert sum(s["expired"] for s in stats) >= 2 and all(not s["tokens_served"] for s in stats)


def test_a_live_deadline_reaches_the_workers_and_is_served(checkpoint):
    model, workers, core = _core(checkpoint)
    layer, h = model.moe_layers[0], model.spec.layer.hidden_size
    x = torch.randn(4, h)
    got = asyncio.run(core.submit(layer, x, deadline=time.monotonic() + 30))
    assert (got.output - model.layer(layer)(x)).abs().max().item() <= 1e-5
    assert sum(w.stats()["expired"] for w in workers.values()) == 0


def test_stream_reads_no_further_than_its_window_until_replies_are_taken(checkpoint):
    model, _, core = _core(checkpoint, stream_window=3, batch_window_ms=0)
    layer, h = model.moe_layers[0], model.spec.layer.hidden_size
    xs = [torch.randn(2, h) for _ in range(10)]
    pulled = []

    async def requests():
        for i, x in enumerate(xs):
            pulled.append(i)
            yield pb.ForwardRequest(layer=layer, hidden=codec.encode(x), request_id=str(i)).SerializeToString()
        yield b"\xff\xff not a message"

    async def run():
        stream = MoEFleetServicer(core).stream(requests(), None)
        first = await stream.__anext__()
        await asyncio.sleep(0.3)  # one reply handed out (its slot frees when the next is asked for), none more
        held = len(pulled)
        rest = [r async for r in stream]
        return held, [first, *rest]

    held, replies = asyncio.run(run())
    assert held == 3  # stream_window items read, not one more
    ok = {r.request_id: r for r in replies if not r.error_code}
    assert sorted(ok, key=int) == [str(i) for i in range(10)]
    for i, x in enumerate(xs):
        assert (codec.decode(ok[str(i)].output, "output") - model.layer(layer)(x)).abs().max().item() <= 1e-5
    (bad,) = [r for r in replies if r.error_code]
    assert bad.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "not a valid moefleet.v1.ForwardRequest" in bad.error_message


# -- any bytes in: a documented refusal or a message ----------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=256))
def test_any_bytes_parse_to_a_request_or_invalid_argument(raw):
    try:
        msg = parse(raw, pb.ForwardRequest, "request")
    except RequestError as e:
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid moefleet.v1.ForwardRequest" in e.message
    else:
        assert isinstance(msg, pb.ForwardRequest)


tensor_messages = st.builds(
    pb.Tensor,
    data=st.binary(max_size=96),
    shape=st.lists(st.one_of(st.integers(-3, 40), st.integers(-(2**63), 2**63 - 1)), max_size=4),
    dtype=st.one_of(st.sampled_from(list(pb.DType.values())), st.integers(-(2**31), 2**31 - 1)),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=tensor_messages, ndim=st.sampled_from([None, 2]), float_only=st.booleans())
def test_any_tensor_message_decodes_or_is_a_tensor_error_naming_the_field(msg, ndim, float_only):
    try:
        t = codec.decode(msg, "hidden", ndim=ndim, float_only=float_only)
    except codec.TensorError as e:
        assert str(e).startswith("hidden.")
    else:
        assert list(t.shape) == list(msg.shape) and t.dtype == codec.TORCH_DTYPES[msg.dtype]
        assert t.numel() * t.element_size() == len(msg.data)
