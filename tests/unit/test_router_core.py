"""The router's serving path without Ray: RouterCore + in-process workers equal the in-process layer."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch

from moefleet import MoEModel
from moefleet.core.config import RouterConfig
from moefleet.core.placement import Placement, spread_placement
from moefleet.expert_workers.group import ExpertGroupCore
from moefleet.router_service.dispatch import plan_dispatch
from moefleet.router_service.router import RequestError, RouterCore
from moefleet.router_service.transport import LocalTransport
from tests import hf_models


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v3", "nllb_moe"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model, _ = hf_models.build(request.param)
    model.save_pretrained(path)
    return path


def _fleet(path, placement: Placement, **router_kw):
    model = MoEModel.from_pretrained(path, backend="torch")
    workers = {d: ExpertGroupCore(d, str(path), keys, backend="torch") for d, keys in placement.assignments.items()}
    core = RouterCore(str(path), RouterConfig(**router_kw), LocalTransport(workers))
    core.set_placement(placement)
    return model, workers, core


def test_router_with_local_workers_equals_in_process_layer(checkpoint):
    model = MoEModel.from_pretrained(checkpoint)
    spec = model.spec
    placement = spread_placement(list(spec.moe_layers), spec.layer.num_experts, ["w0", "w1", "w2"])
    model, workers, core = _fleet(checkpoint, placement)
    assert core.ready()
    g = torch.Generator().manual_seed(0)

    async def run():
        for layer in spec.moe_layers:
            for t in (1, 7, 300):
                hidden = torch.randn(t, spec.layer_spec(layer).hidden_size, generator=g)
                got = await core.submit(layer, hidden)
                want, routing = model.layer(layer)(hidden, return_routing=True)
                assert (got.output - want).abs().max().item() <= 1e-5
                assert torch.equal(got.routing.topk_ids, routing.topk_ids)

    asyncio.run(run())
    served = sum(sum(w.stats()["tokens_served"].values()) for w in workers.values())
    assert served > 0


def test_concurrent_requests_are_micro_batched_and_split_back(checkpoint):
    """The first request on an idle layer goes at once; dropless requests arriving while it runs share one
    dispatch; capacity layers never batch (capacity is counted per call)."""
    model = MoEModel.from_pretrained(checkpoint)
    spec = model.spec
    placement = spread_placement(list(spec.moe_layers), spec.layer.num_experts, ["w0", "w1"])
    model, _, core = _fleet(checkpoint, placement, batch_window_ms=50)
    layer = spec.moe_layers[0]
    hs = [torch.randn(n, spec.layer.hidden_size) for n in (3, 5, 8)]

    async def run():
        return await asyncio.gather(*(core.submit(layer, h) for h in hs))

    results = asyncio.run(run())
    assert core.stats.requests == 3
    assert core.stats.batches == (3 if spec.layer.capacity is not None else 2)
    for h, r in zip(hs, results):
        assert (r.output - model.layer(layer)(h)).abs().max().item() <= 1e-5


def test_replicated_experts_spread_work_across_replicas():
    ids = np.array([[0, 1]] * 10)
    w = np.ones_like(ids, dtype=np.float32)
    batches = plan_dispatch(ids, w, {0: ["a", "b"], 1: ["a", "b"]})
    assert sorted(b.worker for b in batches) == ["a", "b"]
    busy = plan_dispatch(ids, w, {0: ["a", "b"], 1: ["a", "b"]}, outstanding={"a": 100.0})
    assert [b.worker for b in busy] == ["b"]


def test_each_worker_called_once_with_rows_grouped_by_expert():
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(50)])
    w = rng.random(ids.shape).astype(np.float32)
    reps = {e: [f"w{e % 3}"] for e in range(8)}
    batches = plan_dispatch(ids, w, reps)
    assert len({b.worker for b in batches}) == len(batches) == 3
    for b in batches:
        assert b.experts == sorted(b.experts)
        assert sum(b.counts) == b.num_rows
        expert_of_row = np.repeat(b.experts, b.counts)
        for r, e, wt in zip(b.rows, expert_of_row, b.weights):
            k = list(ids[r]).index(e)
            assert wt == w[r, k]
        assert np.array_equal(b.unique_tokens[b.inverse], b.rows)
    assert sum(b.num_rows for b in batches) == ids.size


def test_stale_worker_is_retried_on_the_new_placement(checkpoint):
    model = MoEModel.from_pretrained(checkpoint)
    spec = model.spec
    layers = list(spec.moe_layers)
    old = spread_placement(layers, spec.layer.num_experts, ["w0", "w1"])
    new = spread_placement(layers, spec.layer.num_experts, ["w1", "w0"], version=2)  # experts swap workers
    model = MoEModel.from_pretrained(checkpoint, backend="torch")
    workers = {d: ExpertGroupCore(d, str(checkpoint), keys, backend="torch") for d, keys in new.assignments.items()}
    core = RouterCore(str(checkpoint), RouterConfig(), LocalTransport(workers))
    core.set_placement(old)  # the router still believes the old placement
    hidden = torch.randn(20, spec.layer.hidden_size)

    async def run():
        task = asyncio.create_task(core.submit(layers[0], hidden))
        await asyncio.sleep(0.05)
        core.set_placement(new)
        return await task

    got = asyncio.run(run())
    assert core.stats.retries >= 1
    assert (got.output - model.layer(layers[0])(hidden)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "layer_delta,shape,code",
    [
        (None, (4, None), grpc.StatusCode.NOT_FOUND),
        (0, (4, 3), grpc.StatusCode.INVALID_ARGUMENT),
        (0, (0, None), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_requests_raise_request_errors(checkpoint, layer_delta, shape, code):
    spec = MoEModel.from_pretrained(checkpoint).spec
    placement = spread_placement(list(spec.moe_layers), spec.layer.num_experts, ["w0"])
    _, _, core = _fleet(checkpoint, placement)
    layer = 10_000 if layer_delta is None else spec.moe_layers[0]
    hidden = torch.randn(shape[0], shape[1] or spec.layer.hidden_size)
    with pytest.raises(RequestError) as e:
        asyncio.run(core.submit(layer, hidden))
    assert e.value.code == code
