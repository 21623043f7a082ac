"""deploy/README.md section 2 as a test: its own commands, on a one-node Ray cluster on loopback (tests/guide_walk.py).

Secrets, a password-protected Redis, ``ray start --head`` with Ray's token, an under-provisioned deploy
refused naming the shortfall, ``moe-fleet deploy`` with the controller and the guide's minimal
``controller.yaml``, the healthcheck, ``status --url``, skewed traffic that the controller rebalances,
the guide's TLS + token client exact against the in-process model, a call without the token refused,
a killed worker repaired by the controller; then everything the walk started is stopped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from tests import hf_models
from tests.guide_walk import STEPS, GuideWalk, guide_steps, session_pids

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_guides_steps_are_marked():
    steps = guide_steps()
    assert tuple(name for name in steps) == STEPS
    assert steps["controller-config"][0] == "yaml" and "checkpoint:" in steps["controller-config"][1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral-guide")
    model, _ = hf_models.build("mixtral", num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2)
    model.save_pretrained(path)
    return str(path)


def _wait(condition, timeout_s: float, poll_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    return condition()


def test_section_2_walked_with_the_guides_own_commands(checkpoint):
    import grpc
    import torch

    from moefleet import FleetClient, FleetError, MoEModel
    from moefleet.core.state import StateStore

    deploy_body = guide_steps()["deploy"][1]
    shown = [line.lstrip("# ").rstrip() for line in deploy_body.splitlines() if line.startswith("# ")]
    assert shown[0] == "deploying moefleet, moefleet-controller ..." and shown[1].startswith("fleet RUNNING in ")

    with GuideWalk(checkpoint, extra=[("--duration 20", "--duration 10")]) as walk:  # a shorter demo: the suite's time
        walk.step("redis")
        url = walk.redis_url()
        assert re.fullmatch(r"redis://:[0-9a-f]{48}@127\.0\.0\.1:\d+/0", url)
        assert oct(os.stat(walk.home / ".moefleet-redis-url").st_mode & 0o777) == "0o600"
        walk.step("secrets")
        for name in ("auth-token", "tls/tls.key", "tls/ca.key"):
            assert oct(os.stat(walk.home / ".config" / "moefleet" / name).st_mode & 0o777) == "0o600", name
        walk.step("head")
        assert walk.ray_session is not None and session_pids(walk.ray_session)
        walk.step("controller-config")
        assert (walk.work / "controller.yaml").is_file()

        # under-provisioned: the guide's deploy with more workers than the head's 8 CPUs hold
        big = walk.substitute(deploy_body.split("\n#")[0]).replace("--workers 2 ", "--workers 16 ")
        refused = walk.bash(big, timeout=120)
        assert refused.returncode == 1, refused.output
        assert ("moe-fleet: cannot deploy: needs 16.5 CPUs for the ingress and 16 workers; the cluster has 8 free "
                "(node ") in refused.stderr and "(head, 127.0.0.1): 8 of 8 CPUs free)" in refused.stderr

        deployed, = walk.step("deploy", timeout=400)
        lines = deployed.stdout.strip().splitlines()
        assert lines[0] == walk.expected(shown[0])
        assert re.fullmatch(re.escape(walk.expected(shown[1])).replace(r"in\ 31s", r"in\ \d+s"), lines[-1]), lines

        health, status, demo = walk.step("check", timeout=300)
        assert health.stdout == "SERVING\n"
        assert "worker-0" in status.stdout and "worker-1" in status.stdout, status.stdout
        assert re.search(r"controller (waiting|steady|rebalanced): ", status.stdout), status.stdout
        assert "0 failed" in demo.stdout, demo.stdout[-3000:]
        counted = re.search(r"the fleet counted (\d+) requests answered, (\d+) failed\s+(\d+) rebalances", demo.stdout)
        assert counted, demo.stdout[-3000:]
        answered, failed, rebalances = map(int, counted.groups())
        assert answered > 0 and failed == 0 and rebalances >= 1, counted.group(0)

        client, = walk.step("client")
        diff = float(re.fullmatch(r"max abs diff (\S+)\n", client.stdout).group(1))
        assert diff <= 1e-5
        model = MoEModel.from_pretrained(checkpoint)
        address = f"127.0.0.1:{walk.ports['grpc']}"
        ca = walk.home / ".config" / "moefleet" / "tls" / "ca.crt"
        hidden = torch.randn(3, model.spec.layer.hidden_size)
        with FleetClient(address, tls_ca=str(ca)) as no_token:
            with pytest.raises(FleetError) as e:
                no_token.forward(model.moe_layers[0], hidden)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED

        # the controller repairs the fleet it was deployed with: a worker killed is restarted and serves again
        store = StateStore(url, namespace="moefleet")
        victim = store.workers()["worker:worker-1"]["pid"]
        assert victim in session_pids(walk.ray_session)  # a process of this walk's cluster, nobody else's
        os.kill(victim, signal.SIGKILL)
        back = _wait(lambda: (store.workers().get("worker:worker-1") or {}).get("pid") not in (None, victim), 60)
        assert back, "worker-1 was not restarted"
        repaired = lambda: [ev for ev in store.events(300) if ev.kind == "placement" and "repair" in str(ev.data.get("reason"))]  # noqa: E731
        assert _wait(repaired, 30), [(ev.kind, ev.data) for ev in store.events(40)]
        kinds = [ev.kind for ev in store.events(300)]
        assert "worker_down" in kinds and "worker_restart" in kinds, kinds
        token = (walk.home / ".config" / "moefleet" / "auth-token").read_text().strip()
        with FleetClient(address, tls_ca=str(ca), token=token) as fleet:
            for layer in model.moe_layers:
                assert (fleet.forward(layer, hidden) - model.layer(layer)(hidden)).abs().max().item() <= 1e-5
        snap = json.loads(walk.bash(f"moe-fleet status --url http://127.0.0.1:{walk.ports['http']} --json").stdout)
        assert {d["id"] for d in snap["devices"] if d["live"]} >= {"worker-0", "worker-1"}
        assert snap["requests"]["errors"] == 0 and snap["controller"]["state"] in ("steady", "rebalanced", "waiting",
                                                                                   "repairing"), snap["controller"]
        assert walk.unused_substitutions() == []
        session = walk.ray_session
    assert session_pids(session) == []  # everything the walk's cluster ran is gone
