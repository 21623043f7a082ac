"""Hostile input against a real local fleet: over 10,000 fuzzed requests, every one answered with a documented status.

Two sources: hypothesis strategies over the proto (any layer, dtype, shape, byte length, NaN/Inf,
router logits, request ids; a share of them valid) and raw byte mutations of valid serialized
messages (bit flips, truncation, insertion, deletion, splicing, varint damage, random bytes),
sent to ``Forward``, ``GetPlacement`` and over one ``ForwardStream``. Valid requests must come back
exact; afterwards the fleet must be healthy, exact, and hold no request in flight.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from moefleet import MoEModel
from moefleet.core.config import FleetConfig, RouterConfig
from moefleet.local import LocalFleet
from moefleet.router_service import codec
from moefleet.router_service.client import FleetClient
from moefleet.router_service.proto import fleet_pb2 as pb
from tests import hf_models

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_MESSAGE = 256 << 10
MAX_TOKENS = 512
FORWARD_CODES = {  # the statuses fleet.proto documents for Forward, less those a healthy fleet without deadlines never gives
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
}
EXAMPLES, PER_EXAMPLE, MUTATIONS = 140, 40, 4400  # 5,600 from hypothesis + 4,400 mutations + extras >= 10,000


@pytest.fixture(scope="module")
def fleet(ray_cluster, redis_server, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz-mixtral")
    hf, _ = hf_models.build("mixtral")
    hf.save_pretrained(path)
    router = RouterConfig(max_message_bytes=MAX_MESSAGE, max_request_tokens=MAX_TOKENS, metrics_port=None)
    cfg = FleetConfig(checkpoint=str(path), num_workers=2, redis_url=redis_server.url, router=router,
                      namespace=f"fuzz-{uuid.uuid4().hex[:8]}", static=True)
    f = LocalFleet(cfg)
    f.start()
    f.model = MoEModel.from_pretrained(path)
    f.channel = grpc.insecure_channel(f.address, options=[("grpc.max_send_message_length", 4 * MAX_MESSAGE),
                                                          ("grpc.max_receive_message_length", 4 * MAX_MESSAGE)])
    f.forward = f.channel.unary_unary("/moefleet.v1.MoEFleet/Forward", request_serializer=None,
                                      response_deserializer=pb.ForwardResponse.FromString)
    f.placement = f.channel.unary_unary("/moefleet.v1.MoEFleet/GetPlacement", request_serializer=None,
                                        response_deserializer=pb.GetPlacementResponse.FromString)
    f.stream = f.channel.stream_stream("/moefleet.v1.MoEFleet/ForwardStream", request_serializer=None,
                                       response_deserializer=pb.ForwardResponse.FromString)
    f.seen = Counter()
    with FleetClient(f.address) as c:
        c.wait_ready(60)
    yield f
    f.channel.close()
    f.stop()


# -- what is sent -------------------------------------------------------------------------------
H, LAYERS = 32, (0, 1)  # hf_models.mixtral: hidden 32, both layers MoE
SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e-30, 65504.0], dtype=np.float32)


def _valid(layer: int, t: int, seed: int, dtype: int = pb.FLOAT32, routing: bool = False, request_id: str = "") -> pb.ForwardRequest:
    x = torch.randn(t, H, generator=torch.Generator().manual_seed(seed)).to(codec.TORCH_DTYPES[dtype])
    return pb.ForwardRequest(layer=layer, hidden=codec.encode(x), return_routing=routing, request_id=request_id)


@st.composite
def tensors(draw, near: tuple[int, ...] = (H,)):
    dims = st.one_of(st.integers(0, 20), st.sampled_from(near), st.integers(-3, -1), st.integers(2**31 - 2, 2**63 - 1))
    shape = draw(st.lists(dims, max_size=4))
    dtype = draw(st.one_of(st.sampled_from([0, 1, 1, 1, 2, 3, 4]), st.integers(-(2**31), 2**31 - 1)))
    item = {1: 4, 2: 2, 3: 2, 4: 4}.get(dtype, 4)
    n = int(np.prod(shape, dtype=object)) * item if shape and all(d >= 0 for d in shape) else -1
    if 0 <= n <= 8192 and draw(st.booleans()):
        if draw(st.booleans()):  # the right length, float-ish content with specials in it
            values = np.frombuffer(draw(st.binary(min_size=n, max_size=n)), dtype=np.uint8).copy()
            if dtype == 1 and n:
                f = values.view(np.float32)
                f[:] = np.where(np.abs(f) < 1e6, f, 0.5)
                f.flat[draw(st.integers(0, f.size - 1))] = draw(st.sampled_from(SPECIAL))
            data = values.tobytes()
        else:
            data = draw(st.binary(min_size=n, max_size=n))
    else:
        data = draw(st.binary(max_size=256))
    return pb.Tensor(data=data, shape=shape, dtype=dtype)


@st.composite
def requests(draw):
    """A ForwardRequest, valid about one time in three."""
    if draw(st.integers(0, 2)) == 0:
        return _valid(draw(st.sampled_from(LAYERS)), draw(st.integers(1, 12)), draw(st.integers(0, 2**31 - 1)),
                      draw(st.sampled_from([pb.FLOAT32, pb.FLOAT32, pb.BFLOAT16, pb.FLOAT16])), draw(st.booleans()),
                      draw(st.text(max_size=8)))
    msg = pb.ForwardRequest(
        layer=draw(st.one_of(st.sampled_from(LAYERS), st.integers(-(2**31), 2**31 - 1))),
        hidden=draw(tensors()),
        return_routing=draw(st.booleans()),
        request_id=draw(st.text(max_size=16)),
    )
    if draw(st.integers(0, 3)) == 0:
        msg.router_logits.CopyFrom(draw(tensors(near=(6, 12))))
    return msg


def mutate(rng: random.Random, data: bytes, other: bytes) -> bytes:
    b = bytearray(data)
    op = rng.randrange(9)
    if op == 0 and b:  # flip bits
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncate
        b = b[: rng.randrange(len(b) + 1)]
    elif op == 2:  # insert random bytes
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 16))
    elif op == 3 and b:  # delete a slice
        i = rng.randrange(len(b))
        del b[i : i + rng.randint(1, 16)]
    elif op == 4 and b:  # overwrite a slice
        i = rng.randrange(len(b))
        n = min(len(b) - i, rng.randint(1, 16))
        b[i : i + n] = rng.randbytes(n)
    elif op == 5 and b:  # duplicate a slice (repeated fields, second values)
        i = rng.randrange(len(b))
        b[i:i] = b[i : i + rng.randint(1, 32)]
    elif op == 6:  # splice two messages
        b = b[: rng.randrange(len(b) + 1)] + other[rng.randrange(len(other) + 1):]
    elif op == 7 and b:  # varint damage: continuation bits, huge lengths
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.choice([0x80, 0xFF, 0x7F, 0x00])
    else:  # anything at all
        b = bytearray(rng.randbytes(rng.randint(0, 64)))
    return bytes(b)


# -- checking what comes back -------------------------------------------------------------------
def _check(fleet, raw: bytes, code: grpc.StatusCode, reply: pb.ForwardResponse | None, details: str) -> None:
    fleet.seen[code] += 1
    assert code in FORWARD_CODES, f"{code}: {details!r} for {raw[:80]!r}"
    assert code == grpc.StatusCode.OK or details, "a refusal says why"
    if code != grpc.StatusCode.OK:
        return
    req = pb.ForwardRequest.FromString(raw)  # it was served: so it parses
    hidden = codec.decode(req.hidden, "hidden")
    out = codec.decode(reply.output, "output")
    assert out.shape == hidden.shape and out.dtype == hidden.dtype and reply.request_id == req.request_id
    if hidden.dtype == torch.float32 and not req.HasField("router_logits"):
        want = fleet.model.layer(req.layer)(hidden)  # huge finite inputs overflow alike: compare NaN/Inf as equal
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4, equal_nan=True)


def _send(fleet, raws: list[bytes]) -> None:
    futures = [fleet.forward.future(raw, timeout=60) for raw in raws]
    for raw, fut in zip(raws, futures):
        try:
            reply = fut.result()
            _check(fleet, raw, grpc.StatusCode.OK, reply, "")
        except grpc.RpcError as e:
            _check(fleet, raw, e.code(), None, e.details())


def test_fuzzed_requests_get_only_documented_statuses_and_the_fleet_stays_exact(fleet):
    sent = {"hypothesis": 0, "mutations": 0, "placement": 0, "stream": 0, "large": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, phases=(Phase.generate, Phase.shrink),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(batch=st.lists(requests(), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def hypothesis_batches(batch):
        _send(fleet, [m.SerializeToString() for m in batch])
        sent["hypothesis"] += len(batch)

    hypothesis_batches()

    rng = random.Random(20261125)
    bases = [_valid(rng.choice(LAYERS), rng.randint(1, 12), rng.randrange(2**31), rng.choice([1, 1, 2, 3]),
                    rng.random() < 0.5, str(i)).SerializeToString() for i in range(64)]
    logits = pb.ForwardRequest.FromString(bases[0])
    logits.router_logits.CopyFrom(codec.encode(torch.randn(len(codec.decode(logits.hidden, "h")), 6)))
    bases.append(logits.SerializeToString())
    mutated = [mutate(rng, rng.choice(bases), rng.choice(bases)) for _ in range(MUTATIONS)]
    for i in range(0, len(mutated), 200):
        _send(fleet, mutated[i : i + 200])
    sent["mutations"] = len(mutated)

    # too large for the port, too many tokens: RESOURCE_EXHAUSTED
    big = [_valid(0, MAX_MESSAGE // (4 * H) + 8, 1).SerializeToString(), _valid(1, MAX_TOKENS + 1, 2).SerializeToString()]
    for raw in big:
        with pytest.raises(grpc.RpcError) as e:
            fleet.forward(raw, timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        fleet.seen[e.value.code()] += 1
    sent["large"] = len(big)

    # GetPlacement: any bytes are a GetPlacementRequest (it has no fields) or INVALID_ARGUMENT
    for raw in mutated[:300]:
        try:
            reply = fleet.placement(raw, timeout=30)
            assert list(reply.moe_layers) == list(LAYERS)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    sent["placement"] = 300

    # one stream of mutated items: every item answered, the stream itself ends OK
    items = mutated[-600:]
    replies = list(fleet.stream(iter(items), timeout=120))
    assert len(replies) == len(items)
    stream_codes = Counter(r.error_code for r in replies)
    assert set(stream_codes) <= {c.value[0] for c in FORWARD_CODES}, stream_codes
    sent["stream"] = len(items)

    total = sum(sent.values())
    print(f"fuzzed requests: {total} {sent}; Forward statuses: { {c.name: n for c, n in fleet.seen.items()} }")
    assert total >= 10_000
    assert fleet.seen[grpc.StatusCode.OK] >= 500 and fleet.seen[grpc.StatusCode.INVALID_ARGUMENT] >= 3000

    # alive, exact, nothing left in flight
    with FleetClient(fleet.address) as client:
        client.wait_ready(30)
        x = torch.randn(9, H, generator=torch.Generator().manual_seed(7))
        for layer in LAYERS:
            assert (client.forward(layer, x) - fleet.model.layer(layer)(x)).abs().max().item() <= 1e-5
    deadline = time.monotonic() + 10
    while True:
        (stats,) = fleet.router_stats()
        settled = (stats["queued"], stats["inflight_tokens"], stats["inflight_bytes"]) == (0, 0, 0)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert settled, stats
    assert all(s["queue_depth"] == 0 for s in fleet.worker_stats().values())
