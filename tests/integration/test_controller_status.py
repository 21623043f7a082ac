"""A controller that cannot plan says why: in its record (what ``status`` shows) and in its log, once per change.

A real router (``RouterCore`` with a ``RouterRuntime`` heartbeating into the session's Redis) serves a
tiny Mixtral; controllers step against the same store, without Ray (a static inventory).
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from moefleet.controller.main import RECORD, Controller, ControllerConfig
from moefleet.controller.telemetry import TelemetryConfig, build_snapshot, read_inputs
from moefleet.core.config import RouterConfig
from moefleet.core.placement import DeviceSpec, spread_placement
from moefleet.expert_workers.group import ExpertGroupCore
from moefleet.router_service.router import RouterCore
from moefleet.router_service.runtime import RouterRuntime
from moefleet.router_service.transport import LocalTransport
from tests import hf_models

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral-status")
    model, _ = hf_models.build("mixtral", num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2)
    model.save_pretrained(path)
    return str(path)


def _serve(store, checkpoint):
    """A router of the fleet heartbeating what it serves; the fleet's placement published."""
    from moefleet.core.model import MoECheckpoint

    spec = MoECheckpoint(checkpoint).spec
    placement = store.publish_placement(spread_placement(list(spec.moe_layers), spec.layer.num_experts, ["w0", "w1"]), 0)
    workers = {d: ExpertGroupCore(d, checkpoint, keys, backend="torch") for d, keys in placement.assignments.items()}
    core = RouterCore(checkpoint, RouterConfig(), LocalTransport(workers))
    core.set_placement(placement)
    asyncio.run(RouterRuntime(core, store, "r0").heartbeat())
    for d, w in workers.items():  # what a worker actor heartbeats (its stats), with time to spare for the test
        store.register_worker(f"worker:{d}", {"kind": "worker", **w.stats()}, None, 120.0)
    return placement


def _devices(n=2):
    return [DeviceSpec(device_id=f"w{i}", node_id="local", kind="cpu", memory_bytes=1 << 30) for i in range(n)]


def test_a_controller_without_the_fleets_checkpoint_says_so_once_and_touches_nothing(store, checkpoint, caplog):
    placement = _serve(store, checkpoint)
    cfg = ControllerConfig(redis_url=store.url, namespace=store.namespace, ray_address=None, devices=_devices(), min_tokens=0)
    ctl = Controller(cfg, holder="no-ckpt", store=store)  # no checkpoint: the built-in model, not the fleet's
    with caplog.at_level(logging.INFO, logger="moefleet.controller.main"):
        for _ in range(3):
            report = ctl.step()
    assert report["skipped"] == "no checkpoint"
    assert "the fleet serves mixtral, 2 MoE layers × 8 experts" in report["detail"]
    assert "set checkpoint" in report["detail"]
    said = [r for r in caplog.records if "controller blocked: no checkpoint" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING  # once per change, not once per step
    assert store.get_placement().version == placement.version  # it planned nothing for a model it does not know
    status = store.get_record(RECORD)["status"]
    assert (status["state"], status["reason"]) == ("blocked", "no checkpoint")
    snap = build_snapshot(read_inputs(store, TelemetryConfig()), TelemetryConfig())
    assert snap["controller"]["state"] == "blocked" and snap["controller"]["reason"] == "no checkpoint"
    store.release_lease("no-ckpt")

    # with the fleet's checkpoint it plans; the change of state is said once more
    caplog.clear()
    ok = Controller(cfg.model_copy(update={"checkpoint": checkpoint}), holder="with-ckpt", store=store)
    with caplog.at_level(logging.INFO, logger="moefleet.controller.main"):
        report = ok.step()
        ok.step()
    assert "skipped" not in report and report["gain"] is not None
    changes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("controller ")]
    assert len(changes) == 1 and changes[0].startswith(f"controller {ok.status['state']}:"), changes
    store.release_lease("with-ckpt")


def test_a_controller_with_no_device_is_blocked_and_says_what_the_inventory_lacks(store, checkpoint):
    _serve(store, checkpoint)
    # local mode's inventory: one device, whose worker is not running (and not restarted here)
    cfg = ControllerConfig(checkpoint=checkpoint, redis_url=store.url, namespace=store.namespace, ray_address=None,
                           devices=[DeviceSpec(device_id="elsewhere", node_id="n", kind="cpu", memory_bytes=1 << 30)],
                           min_tokens=0, restart_workers=False, local=True)
    ctl = Controller(cfg, holder="no-device", store=store)
    report = ctl.step()
    assert report["skipped"] == "no live device"
    assert report["detail"] == "every device is down or restarting: elsewhere"
    assert ctl.status["state"] == "blocked"
    store.release_lease("no-device")


def test_a_starting_fleet_is_not_republished_from_its_first_worker(store, checkpoint):
    """No placement published yet and the first of two workers heartbeating: its experts are not the fleet's
    placement (the application publishes its own once both are up); once the live workers hold every expert,
    a controller that finds no placement republishes theirs."""
    from moefleet.core.model import MoECheckpoint

    spec = MoECheckpoint(checkpoint).spec
    starting = spread_placement(list(spec.moe_layers), spec.layer.num_experts, ["w0", "w1"])
    workers = {d: ExpertGroupCore(d, checkpoint, keys, backend="torch") for d, keys in starting.assignments.items()}
    cfg = ControllerConfig(checkpoint=checkpoint, redis_url=store.url, namespace=store.namespace, ray_address=None,
                           devices=_devices(), restart_workers=False)
    ctl = Controller(cfg, holder="starting", store=store)
    store.register_worker("worker:w0", {"kind": "worker", **workers["w0"].stats()}, None, 120.0)
    report = ctl.step()
    assert report["skipped"] == "waiting for workers to report what they hold", report
    assert store.get_placement() is None
    store.register_worker("worker:w1", {"kind": "worker", **workers["w1"].stats()}, None, 120.0)
    ctl.step()
    recovered = store.get_placement()
    assert recovered is not None and recovered.experts() == starting.experts()
    store.release_lease("starting")
