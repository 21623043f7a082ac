"""The per-layer hot path without Ray: the cost model, the workers' messages, the blocking (embedded) serving path,
and the compiled-graph bookkeeping."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from moefleet import MoEModel
from moefleet.core.config import RouterConfig
from moefleet.core.cost_model import CallBytes, LinkSpeeds, RouterSpeeds, WorkerPart, call_bytes, call_seconds, weight_load_seconds
from moefleet.core.placement import Placement
from moefleet.expert_workers.group import ExpertGroupCore
from moefleet.router_service.dispatch import plan_dispatch
from moefleet.router_service.graph import GraphSet
from moefleet.router_service.router import RouterCore
from moefleet.router_service.gpu_transport import Endpoint
from moefleet.router_service.transport import LocalTransport, graph_members, graph_policy, prepare_calls
from tests import hf_models

H = 16


def test_shared_memory_batch_is_written_once_rows_go_per_worker_and_ipc_moves_nothing():
    parts = [
        WorkerPart("a", rows=10, unique_tokens=6, transport="shared_memory"),
        WorkerPart("b", rows=8, unique_tokens=5, transport="shared_memory"),
        WorkerPart("c", rows=4, unique_tokens=3, transport="rows"),
        WorkerPart("d", rows=4, unique_tokens=4, transport="cuda_ipc"),
        WorkerPart("e", rows=0, unique_tokens=0, transport="rows"),
    ]
    b = call_bytes(tokens=9, hidden=H, act_bytes=2, partial_bytes=2, parts=parts)
    assert b.to_workers == {"shared_memory": 9 * H * 2, "rows": 3 * H * 2, "cuda_ipc": 0}
    assert b.from_workers == {"shared_memory": (6 + 5) * H * 2, "rows": 3 * H * 2, "cuda_ipc": 0}
    assert b.per_worker["a"] == (0, 6 * H * 2) and b.per_worker["c"] == (3 * H * 2, 3 * H * 2)
    assert "e" not in b.per_worker  # a worker with nothing to do moves nothing
    assert b.total_to == 9 * H * 2 + 3 * H * 2


def test_rows_bytes_never_exceed_the_rows_a_worker_computes():
    """Across nodes only unique tokens travel: at most rows x H x dtype, fewer when a token has several experts there."""
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(50)])
    batches = plan_dispatch(ids, np.ones(ids.shape, np.float32), {e: [f"w{e % 2}"] for e in range(8)})
    parts = [WorkerPart(b.worker, b.num_rows, len(b.unique_tokens), "rows") for b in batches]
    moved = call_bytes(50, H, 4, 4, parts)
    for b in batches:
        assert moved.per_worker[b.worker][0] <= b.num_rows * H * 4
    assert moved.total_to < sum(b.num_rows for b in batches) * H * 4  # some tokens had both experts on one worker


def test_a_call_takes_its_slowest_worker_plus_the_routers_own_work():
    parts = [WorkerPart("a", 10, 10, "rows"), WorkerPart("b", 10, 10, "rows")]
    links = LinkSpeeds(rows=1e6, latency_s=0.001)
    router = RouterSpeeds(per_call_s=0.002, flops_per_s=1e9, combine_bytes_per_s=1e9)
    s = call_seconds(10, H, 8, 4, 4, parts, {"a": 0.010, "b": 0.030}, links, router)
    per_worker_bytes = 10 * H * 4
    assert s["workers"] == pytest.approx(0.001 + per_worker_bytes / 1e6 + 0.030 + per_worker_bytes / 1e6)
    assert s["gate"] == pytest.approx(2 * 10 * H * 8 / 1e9)
    assert s["total"] == pytest.approx(s["router"] + s["gate"] + s["workers"] + s["combine"])
    with pytest.raises(ValueError, match="transport"):
        WorkerPart("x", 1, 1, "carrier pigeon")
    with pytest.raises(ValueError, match="unique_tokens"):
        WorkerPart("x", 1, 2, "rows")
    assert weight_load_seconds(2_000, "peer", peer_bytes_per_s=1_000) == 2.0
    with pytest.raises(ValueError, match="source"):
        weight_load_seconds(1, "tape")


def test_a_rows_worker_gets_only_its_unique_tokens_and_a_shared_one_reads_the_batch_at_its_rows():
    hidden = torch.randn(7, H)
    ids = np.array([[0, 1], [1, 2], [0, 2], [3, 1], [2, 3], [0, 3], [1, 0]])
    batches = plan_dispatch(ids, np.full(ids.shape, 0.5, np.float32), {0: ["near"], 1: ["near"], 2: ["far"], 3: ["far"]})
    prep = prepare_calls(0, hidden, batches, {"near": "shared_memory", "far": "rows"}, deadline=None)
    near, far = prep.calls["near"], prep.calls["far"]
    assert near.x is None and near.transport == "shared_memory" and prep.host is not None and prep.host.shape == (7, H)
    assert np.array_equal(hidden.numpy()[near.token_index[near.inverse]], hidden.numpy()[near.rows])
    fb = next(b for b in batches if b.worker == "far")
    assert far.x.shape == (len(fb.unique_tokens), H)  # only its tokens
    assert np.array_equal(far.x, hidden.numpy()[fb.unique_tokens]) and far.token_index is None
    assert np.array_equal(far.rows, far.inverse)  # rows index x, which holds the unique tokens in order
    assert isinstance(prep.bytes, CallBytes) and prep.bytes.to_workers["rows"] == len(fb.unique_tokens) * H * 4


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral-hot")
    model, _ = hf_models.build("mixtral", num_local_experts=8, num_experts_per_tok=2)
    model.save_pretrained(path)
    return str(path)


def _local_core(path, single: bool = False, **router):
    held = {"w0": list(range(8))} if single else {"w0": [0, 1, 2, 3], "w1": [4, 5, 6, 7]}
    workers = {w: ExpertGroupCore(w, path, [(0, e) for e in es]) for w, es in held.items()}
    core = RouterCore(path, RouterConfig(**router), LocalTransport(workers))
    core.set_placement(Placement(version=1, assignments={w: [(0, e) for e in es] for w, es in held.items()}))
    return core


def test_blocking_path_is_exact_from_many_threads_at_once(mixtral):
    """The embedded router's path: calls from eight threads at once, each exact, the books balanced after."""
    core = _local_core(mixtral)
    model = MoEModel.from_pretrained(mixtral)
    h = model.spec.layer.hidden_size
    inputs = [torch.randn(5 + i, h, generator=torch.Generator().manual_seed(i)) for i in range(32)]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda x: core.forward_blocking(0, x).output, inputs))
    for x, out in zip(inputs, outs):
        assert (out - model.layer(0)(x)).abs().max().item() <= 1e-5
    assert all(v == 0 for v in core.outstanding.values())
    assert core.oldest_inflight_version() == 1 and core.stats.batches == 32
    assert sum(core.take_load_counts().values()) == sum(2 * x.shape[0] for x in inputs)
    assert core.stages.totals()["call_overhead"][1] == 32


@pytest.mark.parametrize("single", [False, True], ids=["two-workers", "one-worker-serves-all"])
def test_the_combined_output_is_a_tensor_of_its_own(mixtral, single):
    """A transport's reply is a view of its buffer (a compiled graph reuses it): the output never aliases it."""
    core = _local_core(mixtral, single=single)
    h = core.spec.layer.hidden_size
    x = torch.randn(3, h)
    call = core._start(0, x, None, None)
    batches, prepared = core._dispatch(call)
    outcomes = core.transport.run_blocking(prepared, batches)
    assert core._absorb(call, batches, prepared, outcomes)
    partials = [np.asarray(r.partial) for _, r in call.partials]
    out = core._combine(call, None)
    for p in partials:
        assert not np.shares_memory(out.numpy(), p)


class _FakeGraph:
    def __init__(self, workers):
        self.workers = list(workers)
        self.index = {w: i for i, w in enumerate(self.workers)}
        self.alive = True
        self.torn_down = threading.Event()

    def drained(self):
        return True

    def teardown(self):
        self.torn_down.set()


def _wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_graph_covers_gpu_workers_of_the_routers_node_by_default_every_local_worker_when_on_and_none_when_off():
    router = Endpoint("n1", "GPU-a", ("GPU-a", "GPU-b"))
    workers = {
        "gpu-same": Endpoint("n1", "GPU-b", ("GPU-a", "GPU-b")),  # cuda_ipc
        "gpu-isolated": Endpoint("n1", "GPU-c", ("GPU-c",)),  # same node, shared memory, computes on a GPU
        "cpu-same": Endpoint("n1"),  # shared memory, computes on the CPU
        "gpu-remote": Endpoint("n2", "GPU-d", ("GPU-d",)),  # rows: never in a graph
        "unknown": None,
    }
    assert graph_members("auto", router, workers) == ("gpu-isolated", "gpu-same")
    assert graph_members("on", router, workers) == ("cpu-same", "gpu-isolated", "gpu-same")
    assert graph_members("off", router, workers) == ()
    cpu_router = Endpoint("n1")
    assert graph_members("auto", cpu_router, {"cpu": Endpoint("n1"), "gpu": Endpoint("n1", "GPU-b", ("GPU-b",))}) == ("gpu",)
    assert graph_members(True, cpu_router, {"cpu": Endpoint("n1")}) == ("cpu",)
    assert graph_members(False, cpu_router, {"cpu": Endpoint("n1")}) == ()


def test_compiled_graphs_policy_is_checked_by_name():
    assert [graph_policy(v) for v in (True, False, "auto", "on", "off")] == ["on", "off", "auto", "on", "off"]
    with pytest.raises(ValueError, match="compiled_graphs"):
        graph_policy("always")
    assert RouterConfig().compiled_graphs == "auto"
    with pytest.raises(ValueError, match="compiled_graphs"):
        RouterConfig(compiled_graphs="yes")


def test_graph_set_builds_off_the_hot_path_swaps_when_ready_and_tears_the_old_one_down():
    gate = threading.Event()
    built = []

    def build(workers):
        gate.wait(5)
        g = _FakeGraph(workers)
        built.append(g)
        return g

    gs = GraphSet(build)
    gs.want(("w1", "w0"))
    assert gs.graph_for(["w0"]) is None  # still compiling: plain calls meanwhile
    gate.set()
    assert _wait(lambda: gs.graph_for(["w0", "w1"]) is not None)
    first = gs.current
    assert first.workers == ["w0", "w1"] and gs.graph_for(["w2"]) is None  # a worker outside the graph: plain calls
    gs.want(("w0", "w1"))
    assert gs.current is first and len(built) == 1  # the same workers: nothing rebuilt
    gs.want(("w0", "w1", "w2"))
    assert _wait(lambda: gs.current is not first and gs.current is not None)
    assert gs.current.workers == ["w0", "w1", "w2"]
    assert _wait(first.torn_down.is_set)  # drained, then torn down
    second = gs.current
    second.alive = False  # a worker died under it
    assert gs.graph_for(["w0"]) is None
    assert _wait(lambda: gs.current is not None and gs.current is not second)  # a new one over the same workers
    assert _wait(second.torn_down.is_set)
    for g in gs.close():
        g.teardown()


def test_graph_set_without_a_graph_for_its_workers_serves_plain_calls():
    gs = GraphSet(lambda workers: None)  # e.g. a worker had no free graph slot
    gs.want(("w0",))
    time.sleep(0.1)
    assert gs.graph_for(["w0"]) is None and gs.builds == 0

    def failing(workers):
        raise RuntimeError("cannot compile")

    bad = GraphSet(failing)
    bad.want(("w0",))
    assert _wait(lambda: bad.build_failures == 1)
    assert bad.graph_for(["w0"]) is None and "cannot compile" in bad.last_error
    off = GraphSet(lambda w: _FakeGraph(w), enabled=False)
    off.want(("w0",))
    time.sleep(0.05)
    assert off.graph_for(["w0"]) is None


class _Stuck:
    """An in-process worker that stops answering until released (a SIGSTOPped process, as seen from the router)."""

    def __init__(self, inner):
        self.inner = inner
        self.release = threading.Event()
        self.calls = 0

    def serve(self, call, host=None, ipc=None):
        self.calls += 1
        self.release.wait(30)
        return self.inner.serve(call, host, ipc)


def test_a_stalled_worker_is_hedged_quarantined_and_taken_back_when_it_answers(mixtral):
    """Every expert has a replica on both workers; one worker stalls. Calls finish within the budget on the other,
    exact (the stalled worker's late answer is discarded, not summed twice); the worker is quarantined, and back in
    service once it answers."""
    import asyncio

    keys = [(0, e) for e in range(8)]
    fast = ExpertGroupCore("w0", mixtral, keys)
    stuck = _Stuck(ExpertGroupCore("w1", mixtral, keys))
    core = RouterCore(mixtral, RouterConfig(), LocalTransport({"w0": fast, "w1": stuck}))
    core.set_placement(Placement(version=1, assignments={"w0": keys, "w1": keys}))
    core.health.min_budget_s = 0.2
    for w in ("w0", "w1"):
        core.health.observe(w, 100, 0.001)  # both known to be quick
    model = MoEModel.from_pretrained(mixtral)
    x = torch.randn(64, model.spec.layer.hidden_size, generator=torch.Generator().manual_seed(0))
    want = model.layer(0)(x)

    async def scenario():
        t0 = time.monotonic()
        out = (await core.forward(0, x)).output
        first = time.monotonic() - t0
        assert core.health.is_quarantined("w1")
        second = (await core.forward(0, x)).output  # quarantined: every row goes to w0, no budget to wait out
        stuck.release.set()
        await asyncio.sleep(0.5)
        return out, first, second

    out, first, second = asyncio.run(scenario())
    assert (out - want).abs().max().item() <= 1e-5 and (second - want).abs().max().item() <= 1e-5
    assert first < 2.0  # the budget (0.2 s here), not the stall (30 s)
    assert stuck.calls == 1 and core.health.stalls == 1
    assert not core.health.is_quarantined("w1")  # it answered: back in service
    assert all(v == 0 for v in core.outstanding.values())


def test_rows_only_a_stalled_worker_holds_wait_for_it_and_are_not_lost(mixtral):
    import asyncio

    keys0, keys1 = [(0, e) for e in range(4)], [(0, e) for e in range(4, 8)]
    stuck = _Stuck(ExpertGroupCore("w1", mixtral, keys1))
    core = RouterCore(mixtral, RouterConfig(), LocalTransport({"w0": ExpertGroupCore("w0", mixtral, keys0), "w1": stuck}))
    core.set_placement(Placement(version=1, assignments={"w0": keys0, "w1": keys1}))
    core.health.min_budget_s = 0.1
    core.health.observe("w1", 100, 0.001)
    model = MoEModel.from_pretrained(mixtral)
    x = torch.randn(16, model.spec.layer.hidden_size, generator=torch.Generator().manual_seed(1))

    async def scenario():
        task = asyncio.ensure_future(core.forward(0, x))
        await asyncio.sleep(0.6)
        assert not task.done() and core.health.is_quarantined("w1")  # waiting: no other replica holds its experts
        stuck.release.set()
        return (await asyncio.wait_for(task, 10)).output

    out = asyncio.run(scenario())
    assert (out - model.layer(0)(x)).abs().max().item() <= 1e-5


def test_a_routers_metrics_export_its_bytes_and_call_overhead(mixtral):
    from prometheus_client import CollectorRegistry, generate_latest

    from moefleet.router_service.metrics import RouterCollector

    core = _local_core(mixtral)
    for _ in range(3):
        core.forward_blocking(0, torch.randn(4, core.spec.layer.hidden_size))
    core.transport_bytes[("to_workers", "rows")] += 1234  # as a call to another node would count
    reg = CollectorRegistry()
    reg.register(RouterCollector(core, "r0"))
    text = generate_latest(reg).decode()
    assert 'moefleet_transport_bytes_total{direction="to_workers",router="r0",transport="rows"} 1234.0' in text
    assert 'moefleet_transport_bytes_total{direction="from_workers",router="r0",transport="local"} 0.0' in text
    assert 'moefleet_call_overhead_seconds_count{router="r0"} 3.0' in text
    report = core.transport_report()
    assert report["kind"] == "local" and report["bytes"]["to_workers:rows"] == 1234
