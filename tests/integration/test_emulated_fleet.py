"""A local fleet of emulated devices (``--emulate h100:2,l4:2``): real workers, real Ray, Redis and gRPC.

Outputs are the in-process layer's; status names the emulated device types; an emulated L4 takes longer for a
call than an emulated H100 given the same rows (measured per call inside the workers, compared as a ratio)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import ray
import torch

from moefleet import MoEModel
from moefleet.cli import main as cli_main
from moefleet.core.config import FleetConfig
from moefleet.core.emulation import emulated_call_s
from moefleet.local import LocalFleet
from moefleet.router_service.client import FleetClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLOWDOWN = 100.0


@pytest.fixture(scope="module")
def fleet(ray_cluster, redis_server):
    cfg = FleetConfig(emulate="h100:2,l4:2", emulate_model="deepseek-v3", emulate_slowdown=SLOWDOWN, static=True,
                      redis_url=redis_server.url, namespace=f"emu-{uuid.uuid4().hex[:8]}", http_port=None)
    f = LocalFleet(cfg, worker_node_id=ray.get_runtime_context().get_node_id())
    f.start()
    f.client = FleetClient(f.address)
    f.client.wait_ready(60)
    yield f
    f.client.close()
    f.stop()


def test_an_emulated_fleet_answers_exactly(fleet):
    assert sorted(fleet.workers) == ["h100-0", "h100-1", "l4-0", "l4-1"]
    model = MoEModel.from_pretrained(fleet.checkpoint)
    g = torch.Generator().manual_seed(0)
    for layer in model.moe_layers:
        hidden = torch.randn(24, model.spec.layer.hidden_size, generator=g)
        assert (fleet.client.forward(layer, hidden) - model.layer(layer)(hidden)).abs().max().item() <= 1e-5


def test_status_and_the_controller_see_the_emulated_device_types(fleet, capsys):
    assert cli_main(["status", "--redis-url", fleet.redis_url, "--namespace", fleet.config.namespace]) == 0
    out = capsys.readouterr().out
    for d in ("h100-0", "h100-1", "l4-0", "l4-1"):
        assert d in out
    assert "H100 (emulated)" in out and "L4 (emulated)" in out
    devices = {d.device_id: d for d in fleet.controller_config().devices}
    assert devices["h100-0"].accelerator_type == "H100" and devices["l4-0"].accelerator_type == "L4"
    assert devices["h100-0"].speed > devices["l4-0"].speed and devices["h100-0"].memory_bytes > devices["l4-0"].memory_bytes
    assert all(d.emulated is not None and d.cpus is None for d in devices.values())


def test_an_emulated_l4_takes_longer_than_an_h100_for_the_same_call(fleet):
    """The same rows (two experts of 16 tokens each) to an H100 and an L4 worker, three times each: the L4's
    measured time per call (the worker's own busy time) is several times the H100's, as the device model says."""
    model = MoEModel.from_pretrained(fleet.checkpoint)
    layer = model.moe_layers[0]
    hidden = np.random.default_rng(0).standard_normal((16, model.spec.layer.hidden_size)).astype(np.float32)
    rows = np.tile(np.arange(16), 2)
    per_call, modelled = {}, {}
    devices = {d.device_id: d for d in fleet.devices}
    for d in ("h100-0", "l4-0"):
        w = fleet.worker(d)
        experts = sorted(e for l, e in fleet.placement.assignments[d] if l == layer)[:2]
        before = ray.get(w.stats.remote())
        for _ in range(3):
            ray.get(w.forward.remote(layer, hidden, rows, np.full(32, 0.5, np.float32), experts, [16, 16], rows, 16))
        after = ray.get(w.stats.remote())
        per_call[d] = (after["busy_s"] - before["busy_s"]) / (after["calls"] - before["calls"])
        modelled[d] = emulated_call_s(devices[d].emulated, [16, 16])
        assert per_call[d] >= modelled[d]
    assert modelled["l4-0"] / modelled["h100-0"] > 5
    assert per_call["l4-0"] / per_call["h100-0"] > 2.5, per_call
