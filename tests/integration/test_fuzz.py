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
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from moefleet import MoEModel
from moefleet.core.config import FleetConfig, RouterConfig
from moefleet.local import LocalFleet
from moefleet.router_service.client import FleetClient
from moefleet.router_service.proto import fleet_pb2 as pb
from tests import hf_models
from tests.fuzz_inputs import FORWARD_CODES, H, LAYERS, check_reply, mutated_requests, requests, valid_request

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_MESSAGE = 256 << 10
MAX_TOKENS = 512
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


def _send(fleet, raws: list[bytes]) -> None:
    futures = [fleet.forward.future(raw, timeout=60) for raw in raws]
    for raw, fut in zip(raws, futures):
        try:
            reply = fut.result()
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            code, details, reply = e.code(), e.details(), None
        fleet.seen[code] += 1
        check_reply(fleet.model, raw, code, reply, details)


def test_fuzzed_requests_get_only_documented_statuses_and_the_fleet_stays_exact(fleet):
    sent = {"hypothesis": 0, "mutations": 0, "placement": 0, "stream": 0, "large": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, phases=(Phase.generate, Phase.shrink),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(batch=st.lists(requests(), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def hypothesis_batches(batch):
        _send(fleet, [m.SerializeToString() for m in batch])
        sent["hypothesis"] += len(batch)

    hypothesis_batches()

    mutated = mutated_requests(random.Random(20261125), MUTATIONS)
    for i in range(0, len(mutated), 200):
        _send(fleet, mutated[i : i + 200])
    sent["mutations"] = len(mutated)

    # too large for the port, too many tokens: RESOURCE_EXHAUSTED
    big = [valid_request(0, MAX_MESSAGE // (4 * H) + 8, 1).SerializeToString(), valid_request(1, MAX_TOKENS + 1, 2).SerializeToString()]
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
