"""Emulated devices without Ray: the ``--emulate`` spec, the modelled call time, the devices the controller sees,
and a worker that computes exact results and takes its device's time."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from pydantic import ValidationError

from moefleet import MoEModel
from moefleet.controller.sim.devices import DEVICE_TYPES, MODEL_SHAPES, ExpertShape, emulated_specs, fleet_devices, parse_fleet
from moefleet.core.config import FleetConfig, RouterConfig
from moefleet.core.default_model import default_model_dir
from moefleet.core.emulation import (
    EMULATED_MODELS, EMULATED_TYPES, EmulatedDevice, EmulateSpecError, device_service_s, emulated_call_s, parse_emulate,
)
from moefleet.core.placement import spread_placement
from moefleet.expert_workers.group import ExpertGroupCore
from moefleet.router_service.router import RouterCore
from moefleet.router_service.transport import LocalTransport

DEEPSEEK = MODEL_SHAPES["deepseek-v3"][0]


def test_parse_emulate_reads_types_and_counts():
    assert parse_emulate("h100:16,l4:16") == [("h100", 16), ("l4", 16)]
    assert parse_emulate(" H100:2 , cpu:1") == [("h100", 2), ("cpu", 1)]


@pytest.mark.parametrize("text, words", [
    ("h100:0", ["count", "'h100:0'", ">= 1"]),
    ("foo:3", ["unknown device type", "'foo'"]),
    ("h100", ["TYPE:COUNT"]),
    ("h100:x", ["integer", "'x'"]),
    ("h100:2,h100:3", ["listed twice"]),
    ("h100:2:speed=3", ["TYPE:COUNT"]),
    ("", ["empty"]),
])
def test_parse_emulate_names_what_is_wrong(text, words):
    with pytest.raises(EmulateSpecError) as e:
        parse_emulate(text)
    assert str(e.value).startswith("emulate: ")
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("bad, field", [
    ({"emulate": "h100:0"}, "emulate"), ({"emulate": "foo:3"}, "emulate"),
    ({"emulate": "h100:2", "emulate_slowdown": 0}, "emulate_slowdown"),
    ({"emulate": "h100:2", "emulate_model": "gpt-5"}, "emulate_model"),
])
def test_fleet_config_refuses_bad_emulation_naming_the_field(bad, field):
    with pytest.raises(ValidationError) as e:
        FleetConfig(**bad)
    assert e.value.errors()[0]["loc"] == (field,)
    assert FleetConfig(emulate="h100:16,l4:16", emulate_slowdown=50).emulate == "h100:16,l4:16"


def test_emulation_catalogue_is_the_simulators():
    assert set(EMULATED_TYPES) == set(DEVICE_TYPES)
    assert set(EMULATED_MODELS) == set(MODEL_SHAPES)


def test_a_simulated_device_and_an_emulated_one_charge_a_call_the_same():
    sim = {d.type_name: d for d in fleet_devices(parse_fleet("h100:1,l4:1"), DEEPSEEK, simulated_layers=58,
                                                   remote_activations=False)}
    specs = {d.emulated.type_name: d for d in emulated_specs("h100:1,l4:1", DEEPSEEK, simulated_layers=58,
                                                             fleet_expert_bytes=DEEPSEEK.weight_bytes, slowdown=3.0)}
    for rows in ([1], [5, 0, 300], [64] * 8):
        for t in ("h100", "l4"):
            assert emulated_call_s(specs[t].emulated, rows) == pytest.approx(3.0 * sim[t].service_s(rows), rel=1e-12)
    # an L4 is slower than an H100 for the same call, and a bigger call takes longer
    assert emulated_call_s(specs["l4"].emulated, [64] * 8) > 5 * emulated_call_s(specs["h100"].emulated, [64] * 8)
    assert emulated_call_s(specs["h100"].emulated, [512] * 8) > emulated_call_s(specs["h100"].emulated, [64] * 8)


def test_device_service_time_counts_rows_floors_overhead_and_returned_rows():
    assert device_service_s([10, 0, 3], row_s=1.0, floor_s=2.0, overhead_s=0.5, out_row_s=0.25) == 0.5 + 10 + 2 + 3 + 10 * 0.25
    assert device_service_s([], 1.0, 2.0, 0.5) == 0.5


def test_emulated_specs_are_heterogeneous_devices_with_their_memory():
    tiny = 3 * 16 * 32 * 4  # a 16 x 32 gated fp32 expert
    specs = emulated_specs("h100:2,l4:3", DEEPSEEK, simulated_layers=58, fleet_expert_bytes=tiny, slowdown=10)
    assert [d.device_id for d in specs] == ["h100-0", "h100-1", "l4-0", "l4-1", "l4-2"]
    h100, l4 = specs[0], specs[2]
    assert (h100.accelerator_type, l4.accelerator_type) == ("H100", "L4")
    assert h100.speed > 5 * l4.speed
    # memory holds as many tiny experts as the device holds DeepSeek-V3 experts (79 / 22 GiB of 84 MiB experts)
    gib = 1 << 30
    assert h100.memory_bytes // tiny == pytest.approx(79 * gib // DEEPSEEK.weight_bytes, abs=1)
    assert l4.memory_bytes // tiny == pytest.approx(22 * gib // DEEPSEEK.weight_bytes, abs=1)
    assert h100.emulated.label == "H100 (emulated)" and h100.emulated.slowdown == 10
    assert h100.cpus is None


@pytest.fixture(scope="module")
def model():
    return MoEModel.from_pretrained(str(default_model_dir()), backend="torch")


def test_emulated_workers_answer_exactly_and_take_their_devices_time(model):
    """The router over emulated workers (in process) returns the in-process layer's output; each worker's call
    lasted at least its modelled time, and an L4 worker's calls took longer than an H100's for the same rows."""
    ckpt = str(default_model_dir())
    spec = model.spec
    specs = emulated_specs("h100:1,l4:1", DEEPSEEK, simulated_layers=len(spec.moe_layers),
                           fleet_expert_bytes=spec.layer.expert_params * 4, slowdown=20)
    layers = list(spec.moe_layers)
    placement = spread_placement(layers, spec.layer.num_experts, [d.device_id for d in specs])
    # (memory left out: two devices' 3/58 of a DeepSeek-V3 device do not hold this model's 48 experts spread in two)
    workers = {d.device_id: ExpertGroupCore(d.device_id, ckpt, placement.assignments[d.device_id], backend="torch",
                                            emulate=d.emulated) for d in specs}
    core = RouterCore(ckpt, RouterConfig(), LocalTransport(workers))
    core.set_placement(placement)
    g = torch.Generator().manual_seed(1)
    for layer in layers:
        x = torch.randn(48, spec.layer_spec(layer).hidden_size, generator=g)
        got = asyncio.run(core.submit(layer, x)).output
        assert (got - model.layer(layer)(x)).abs().max().item() <= 1e-5
    # one direct call of the same rows to each: measured time against the model's
    per_call = {}
    for d in specs:
        w = workers[d.device_id]
        experts = sorted(e for l, e in placement.assignments[d.device_id] if l == layers[0])[:2]
        x = torch.randn(16, spec.layer.hidden_size, generator=g)
        rows = torch.arange(16).repeat(len(experts)).numpy()
        t0 = time.perf_counter()
        w.forward(layers[0], x.numpy(), rows, torch.full((len(rows),), 0.5).numpy(), experts, [16] * len(experts),
                  rows, 16)
        per_call[d.emulated.type_name] = time.perf_counter() - t0
        assert per_call[d.emulated.type_name] >= emulated_call_s(d.emulated, [16] * len(experts))
        assert w.heartbeat_info()["accelerator"]["name"] == f"{d.accelerator_type} (emulated)"
    assert per_call["l4"] > per_call["h100"]


def test_an_emulated_worker_refuses_loads_past_its_devices_memory():
    from moefleet.expert_workers.slots import MemoryBudgetError

    ckpt = str(default_model_dir())
    spec = MoEModel.from_pretrained(ckpt, backend="torch").spec
    one = spec.layer.expert_params * 4
    # an L4 sized for DeepSeek-V3 experts, holding this model's: 22 GiB / 84 MiB = 268 experts' worth
    shape = ExpertShape(spec.layer.hidden_size, spec.layer.intermediate_size)
    (l4,) = emulated_specs("l4:1", shape, simulated_layers=1, fleet_expert_bytes=one, slowdown=1)
    small = l4.model_copy(update={"memory_bytes": 3 * one})
    w = ExpertGroupCore("l4-0", ckpt, [], backend="torch", memory_budget_bytes=small.memory_bytes, emulate=small.emulated)
    layer = spec.moe_layers[0]
    with pytest.raises(MemoryBudgetError):
        w.load([(layer, e) for e in range(spec.layer.num_experts)])
    assert isinstance(w.emulate, EmulatedDevice) and w.device.type == "cpu"


def test_expert_runs_round_trip_and_stay_small_for_a_deepseek_device():
    from moefleet.core.placement import expert_runs, held_experts, proportional_placement

    keys = [(3, 0), (3, 1), (3, 2), (3, 7), (5, 255)]
    runs = expert_runs(keys)
    assert runs == {"3": [[0, 3], [7, 8]], "5": [[255, 256]]}
    assert held_experts({"expert_runs": runs}) == keys
    assert held_experts({"experts": [[3, 0]]}) == [(3, 0)] and held_experts({}) is None
    tiny = 3 * 16 * 32 * 4
    specs = emulated_specs("h100:16,l4:16", DEEPSEEK, simulated_layers=58, fleet_expert_bytes=tiny)
    placement = proportional_placement(list(range(3, 61)), 256, specs, tiny)
    import json

    held = placement.assignments["h100-0"]
    assert len(held) > 700 and len(json.dumps(expert_runs(held))) < len(json.dumps([list(k) for k in held])) / 6


def test_proportional_placement_shares_by_speed_within_memory():
    from moefleet.core.placement import proportional_placement

    tiny = 3 * 16 * 32 * 4
    specs = emulated_specs("h100:16,l4:16", DEEPSEEK, simulated_layers=58, fleet_expert_bytes=tiny)
    layers = list(range(3, 61))
    placement = proportional_placement(layers, 256, specs, tiny)
    held = {d: len(k) for d, k in placement.assignments.items()}
    assert sum(held.values()) == 58 * 256
    assert sorted({k for ks in placement.assignments.values() for k in ks}) == [(l, e) for l in layers for e in range(256)]
    for d in specs:
        assert held[d.device_id] * tiny <= d.memory_bytes  # within memory
    # an L4 holds no more than its memory allows, an H100 takes the rest: about 8x the L4's experts (speed 1 vs 0.122
    # would give 8.2x; memory caps the H100s at 90 %, so the L4s take a little more)
    assert 6 < held["h100-0"] / held["l4-0"] < 9
    with pytest.raises(ValueError, match="hold"):
        proportional_placement(layers, 256, specs[16:], tiny)  # L4s alone cannot hold one copy
