"""The hot path on a real local Ray: compiled graphs, the embedded router, rows-only across nodes, graphs of dead routers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid

import grpc
import pytest
import ray
import torch

from moefleet import FleetClient, FleetConfig, LocalFleet, MoEModel
from moefleet.core.config import RouterConfig
from moefleet.core.placement import Placement
from moefleet.router_service.client import FleetError
from moefleet.router_service.embedded import EmbeddedRouter
from tests import hf_models

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def wait_for(pred, timeout: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return bool(pred())


@pytest.fixture(scope="module")
def hf_model():
    model, _ = hf_models.build("mixtral", num_local_experts=8, num_experts_per_tok=2)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, hf_model):
    path = tmp_path_factory.mktemp("hot-mixtral")
    hf_model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hot_fleet(ray_cluster, redis_server, checkpoint):
    cfg = FleetConfig(checkpoint=checkpoint, num_workers=2, redis_url=redis_server.url, namespace=f"hot-{uuid.uuid4().hex[:8]}",
                      static=True, http_port=None, router=RouterConfig(compiled_graphs="on"))  # CPU workers: "auto" builds none
    f = LocalFleet(cfg, worker_node_id=ray.get_runtime_context().get_node_id())  # beside this process: shared memory
    f.start()
    f.client = FleetClient(f.address)
    f.client.wait_ready(60)
    f.embedded = EmbeddedRouter(checkpoint, redis_server.url, cfg.namespace, compiled_graphs="on")
    f.embedded.wait_ready(30)
    yield f
    f.embedded.close()
    f.client.close()
    f.stop()


def _graph_ready(report) -> bool:
    g = report.get("graph")
    return bool(g and g["alive"])


def test_both_routers_carry_calls_on_graphs_of_their_own_over_the_same_workers_exactly(hot_fleet):
    model = MoEModel.from_pretrained(hot_fleet.checkpoint)
    h = model.spec.layer.hidden_size
    emb = hot_fleet.embedded
    assert wait_for(lambda: _graph_ready(emb.core.transport_report()), 30)
    assert wait_for(lambda: _graph_ready(hot_fleet.router_stats()[0]["transport"]), 30)
    g = torch.Generator().manual_seed(0)
    for t in (1, 7, 300):
        x = torch.randn(t, h, generator=g)
        want, routing = model.layer(0)(x, return_routing=True)
        got, ids, weights = emb.forward(0, x, return_routing=True)
        assert (got - want).abs().max().item() <= 1e-5 and torch.equal(ids, routing.topk_ids)
        assert (hot_fleet.client.forward(0, x) - want).abs().max().item() <= 1e-5
    emb_calls = emb.core.transport_report()["calls"]
    grpc_calls = hot_fleet.router_stats()[0]["transport"]["calls"]
    assert emb_calls["graph_calls"] >= 3 and grpc_calls["graph_calls"] >= 3
    for w in ("worker-0", "worker-1"):
        graphs = ray.get(hot_fleet.worker(w).graphs.remote())
        assert len(graphs) == 2  # one per router: Ray's _ray_system group sized for several
    moved = emb.core.transport_report()["bytes"]
    assert moved.get("to_workers:shared_memory", 0) > 0 or moved.get("to_workers:rows", 0) > 0


def test_by_default_a_router_compiles_no_graph_over_cpu_workers_and_serves_them_through_plain_calls(hot_fleet):
    """``compiled_graphs: auto``: a graph's reader would keep a core of each CPU worker busy polling its channel."""
    model = MoEModel.from_pretrained(hot_fleet.checkpoint)
    x = torch.randn(6, model.spec.layer.hidden_size, generator=torch.Generator().manual_seed(11))
    r = EmbeddedRouter(hot_fleet.checkpoint, hot_fleet.redis_url, hot_fleet.config.namespace)
    try:
        r.wait_ready(30)
        assert r.core.transport.graph_policy == "auto"
        assert wait_for(lambda: set(r.core.transport.modes().values()) == {"shared_memory"} and len(r.core.transport.modes()) == 2, 30)
        assert (r.forward(0, x) - model.layer(0)(x)).abs().max().item() <= 1e-5
        report = r.core.transport_report()
        assert report["graph"] is None and report["kind"] == "actor_calls"
        assert report["calls"]["plain_calls"] >= 1 and report["calls"]["graph_calls"] == 0
        for w in ("worker-0", "worker-1"):  # no graph slot of the workers is this router's
            assert f"router:{r.router_id}" not in ray.get(hot_fleet.worker(w).graphs.remote()).values()
    finally:
        r.close()


def test_the_embedded_router_answers_bad_input_with_the_grpc_routers_codes(hot_fleet):
    model = MoEModel.from_pretrained(hot_fleet.checkpoint)
    h = model.spec.layer.hidden_size
    bad = [
        ((99, torch.randn(2, h)), grpc.StatusCode.NOT_FOUND),
        ((0, torch.randn(2, h + 1)), grpc.StatusCode.INVALID_ARGUMENT),
        ((0, torch.randn(0, h)), grpc.StatusCode.INVALID_ARGUMENT),
        ((0, torch.full((2, h), float("nan"))), grpc.StatusCode.INVALID_ARGUMENT),
        ((0, torch.randn(70_000, 1)), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for args, code in bad:
        with pytest.raises(FleetError) as e_emb:
            hot_fleet.embedded.forward(*args)
        with pytest.raises(FleetError) as e_grpc:
            hot_fleet.client.forward(*args)
        assert e_emb.value.code == code == e_grpc.value.code, (args[1].shape, e_emb.value, e_grpc.value)
    with pytest.raises(FleetError) as e:
        hot_fleet.embedded.forward(0, torch.randn(2, h), router_logits=torch.randn(2, 3))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "router_logits.shape" in e.value.message
    codes = hot_fleet.embedded.core.stats.codes
    assert codes.get("NOT_FOUND", 0) >= 1 and codes.get("INVALID_ARGUMENT", 0) >= 5
    p = hot_fleet.embedded.placement()
    assert p.version == hot_fleet.client.placement().version and len(p.experts) == 8 * len(model.moe_layers)


def test_the_embedded_router_shows_as_a_router_and_follows_a_new_placement(hot_fleet):
    emb, store = hot_fleet.embedded, hot_fleet.store
    key = f"router:{emb.router_id}"
    assert wait_for(lambda: store.workers().get(key, {}).get("transport", {}).get("kind") == "compiled_graph", 30)
    info = store.workers()[key]
    assert info["kind"] == "embedded"
    model = MoEModel.from_pretrained(hot_fleet.checkpoint)
    x = torch.randn(16, model.spec.layer.hidden_size, generator=torch.Generator().manual_seed(3))
    want = model.layer(0)(x)
    # swap two experts between the workers as a leader does: under the lease, load first, publish, then serve
    token = store.try_acquire_lease("test-leader", 30.0)
    assert token
    old = store.get_placement()
    a, b = old.assignments["worker-0"][0], old.assignments["worker-1"][0]
    ray.get([hot_fleet.worker("worker-0").load.remote([b], token), hot_fleet.worker("worker-1").load.remote([a], token)])
    new = Placement(version=old.version + 1, generation=old.generation, assignments={
        "worker-0": [k for k in old.assignments["worker-0"] if k != a] + [b],
        "worker-1": [k for k in old.assignments["worker-1"] if k != b] + [a],
    }, speeds=old.speeds)
    t0 = time.monotonic()
    store.publish_placement(new, expected_version=old.version, fence=("test-leader", token))
    store.release_lease("test-leader")
    assert wait_for(lambda: emb.core.placement.version == new.version, 5)
    follow_s = time.monotonic() - t0
    assert follow_s < 5
    assert (emb.forward(0, x) - want).abs().max().item() <= 1e-5
    assert wait_for(lambda: store.workers()[key]["placement_version"] == new.version, 5)  # reported for drains


def test_a_worker_on_another_node_receives_only_the_rows_it_computes(ray_cluster, redis_server, checkpoint):
    """The embedded router runs on the head node; its two workers run on node_a and node_b."""
    from moefleet.core.config import WorkerConfig
    from moefleet.core.state import StateStore
    from moefleet.expert_workers.launch import start_worker

    ns = f"rows-{uuid.uuid4().hex[:8]}"
    store = StateStore(redis_server.url, namespace=ns)
    layers = MoEModel.from_pretrained(checkpoint).moe_layers
    held = {"worker-0": [(la, e) for la in layers for e in range(4)], "worker-1": [(la, e) for la in layers for e in range(4, 8)]}
    nodes = {"worker-0": "node_a", "worker-1": "node_b"}
    workers = {w: start_worker(w, checkpoint, keys, ns, WorkerConfig(num_cpus=1), redis_url=redis_server.url,
                               resources={nodes[w]: 1}, detached=False) for w, keys in held.items()}
    emb = None
    try:
        ray.get([w.ready.remote() for w in workers.values()], timeout=120)
        store.publish_placement(Placement(version=1, assignments=held), expected_version=0)
        emb = EmbeddedRouter(checkpoint, redis_server.url, ns)
        emb.wait_ready(30)
        here = ray.get_runtime_context().get_node_id()
        assert all(ray.get(w.node_id.remote()) != here for w in workers.values())
        assert wait_for(lambda: set(emb.core.transport.modes().values()) == {"rows"} and len(emb.core.transport.modes()) == 2, 30)
        model = MoEModel.from_pretrained(checkpoint)
        x = torch.randn(64, model.spec.layer.hidden_size, generator=torch.Generator().manual_seed(5))
        before = dict(emb.core.transport_bytes)
        out, ids, _ = emb.forward(0, x, return_routing=True)
        assert (out - model.layer(0)(x)).abs().max().item() <= 1e-5
        sent = emb.core.transport_bytes[("to_workers", "rows")] - before.get(("to_workers", "rows"), 0)
        rows = int((ids >= 0).sum())  # every (token, expert) assignment: the rows the workers compute
        per_worker_tokens = sum(len({t for t in range(64) if any(int(e) in range(4 * i, 4 * i + 4) for e in ids[t])}) for i in range(2))
        assert sent == per_worker_tokens * model.spec.layer.hidden_size * 4
        assert sent <= 1.05 * rows * model.spec.layer.hidden_size * 4
        assert emb.core.transport_bytes.get(("to_workers", "shared_memory"), 0) == 0
    finally:
        if emb is not None:
            emb.close()
        for w in workers.values():
            ray.kill(w)
        store.close()


def test_a_transformers_model_attached_to_the_embedded_router_generates_what_it_generates_alone(hot_fleet, hf_model):
    import copy

    from moefleet import attach

    prompt = torch.tensor([[5, 17, 42, 7, 3, 11]])
    want = hf_model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    served = copy.deepcopy(hf_model)
    assert attach(served, hot_fleet.embedded)
    got = served.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(got, want)


def test_connect_finds_the_local_fleet_for_grpc_and_embedded(hot_fleet, monkeypatch, tmp_path):
    """``moefleet.connect()`` reads the state file ``moe-fleet up`` writes (here: one naming this test's fleet)."""
    import json
    import os

    import moefleet

    monkeypatch.setenv("MOEFLEET_CACHE", str(tmp_path))
    with pytest.raises(ConnectionError, match="no local fleet is running"):
        moefleet.connect()
    state = {"pid": os.getpid(), "address": hot_fleet.address, "redis_url": hot_fleet.redis_url,
             "namespace": hot_fleet.config.namespace, "checkpoint": hot_fleet.checkpoint,
             "ray_address": ray.get_runtime_context().gcs_address, "dtype": None, "auth_token_file": None}
    (tmp_path / "local-fleet.json").write_text(json.dumps(state))
    model = MoEModel.from_pretrained(hot_fleet.checkpoint)
    x = torch.randn(5, model.spec.layer.hidden_size)
    want = model.layer(0)(x)
    with moefleet.connect() as client:
        assert (client.forward(0, x) - want).abs().max().item() <= 1e-5
    router = moefleet.connect(embedded=True)
    try:
        router.wait_ready(30)
        assert (router.forward(0, x) - want).abs().max().item() <= 1e-5
        assert router.placement().version >= 1
    finally:
        router.close()
    assert f"router:{router.router_id}" not in hot_fleet.store.workers()  # closed: deregistered
    with pytest.raises(ConnectionError, match="pass redis_url"):
        moefleet.connect("10.9.9.9:1", embedded=True)


ORPHAN = textwrap.dedent("""
    import os, sys, time
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray, torch
    ray.init(address=sys.argv[1], log_to_driver=False)
    from moefleet.router_service.embedded import EmbeddedRouter
    r = EmbeddedRouter(sys.argv[2], sys.argv[3], sys.argv[4], router_id=sys.argv[5], compiled_graphs="on")
    r.wait_ready(30)
    deadline = time.monotonic() + 60
    while r.core.transport.graphs.current is None and time.monotonic() < deadline:
        time.sleep(0.05)
    r.forward(0, torch.randn(2, r.spec.layer.hidden_size))
    print("graph", r.core.transport.graphs.current.graph_id, flush=True)
    os._exit(0)  # dies without tearing its graph down
""")


def test_a_graph_whose_router_died_is_closed_by_its_workers(ray_cluster, hot_fleet):
    rid = f"doomed-{uuid.uuid4().hex[:6]}"
    out = subprocess.run(
        [sys.executable, "-c", ORPHAN, ray_cluster.address, hot_fleet.checkpoint, hot_fleet.redis_url,
         hot_fleet.config.namespace, rid],
        capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    graph_id = out.stdout.split("graph", 1)[1].split()[0]
    worker = hot_fleet.worker("worker-0")
    assert graph_id in ray.get(worker.graphs.remote())  # the loop is still there, polling for a writer that is gone
    # its router's heartbeat expires (3 s), then the worker closes the graph (GRAPH_ORPHAN_S later)
    assert wait_for(lambda: graph_id not in ray.get(worker.graphs.remote()), 30, every=0.5)
    model = MoEModel.from_pretrained(hot_fleet.checkpoint)
    x = torch.randn(4, model.spec.layer.hidden_size)
    assert (hot_fleet.client.forward(0, x) - model.layer(0)(x)).abs().max().item() <= 1e-5  # the others serve on


def test_a_worker_killed_under_a_graph_fails_only_what_it_held_and_nothing_hangs(ray_cluster, redis_server, checkpoint):
    cfg = FleetConfig(checkpoint=checkpoint, num_workers=2, redis_url=redis_server.url, namespace=f"kill-{uuid.uuid4().hex[:8]}",
                      static=True, http_port=None)
    f = LocalFleet(cfg, worker_node_id=ray.get_runtime_context().get_node_id())
    f.start()
    emb = EmbeddedRouter(checkpoint, redis_server.url, cfg.namespace, compiled_graphs="on")
    try:
        emb.wait_ready(30)
        assert wait_for(lambda: _graph_ready(emb.core.transport_report()), 30)
        model = MoEModel.from_pretrained(checkpoint)
        h, e = model.spec.layer.hidden_size, model.spec.layer.num_experts
        held = {w: {k[1] for k in keys} for w, keys in f.store.get_placement().assignments.items()}

        def logits_for(experts):  # every token routed to these experts
            lg = torch.full((3, e), -10.0)
            lg[:, list(experts)] = 10.0
            return lg

        x = torch.randn(3, h)
        alive, doomed = sorted(held["worker-0"])[:2], sorted(held["worker-1"])[:2]
        emb.forward(0, x, router_logits=logits_for(alive))
        ray.kill(f.worker("worker-1"))
        t0 = time.monotonic()
        with pytest.raises(FleetError) as err:
            emb.forward(0, x, router_logits=logits_for(doomed), timeout=30)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 20
        got = emb.forward(0, x, router_logits=logits_for(alive), timeout=30)  # served through plain calls meanwhile
        want = model.layer(0)(x, router_logits=logits_for(alive))
        assert (got - want).abs().max().item() <= 1e-5
        assert emb.core.transport_report()["calls"]["graph_fallbacks"] >= 1
    finally:
        emb.close()
        f.stop()
