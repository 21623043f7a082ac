"""End to end on a local fleet: real Ray, real Redis, real gRPC over loopback."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import numpy as np
import pytest
import ray
import torch

from moefleet import MoEModel
from moefleet.core.config import FleetConfig, RouterConfig, WorkerConfig
from moefleet.core.placement import spread_placement
from moefleet.local import LocalFleet
from moefleet.router_service import codec
from moefleet.router_service.actor import router_actor_class
from moefleet.router_service.attach import attach
from moefleet.router_service.client import AsyncFleetClient, FleetClient, FleetError
from moefleet.router_service.proto import fleet_pb2 as pb
from moefleet.router_service.proto import fleet_pb2_grpc as pb_grpc
from tests import hf_models

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _checkpoint(tmp_path_factory, family, **over):
    path = tmp_path_factory.mktemp(family)
    model, _ = hf_models.build(family, **over)
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v3"])
def fleet(request, ray_cluster, redis_server, tmp_path_factory):
    path, hf = _checkpoint(tmp_path_factory, request.param)
    cfg = FleetConfig(
        checkpoint=str(path), num_workers=2, redis_url=redis_server.url, namespace=f"t-{uuid.uuid4().hex[:8]}", static=True
    )
    f = LocalFleet(cfg)
    f.start()
    f.hf_model = hf
    f.client = FleetClient(f.address)
    f.client.wait_ready(60)
    yield f
    f.client.close()
    f.stop()


def test_every_moe_layer_over_grpc_equals_in_process_layer(fleet):
    model = MoEModel.from_pretrained(fleet.checkpoint)
    g = torch.Generator().manual_seed(0)
    for layer in model.moe_layers:
        for t in (1, 7, 300):
            hidden = torch.randn(t, model.spec.layer.hidden_size, generator=g)
            got, ids, weights = fleet.client.forward(layer, hidden, return_routing=True)
            want, routing = model.layer(layer)(hidden, return_routing=True)
            assert (got - want).abs().max().item() <= 1e-5, f"layer {layer}, T={t}"
            assert torch.equal(ids, routing.topk_ids)
            assert torch.allclose(weights, routing.topk_weights, atol=1e-6)
    served = [s["tokens_served"] for s in fleet.worker_stats().values()]
    assert all(served), "every worker served tokens"


def test_generate_through_attach_equals_untouched_model(fleet):
    hf = fleet.hf_model
    prompt = torch.tensor([[5, 17, 42, 7, 3, 11]])
    want = hf.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    import copy

    served = copy.deepcopy(hf)
    layers = attach(served, fleet.client)
    assert layers and all(type(served.get_submodule(hf_models_path(hf, layer))).__name__ == "RemoteMoEBlock" for layer in layers)
    got = served.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert torch.equal(got, want)


def hf_models_path(hf, layer):
    from moefleet.core.families import family_for

    cfg = hf.config.to_dict()
    fam = family_for(cfg)
    return fam.block_path(layer, fam.spec(cfg))


def test_forward_stream_pipelines_calls(fleet):
    model = MoEModel.from_pretrained(fleet.checkpoint)
    layer = model.moe_layers[-1]
    hs = [torch.randn(n, model.spec.layer.hidden_size) for n in (2, 9, 4, 1)]

    async def run():
        client = AsyncFleetClient(fleet.address)
        out = {}
        async for i, result in client.forward_stream([(layer, h) for h in hs] + [(999, hs[0])]):
            out[i] = result
        await client.close()
        return out

    out = asyncio.run(run())
    assert sorted(out) == list(range(len(hs) + 1))
    for i, h in enumerate(hs):
        assert (out[i] - model.layer(layer)(h)).abs().max().item() <= 1e-5
    assert isinstance(out[len(hs)], FleetError) and out[len(hs)].code == grpc.StatusCode.NOT_FOUND


def test_get_placement_health_and_reflection(fleet):
    p = fleet.client.placement()
    model = MoEModel.from_pretrained(fleet.checkpoint)
    assert list(p.moe_layers) == list(model.moe_layers)
    assert {(e.layer, e.expert) for e in p.experts} == {(l, e) for l in model.moe_layers for e in range(model.spec.layer.num_experts)}
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(fleet.client.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="moefleet.v1.MoEFleet")).status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(fleet.client.channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert "moefleet.v1.MoEFleet" in names and "grpc.health.v1.Health" in names


def test_router_telemetry_reaches_redis(fleet):
    import time

    from moefleet.core.state import StateStore

    model = MoEModel.from_pretrained(fleet.checkpoint)
    layer = model.moe_layers[0]
    fleet.client.forward(layer, torch.randn(64, model.spec.layer.hidden_size))
    store = StateStore(fleet.redis_url, namespace=fleet.config.namespace)
    deadline = time.monotonic() + 10
    load = {}
    while time.monotonic() < deadline:
        load = store.read_load(time.time(), 1.0, 30, 60.0)
        if sum(v for (l, _), v in load.items() if l == layer) >= 64 * model.spec.layer.top_k:
            break
        time.sleep(0.2)
    assert sum(v for (l, _), v in load.items() if l == layer) >= 64 * model.spec.layer.top_k * 0.5


# -- bad input: each gets its status, and the next good request succeeds ---------


def _raw(fleet):
    return pb_grpc.MoEFleetStub(fleet.client.channel)


def _good(fleet):
    model_layer = fleet.client.placement().moe_layers[0]
    h = fleet.client.placement().hidden_size
    out = fleet.client.forward(model_layer, torch.randn(3, h))
    assert out.shape == (3, h)


def _bad_requests(fleet):
    p = fleet.client.placement()
    layer, h = p.moe_layers[0], p.hidden_size
    good = codec.encode(torch.randn(4, h))
    yield "unknown layer", pb.ForwardRequest(layer=12345, hidden=good), grpc.StatusCode.NOT_FOUND, "not a MoE layer"
    yield "wrong hidden size", pb.ForwardRequest(layer=layer, hidden=codec.encode(torch.randn(4, h + 1))), grpc.StatusCode.INVALID_ARGUMENT, "hidden size"
    short = pb.Tensor(data=good.data[:-4], shape=good.shape, dtype=good.dtype)
    yield "byte length", pb.ForwardRequest(layer=layer, hidden=short), grpc.StatusCode.INVALID_ARGUMENT, "bytes disagree"
    bad_dtype = pb.Tensor(data=good.data, shape=good.shape, dtype=pb.INT32)
    yield "unsupported dtype", pb.ForwardRequest(layer=layer, hidden=bad_dtype), grpc.StatusCode.INVALID_ARGUMENT, "INT32 is not supported"
    yield "unset dtype", pb.ForwardRequest(layer=layer, hidden=pb.Tensor(data=good.data, shape=good.shape)), grpc.StatusCode.INVALID_ARGUMENT, "not supported"
    yield "empty batch", pb.ForwardRequest(layer=layer, hidden=codec.encode(torch.randn(0, h))), grpc.StatusCode.INVALID_ARGUMENT, "empty batch"
    nan = torch.randn(4, h)
    nan[2, 1] = float("nan")
    yield "NaN", pb.ForwardRequest(layer=layer, hidden=codec.encode(nan)), grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"
    inf = torch.randn(4, h)
    inf[0, 0] = float("inf")
    yield "Inf", pb.ForwardRequest(layer=layer, hidden=codec.encode(inf)), grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"
    yield "3-d hidden", pb.ForwardRequest(layer=layer, hidden=codec.encode(torch.randn(1, 4, h))), grpc.StatusCode.INVALID_ARGUMENT, "expected 2 dimensions"
    logits = codec.encode(torch.randn(4, p.num_experts + 1))
    yield "router logits shape", pb.ForwardRequest(layer=layer, hidden=good, router_logits=logits), grpc.StatusCode.INVALID_ARGUMENT, "router_logits.shape"


def test_each_bad_input_gets_its_status_and_the_server_keeps_serving(fleet):
    stub = _raw(fleet)
    seen = []
    for name, req, code, text in _bad_requests(fleet):
        with pytest.raises(grpc.RpcError) as e:
            stub.Forward(req, timeout=30)
        assert e.value.code() == code, f"{name}: {e.value.code()} {e.value.details()}"
        assert text in e.value.details(), f"{name}: {e.value.details()}"
        _good(fleet)
        seen.append(name)
    assert len(seen) == 10


def test_precomputed_router_logits_are_used(fleet):
    model = MoEModel.from_pretrained(fleet.checkpoint)
    layer = model.moe_layers[0]
    hidden = torch.randn(6, model.spec.layer.hidden_size)
    logits = torch.randn(6, model.spec.layer.num_experts) * 5
    got, ids, _ = fleet.client.forward(layer, hidden, router_logits=logits, return_routing=True)
    want, routing = model.layer(layer)(hidden, router_logits=logits, return_routing=True)
    assert torch.equal(ids, routing.topk_ids)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_requests_are_answered_in_their_dtype(fleet, dtype):
    model = MoEModel.from_pretrained(fleet.checkpoint)
    layer = model.moe_layers[0]
    hidden = torch.randn(8, model.spec.layer.hidden_size).to(dtype)
    got = fleet.client.forward(layer, hidden)
    assert got.dtype == dtype
    want = model.layer(layer)(hidden.float())
    assert (got.float() - want).abs().max().item() <= 2e-2


@pytest.fixture(scope="module")
def strict_router(fleet):
    """A second router on the same workers: small limits and a long batch window."""
    cfg = RouterConfig(batch_window_ms=600, dispatch_when_idle=False, max_queued_requests=1, max_message_bytes=64 << 10)
    actor = router_actor_class().options(namespace=fleet.config.namespace, num_cpus=0).remote(
        fleet.checkpoint, cfg.model_dump(), fleet.redis_url, fleet.config.namespace, "strict"
    )
    address = ray.get(actor.start.remote())
    client = FleetClient(address)
    client.wait_ready(60)
    yield actor, client
    client.close()
    ray.get(actor.stop.remote())
    ray.kill(actor)


def test_request_over_size_limit_is_resource_exhausted(fleet, strict_router):
    _, client = strict_router
    p = client.placement()
    big = torch.randn((70 << 10) // (4 * p.hidden_size) + 1, p.hidden_size)
    with pytest.raises(FleetError) as e:
        client.forward(p.moe_layers[0], big)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    _good(fleet)


def test_full_queue_is_resource_exhausted(strict_router):
    actor, client = strict_router
    p = client.placement()
    h = torch.randn(2, p.hidden_size)

    async def run():
        c = AsyncFleetClient(client.address)
        results = await asyncio.gather(*(c.forward(p.moe_layers[0], h) for _ in range(3)), return_exceptions=True)
        await c.close()
        return results

    results = asyncio.run(run())
    codes = [r.code for r in results if isinstance(r, FleetError)]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert any(isinstance(r, torch.Tensor) for r in results), "the request that was queued is answered"
    assert client.forward(p.moe_layers[0], h).shape == h.shape


def test_expired_deadline_is_not_computed(strict_router):
    actor, client = strict_router
    p = client.placement()
    before = ray.get(actor.stats.remote())
    with pytest.raises(FleetError) as e:
        client.forward(p.moe_layers[0], torch.randn(2, p.hidden_size), timeout=0.2)  # the window is 600 ms
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    import time

    time.sleep(0.8)
    after = ray.get(actor.stats.remote())
    # dropped before dispatch: expired by the router, or cancelled by gRPC when the deadline passed
    assert after["expired"] + after["cancelled"] == before["expired"] + before["cancelled"] + 1
    assert after["tokens_computed"] == before["tokens_computed"]


# -- multi-node ----------------------------------------------------------------


def test_workers_land_on_the_nodes_the_placement_names(ray_cluster, redis_server, tmp_path_factory):
    path, _ = _checkpoint(tmp_path_factory, "mixtral")
    model = MoEModel.from_pretrained(path)
    placement = spread_placement(list(model.moe_layers), model.spec.layer.num_experts, ["a-0", "b-0"])
    cfg = FleetConfig(
        checkpoint=str(path), redis_url=redis_server.url, namespace=f"mn-{uuid.uuid4().hex[:8]}",
        worker=WorkerConfig(num_cpus=0.5), static=True,
    )
    f = LocalFleet(cfg)
    f.start_workers(placement, resources={"a-0": {"node_a": 1}, "b-0": {"node_b": 1}})
    try:
        where = {d: ray.get(w.node_resources.remote()) for d, w in f.workers.items()}
        assert "node_a" in where["a-0"] and "node_b" not in where["a-0"]
        assert "node_b" in where["b-0"] and "node_a" not in where["b-0"]
        f.start(placement)
        with FleetClient(f.address) as client:
            client.wait_ready(60)
            hidden = torch.randn(7, model.spec.layer.hidden_size)
            for layer in model.moe_layers:
                assert (client.forward(layer, hidden) - model.layer(layer)(hidden)).abs().max().item() <= 1e-5
    finally:
        f.stop()


def test_router_exports_prometheus_metrics_on_loopback(fleet):
    import urllib.request

    stats = fleet.router_stats()[0]
    port = stats["metrics_port"]
    assert port
    model = MoEModel.from_pretrained(fleet.checkpoint)
    fleet.client.forward(model.moe_layers[0], torch.randn(5, model.spec.layer.hidden_size))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    requests = [line for line in text.splitlines() if line.startswith("moefleet_router_requests_total{")]
    assert requests and float(requests[0].split()[-1]) >= 1
    assert "moefleet_router_placement_version" in text


def test_a_batch_past_its_deadline_is_refused_by_the_worker_not_computed(fleet):
    """The deadline travels with each batch over Ray: a worker that would start it late refuses it (DEADLINE_EXCEEDED)."""
    import time

    from moefleet.router_service.dispatch import plan_dispatch
    from moefleet.router_service.router import RequestError
    from moefleet.router_service.transport import RayTransport

    p = fleet.client.placement()
    layer = p.moe_layers[0]
    held = sorted(e.expert for e in p.experts if e.layer == layer and "worker-0" in e.workers)[:2]
    ids = np.array([held] * 3 if len(held) == 2 else [[held[0]]] * 3)
    batch, = plan_dispatch(ids, np.ones(ids.shape, np.float32), {e: ["worker-0"] for e in held})
    transport = RayTransport(fleet.config.namespace, compiled_graphs=False)
    hidden = torch.randn(3, p.hidden_size, generator=torch.Generator().manual_seed(0))
    before = fleet.worker_stats()["worker-0"]

    async def call(deadline):
        (result,) = await transport.run(transport.prepare(layer, hidden, [batch], deadline), [batch])
        return result

    e = asyncio.run(call(time.time() - 0.01))
    assert isinstance(e, RequestError)
    assert e.code == grpc.StatusCode.DEADLINE_EXCEEDED and "not computed" in e.message
    after = fleet.worker_stats()["worker-0"]
    assert after["expired"] == before["expired"] + 1 and after["tokens_served"] == before["tokens_served"]
    reply = asyncio.run(call(time.time() + 30))
    assert reply.partial.shape == (3, p.hidden_size)  # in time: computed
