"""The serving path's fault handling without Ray: a batch that meets a dead worker fails only the requests
that cannot be served, and in-flight calls are counted by (generation, version) for drains."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from moefleet import MoEModel
from moefleet.controller.reconciler import routers_drained
from moefleet.core.config import RouterConfig
from moefleet.core.placement import Placement, spread_placement
from moefleet.expert_workers.group import ExpertGroupCore
from moefleet.router_service.router import RequestError, RouterCore
from moefleet.router_service.transport import LocalTransport
from tests import hf_models


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral-router-faults")
    model, _ = hf_models.build("mixtral", num_local_experts=8, num_experts_per_tok=2)
    model.save_pretrained(path)
    return str(path)


def _tokens(model, layer, wants_expert: bool, n: int, seed: int) -> torch.Tensor:
    """``n`` tokens whose top-k does (or does not) include expert 0 of ``layer``."""
    g = torch.Generator().manual_seed(seed)
    h = model.spec.layer.hidden_size
    out = []
    while len(out) < n:
        x = torch.randn(256, h, generator=g)
        _, routing = model.layer(layer)(x, return_routing=True)
        has = (routing.topk_ids == 0).any(dim=-1)
        out.extend(x[has if wants_expert else ~has])
    return torch.stack(out[:n])


def test_a_batch_with_a_request_that_needs_a_dead_workers_expert_fails_only_that_request(checkpoint):
    """Expert 0 lives only on a worker that is gone; the other experts on live workers. Two requests batched
    together: the one that needs expert 0 fails UNAVAILABLE naming the worker, the other is answered exactly."""
    model = MoEModel.from_pretrained(checkpoint, backend="torch")
    layer = model.moe_layers[0]
    spread = spread_placement(list(model.moe_layers), 8, ["w0", "w1"])
    assignments = {d: [k for k in keys if k != (layer, 0)] for d, keys in spread.assignments.items()}
    placement = Placement(version=3, assignments={**assignments, "gone": [(layer, 0)]})
    workers = {d: ExpertGroupCore(d, checkpoint, keys, backend="torch") for d, keys in assignments.items()}
    core = RouterCore(checkpoint, RouterConfig(batch_window_ms=50, dispatch_when_idle=False), LocalTransport(workers))
    core.set_placement(placement)
    healthy, needs_gone = _tokens(model, layer, False, 6, 1), _tokens(model, layer, True, 4, 2)

    async def run():
        return await asyncio.gather(core.submit(layer, healthy), core.submit(layer, needs_gone), return_exceptions=True)

    ok, failed = asyncio.run(run())
    assert isinstance(failed, RequestError) and failed.code == grpc.StatusCode.UNAVAILABLE and "gone" in failed.message
    assert not isinstance(ok, BaseException), ok
    assert (ok.output - model.layer(layer)(healthy)).abs().max().item() <= 1e-5
    assert core.stats.requests == 2 and (core._queued, core.inflight_tokens) == (0, 0)


class GatedTransport(LocalTransport):
    """In-process workers whose calls wait for ``gate`` (a call kept in flight while the test looks)."""

    def __init__(self, workers):
        super().__init__(workers)
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def run(self, *args, **kwargs):
        self.entered.set()
        await self.gate.wait()
        return await super().run(*args, **kwargs)


def test_a_call_in_flight_on_the_old_table_holds_up_the_drain_of_the_new_one(checkpoint):
    """After a store reset the router follows version 1 of a new table while a call dispatched on version 7 of
    the old one is still out: counted by version alone it would read as drained (1 <= 7)."""
    model = MoEModel.from_pretrained(checkpoint, backend="torch")
    layer = model.moe_layers[0]
    spread = spread_placement(list(model.moe_layers), 8, ["w0", "w1"])
    workers = {d: ExpertGroupCore(d, checkpoint, keys, backend="torch") for d, keys in spread.assignments.items()}
    transport = GatedTransport(workers)
    core = RouterCore(checkpoint, RouterConfig(), transport)
    core.set_placement(spread.model_copy(update={"version": 7, "generation": "old"}))

    def report():
        generation, version = core.oldest_inflight()
        return {"r": {"placement_version": core.placement.version, "placement_generation": core.placement.generation,
                      "oldest_inflight": [generation, version], "oldest_inflight_version": version}}

    async def run():
        x = torch.randn(5, model.spec.layer.hidden_size)
        call = asyncio.create_task(core.submit(layer, x))
        await transport.entered.wait()
        core.set_placement(spread.model_copy(update={"version": 1, "generation": "new"}))
        assert core.oldest_inflight() == ("old", 7)
        assert not routers_drained(report(), 1, "new")
        transport.gate.set()
        out = await call
        assert core.oldest_inflight() == ("new", 1)
        assert routers_drained(report(), 1, "new")
        return x, out

    x, out = asyncio.run(run())
    assert (out.output - model.layer(layer)(x)).abs().max().item() <= 1e-5


def test_a_worker_excluded_from_a_call_is_tried_again_where_it_is_the_only_replica_and_a_dead_one_never(checkpoint):
    """A call's excluded workers (stalled past their budget, unreachable for now) give way to other replicas, but an
    expert whose only replica is excluded keeps it: its rows wait rather than fail. A dead worker is never chosen."""
    model = MoEModel.from_pretrained(checkpoint, backend="torch")
    layer = model.moe_layers[0]
    placement = Placement(version=1, assignments={"w0": [(layer, e) for e in range(8)], "w1": [(layer, e) for e in range(4)]})
    workers = {d: ExpertGroupCore(d, checkpoint, keys, backend="torch") for d, keys in placement.assignments.items()}
    core = RouterCore(checkpoint, RouterConfig(), LocalTransport(workers))
    core.set_placement(placement)
    reps = core._replicas_for(layer, {"w0"})
    assert all(reps[e] == ["w1"] for e in range(4))  # another replica: the excluded worker is left out
    assert all(reps[e] == ["w0"] for e in range(4, 8))  # its only replica: kept
    core.mark_dead("w0")
    reps = core._replicas_for(layer, set())
    assert all(reps[e] == [] for e in range(4, 8)) and all(reps[e] == ["w1"] for e in range(4))
