"""The serving path end to end without Ray: gRPC on loopback -> RouterServer -> RouterCore -> in-process workers.

Checks what the path costs is accounted for (a timer per stage, exported to
Prometheus), where its tensor work runs (on the event loop when small, on a
compute thread when large), and that what it returns is the in-process layer's.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from moefleet import MoEModel
from moefleet.core.config import RouterConfig
from moefleet.core.placement import spread_placement
from moefleet.core.stages import ROUTER_STAGES, STAGES, StageHistograms, per_call_ms
from moefleet.expert_workers.group import ExpertGroupCore
import copy
from concurrent.futures import ThreadPoolExecutor

import grpc

from moefleet.router_service.attach import RemoteMoEBlock, attach
from moefleet.router_service.client import AsyncFleetClient, FleetClient, FleetError, ForwardStream
from moefleet.router_service.metrics import RouterCollector
from moefleet.router_service.router import RouterCore
from moefleet.router_service.server import RouterServer
from moefleet.router_service.transport import LocalTransport
from tests import hf_models


class _Served:
    """A router with in-process workers, serving gRPC from an event loop on a thread of its own."""

    def __init__(self, path, **router_kw):
        self.model = MoEModel.from_pretrained(path, backend="torch")
        spec = self.model.spec
        placement = spread_placement(list(spec.moe_layers), spec.layer.num_experts, ["w0", "w1"])
        workers = {d: ExpertGroupCore(d, str(path), keys, backend="torch") for d, keys in placement.assignments.items()}
        cfg = RouterConfig(**router_kw)
        self.core = RouterCore(str(path), cfg, LocalTransport(workers))
        self.core.set_placement(placement)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = RouterServer(self.core, cfg)
        self.address = self.run(self.server.start())

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def close(self):
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_moe")  # routed + gated shared experts
    model, _ = hf_models.build("qwen2_moe")
    model.save_pretrained(path)
    s = _Served(path)
    s.hf_model = model
    yield s
    s.close()


def test_grpc_path_returns_the_in_process_layer(served):
    spec = served.model.spec
    g = torch.Generator().manual_seed(0)
    with FleetClient(served.address) as c:
        for layer in spec.moe_layers:
            for t in (1, 7, 300):
                hidden = torch.randn(t, spec.layer_spec(layer).hidden_size, generator=g)
                got, ids, _ = c.forward(layer, hidden, return_routing=True)
                want, routing = served.model.layer(layer)(hidden, return_routing=True)
                assert (got - want).abs().max().item() <= 1e-5
                assert torch.equal(ids, routing.topk_ids)
                got += 1  # the client's output is its own memory


def test_stream_replies_match_their_requests(served):
    spec = served.model.spec
    layer = spec.moe_layers[-1]
    hs = [torch.randn(n, spec.layer.hidden_size) for n in (3, 1, 9, 4)]

    async def run():
        c = AsyncFleetClient(served.address)
        out = {i: r async for i, r in c.forward_stream([(layer, h) for h in hs])}
        await c.close()
        return out

    out = asyncio.run(run())
    for i, h in enumerate(hs):
        assert (out[i] - served.model.layer(layer)(h)).abs().max().item() <= 1e-5


def test_every_stage_of_a_call_is_timed_and_exported(served):
    spec = served.model.spec
    layer = spec.moe_layers[0]
    before = served.core.stages.totals()
    with FleetClient(served.address) as c:
        for _ in range(3):
            c.forward(layer, torch.randn(5, spec.layer.hidden_size))
    after = served.core.stages.totals()
    counts = {s: after[s][1] - before.get(s, (0.0, 0))[1] for s in after}
    one_per_call = ["decode", "validate", "gate", "dispatch_plan", "transport_prepare", "workers", "combine", "call_overhead",
                    "shared_experts", "reply", "router_total"]
    for s in one_per_call:
        assert counts[s] == 3, s
    for s in ("to_worker", "worker_gather", "expert_ffn", "worker_combine", "return"):
        assert counts[s] >= 3, s  # once per worker called
    ms = per_call_ms(before, after, 3)
    inside = sum(ms[s] for s in ("decode", "validate", "gate", "transport_prepare", "dispatch_plan", "workers", "combine", "reply"))
    assert inside <= ms["router_total"] + 1e-6  # the stages are parts of the router's total

    registry = CollectorRegistry()
    registry.register(RouterCollector(served.core, "r0"))
    text = generate_latest(registry).decode()
    for s in one_per_call:
        assert f'moefleet_stage_seconds_bucket{{le="+Inf",router="r0",stage="{s}"}}' in text
        assert f'moefleet_stage_seconds_count{{router="r0",stage="{s}"}}' in text


def test_large_calls_do_their_tensor_work_off_the_event_loop(served, monkeypatch):
    core = served.core
    spec = served.model.spec
    layer = spec.moe_layers[0]
    seen = []
    for name in ("_start", "_dispatch", "_combine"):
        fn = getattr(core, name)

        def spy(*args, _fn=fn, _name=name):
            seen.append((_name, threading.current_thread().name))
            return _fn(*args)

        monkeypatch.setattr(core, name, spy)
    hidden = torch.randn(8, spec.layer.hidden_size)
    with FleetClient(served.address) as c:
        c.forward(layer, hidden)
        small = list(seen)
        seen.clear()
        monkeypatch.setattr(core, "OFFLOAD_BYTES", hidden.numel() * 4)  # this call counts as large
        got = c.forward(layer, hidden)
    assert [n for n, _ in small] == ["_start", "_dispatch", "_combine"]
    assert all(t == served.thread.name for _, t in small)  # inline, on the event loop
    assert [n for n, _ in seen] == ["_start", "_dispatch", "_combine"]
    assert all(t.startswith("moefleet-router-compute") for _, t in seen)
    assert (got - served.model.layer(layer)(hidden)).abs().max().item() <= 1e-5


def test_a_request_on_an_idle_layer_does_not_wait_for_the_batch_window(tmp_path):
    model, _ = hf_models.build("mixtral")
    model.save_pretrained(tmp_path)
    s = _Served(tmp_path, batch_window_ms=60_000)
    try:
        with FleetClient(s.address, timeout=30) as c:  # a window of a minute would time the call out
            c.forward(s.model.moe_layers[0], torch.randn(4, s.model.spec.layer.hidden_size))
        assert s.core.stats.batches == 1
        assert "queue" not in s.core.stages.totals()
    finally:
        s.close()


def test_stage_histograms_count_into_prometheus_buckets():
    h = StageHistograms()
    for x in (0.00001, 0.0004, 0.0004, 3.0, 99.0):
        h.observe("gate", x)
    cum = dict(h.cumulative("gate"))
    assert cum["1e-05"] == 1 and cum["0.0005"] == 3 and cum["5.0"] == 4 and cum["+Inf"] == 5
    assert h.totals()["gate"] == (pytest.approx(102.00081), 5)
    with pytest.raises(ValueError, match="stage"):
        h.observe("nonsense", 1.0)
    assert set(ROUTER_STAGES) < set(STAGES)


def test_forward_stream_carries_calls_of_many_threads_and_layers(served):
    spec = served.model.spec
    g = torch.Generator().manual_seed(3)
    calls = [(layer, torch.randn(n, spec.layer_spec(layer).hidden_size, generator=g))
             for n in (1, 5, 17) for layer in spec.moe_layers for _ in range(3)]
    with FleetClient(served.address) as c:
        stream = c.stream()
        assert c.stream() is stream  # one per client
        with ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(lambda lh: stream.forward(*lh), calls))
        futures = [stream.submit(layer, h, return_routing=True) for layer, h in calls]  # all in flight at once
        routed = [f.result(timeout=60) for f in futures]
    for (layer, h), out, (out2, ids, _) in zip(calls, outs, routed):
        want, routing = served.model.layer(layer)(h, return_routing=True)
        assert (out - want).abs().max().item() <= 1e-5  # (batched with other calls: the same up to rounding)
        assert (out2 - want).abs().max().item() <= 1e-5 and torch.equal(ids, routing.topk_ids)


def test_a_failed_call_on_the_stream_fails_alone(served):
    spec = served.model.spec
    layer = spec.moe_layers[0]
    h = torch.randn(3, spec.layer.hidden_size)
    with ForwardStream(served.address) as stream:
        bad = stream.submit(layer, torch.randn(3, spec.layer.hidden_size + 1))
        good = stream.submit(layer, h)
        with pytest.raises(FleetError) as e:
            bad.result(timeout=60)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "hidden size" in e.value.message
        assert (good.result(timeout=60) - served.model.layer(layer)(h)).abs().max().item() <= 1e-5


def test_calls_on_a_stream_that_cannot_open_fail_with_unavailable():
    with ForwardStream("127.0.0.1:1") as stream:  # nothing listens there
        with pytest.raises(FleetError) as e:
            stream.submit(0, torch.randn(2, 4)).result(timeout=60)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_attached_model_run_by_several_threads_equals_the_local_model(served):
    local = served.hf_model
    remote = copy.deepcopy(local)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, local.config.vocab_size, (1, n), generator=g) for n in (4, 9, 6, 12)]
    with FleetClient(served.address) as c:
        layers = attach(remote, c)
        blocks = [m for m in remote.modules() if isinstance(m, RemoteMoEBlock)]
        assert len(blocks) == len(layers) and all(b.stream is c.stream() for b in blocks)
        with torch.no_grad(), ThreadPoolExecutor(len(seqs)) as pool:
            got = list(pool.map(lambda ids: remote(ids).logits, seqs))
    with torch.no_grad():
        for ids, logits in zip(seqs, got):
            assert (logits - local(ids).logits).abs().max().item() <= 1e-4
