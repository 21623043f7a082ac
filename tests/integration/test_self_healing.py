"""Self-healing by default: a dead worker is repaired, Redis outages and controller deaths lose no request.

Every test runs real traffic against a local fleet (real Ray, real Redis, real
gRPC), bounded in count and time, and checks every answer against the
in-process layer. Faults are real: worker and redis-server processes are
killed with signals, by the pids this test's fleet reports.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc
import pytest
import ray
import torch

from moefleet import MoEModel
from moefleet.core.config import FleetConfig, RouterConfig
from moefleet.core.state import StateStore
from moefleet.local import LocalFleet
from moefleet.router_service.client import FleetClient, FleetError
from tests import hf_models

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_REQUESTS = 4000
MAX_SECONDS = 60


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral-heal")
    model, _ = hf_models.build("mixtral", num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2)
    model.save_pretrained(path)
    return str(path)


@dataclass
class Traffic:
    """Client threads sending random layer calls until stopped (or a bound is hit), checking every answer."""

    address: str
    model: MoEModel
    clients: int = 2
    tokens: int = 16
    log: list = field(default_factory=list)  # (start, end, error code name or None, error message)
    wrong: int = 0

    def __post_init__(self):
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(s,), daemon=True) for s in range(self.clients)]
        self._t0 = time.monotonic()

    def _run(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        layers = self.model.moe_layers
        h = self.model.spec.layer.hidden_size
        with FleetClient(self.address, timeout=30) as client:
            i = 0
            while not self._stop.is_set() and len(self.log) < MAX_REQUESTS and time.monotonic() - self._t0 < MAX_SECONDS:
                layer = layers[i % len(layers)]
                i += 1
                hidden = torch.randn(self.tokens, h, generator=g)
                t0 = time.monotonic()
                try:
                    out = client.forward(layer, hidden)
                except FleetError as e:
                    self.log.append((t0, time.monotonic(), e.code.name, e.message))
                    # back off as a client does: failing fast, a busy loop would spend MAX_REQUESTS in the outage
                    self._stop.wait(0.01)
                    continue
                self.log.append((t0, time.monotonic(), None, ""))
                if (out - self.model.layer(layer)(hidden)).abs().max().item() > 1e-5:
                    self.wrong += 1

    def start(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def failures(self, since: float = 0.0) -> list:
        return [r for r in self.log if r[2] is not None and r[0] >= since]

    def answered(self, since: float = 0.0) -> int:
        return sum(1 for r in self.log if r[2] is None and r[0] >= since)


def wait_for(predicate, timeout_s: float, step_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    return predicate()


@pytest.fixture(autouse=True)
def _ray(ray_cluster):
    """The session's Ray (every fleet here joins it)."""


def _fleet(checkpoint, redis_url=None, **over) -> LocalFleet:
    cfg = dict(checkpoint=checkpoint, num_workers=3, redis_url=redis_url, namespace=f"heal-{uuid.uuid4().hex[:8]}",
               router=RouterConfig(telemetry_interval_s=0.25))
    cfg.update(over)
    fleet = LocalFleet(FleetConfig(**cfg))
    fleet.start()
    with FleetClient(fleet.address) as c:
        c.wait_ready(60)
    return fleet


def _events(store: StateStore, kind: str) -> list:
    return [e for e in store.events(500) if e.kind == kind]


def test_a_killed_worker_is_repaired_and_only_its_experts_fail_fast_meanwhile(checkpoint, redis_server):
    fleet = _fleet(checkpoint, redis_server.url, min_replicas=1)  # one copy of each expert: some must fail
    store = StateStore(fleet.redis_url, namespace=fleet.config.namespace)
    model = MoEModel.from_pretrained(checkpoint)
    traffic = Traffic(fleet.address, model).start()
    try:
        assert wait_for(lambda: traffic.answered() > 50, 30)
        victim = ray.get(fleet.worker("worker-1").stats.remote())["pid"]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # the controller notices, re-places worker-1's experts on the survivors and starts a fresh worker
        repaired = wait_for(lambda: "worker-1" not in store.get_placement().assignments, 30)
        assert repaired, "worker-1's experts were never re-placed"
        repaired_at = time.monotonic()
        assert wait_for(lambda: traffic.answered(since=repaired_at + 0.5) > 50, 30)
        assert wait_for(lambda: "worker:worker-1" in store.workers(), 60), "no fresh worker for worker-1"
    finally:
        traffic.stop()
        fleet.stop()
    assert traffic.wrong == 0
    failures = traffic.failures(since=killed_at - 1)
    assert failures, "killing a worker that holds the only replica of some experts must fail some requests"
    for start, end, code, message in failures:
        assert code == "UNAVAILABLE", (code, message)
        assert "worker-1" in message, message
        assert end - start < 5.0, f"a request hung for {end - start:.1f}s before failing"  # failed, never hung
        assert start < repaired_at + 1.0  # only until the repair was published (and routers followed)
    assert not traffic.failures(since=repaired_at + 1.0)
    assert [e.data["devices"] for e in _events(store, "worker_down")] == [["worker-1"]]


def test_with_two_replicas_of_every_expert_a_killed_worker_loses_no_request(checkpoint, redis_server):
    fleet = _fleet(checkpoint, redis_server.url, num_workers=2, min_replicas=2)
    store = StateStore(fleet.redis_url, namespace=fleet.config.namespace)
    model = MoEModel.from_pretrained(checkpoint)
    traffic = Traffic(fleet.address, model).start()
    try:
        # the controller raises every expert to two replicas first
        assert wait_for(lambda: all(len(w) == 2 for w in store.get_placement().replicas().values()), 30)
        assert wait_for(lambda: traffic.answered() > 50, 30)
        victim = ray.get(fleet.worker("worker-0").stats.remote())["pid"]
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: _events(store, "worker_down"), 20)
        assert wait_for(lambda: "worker:worker-0" in store.workers(), 60), "no fresh worker for worker-0"
        # and the floor is restored on the fresh worker
        assert wait_for(lambda: all(len(w) == 2 for w in store.get_placement().replicas().values()), 30)
        n = traffic.answered()
        assert wait_for(lambda: traffic.answered() > n + 50, 30)
    finally:
        traffic.stop()
        fleet.stop()
    assert traffic.wrong == 0
    assert traffic.failures() == []


def test_redis_outages_lose_no_request_and_a_restarted_redis_is_followed(checkpoint):
    """redis-server paused (unreachable) and then killed: routers serve from their cached placement;
    local mode starts redis-server again, the controller republishes what the workers hold as a new
    generation, routers follow it, and telemetry resumes."""
    fleet = _fleet(checkpoint)  # owns its redis-server
    model = MoEModel.from_pretrained(checkpoint)
    store = StateStore(fleet.redis_url, namespace=fleet.config.namespace, socket_timeout_s=1.0)
    generation = store.get_placement().generation
    traffic = Traffic(fleet.address, model).start()
    try:
        assert wait_for(lambda: traffic.answered() > 50, 30)
        pid = fleet.redis.pid
        os.kill(pid, signal.SIGSTOP)  # unreachable: every Redis call times out
        try:
            n = traffic.answered()
            assert wait_for(lambda: traffic.answered() > n + 50, 30)
            time.sleep(3.0)
        finally:
            os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)  # gone: local mode restarts it, empty
        assert wait_for(lambda: fleet.redis.pid != pid and fleet.redis.is_running(), 20), "redis-server not restarted"
        reborn = wait_for(lambda: (store.get_placement() or None), 30)
        assert reborn and reborn.generation != generation
        assert _events(store, "placement_recovered"), "the placement was re-planned, not recovered from the workers"
        assert set(reborn.experts()) == {(layer, e) for layer in model.moe_layers for e in range(8)}
        routers = lambda: [r["placement_generation"] for r in fleet.router_stats()]  # noqa: E731
        assert wait_for(lambda: routers() == [reborn.generation], 20), routers()
        assert wait_for(lambda: sum(store.read_load(None, 1.0, 5, 1e9).values()) > 0, 20), "telemetry did not resume"
        n = traffic.answered()
        assert wait_for(lambda: traffic.answered() > n + 50, 30)
    finally:
        traffic.stop()
        fleet.stop()
    assert traffic.wrong == 0
    assert traffic.failures() == []
