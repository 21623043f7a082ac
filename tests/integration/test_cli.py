"""The command line a user runs: up, status, demo, down — on the built-in default model, all on loopback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _cli(*args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "moefleet.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_up_status_demo_down_on_the_default_model(tmp_path):
    """With a token required (--auth-token-file): status and demo use it; the Redis password shows nowhere."""
    import json
    import stat

    env = {**os.environ, "MOEFLEET_CACHE": str(tmp_path), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "COLUMNS": "160"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MOEFLEET_AUTH_TOKEN", None)
    token_file = tmp_path / "token"
    token_file.write_text("cli-test-token-0123456789\n")
    token_file.chmod(0o600)
    up = _cli("up", "--port", "0", "--workers", "2", "--worker-cpus", "0.5", "--http-port", "0",
              "--auth-token-file", str(token_file), env=env)
    assert up.returncode == 0, up.stderr + up.stdout
    address, http = up.stdout.strip().splitlines()[-2:]  # the gRPC address, then the telemetry endpoint
    assert address.startswith("127.0.0.1:")
    assert http.startswith("http://127.0.0.1:") and "dashboard" in http
    outputs = [up.stdout + up.stderr]
    try:
        state_path = tmp_path / "local-fleet.json"
        assert stat.S_IMODE(state_path.stat().st_mode) == 0o600  # it holds the Redis URL with its password
        from urllib.parse import urlsplit

        password = urlsplit(json.loads(state_path.read_text())["redis_url"]).password
        assert password and len(password) >= 32
        again = _cli("up", "--port", "0", env=env)
        assert "already up" in again.stdout
        status = _cli("status", env=env)
        assert status.returncode == 0, status.stderr
        assert "deepseek_v3" in status.stdout and "worker-0" in status.stdout
        snap = json.loads(_cli("status", "--json", env=env).stdout)
        assert snap["layers"] == [1, 2, 3] and snap["num_experts"] == 16
        assert {d["id"] for d in snap["devices"]} == {"worker-0", "worker-1"}
        watch = _cli("status", "--watch", "--json", "--interval", "0.5", "--count", "2", env=env)
        assert watch.returncode == 0 and len(watch.stdout.strip().splitlines()) == 2
        trace = tmp_path / "demo-trace.jsonl"
        recorder = subprocess.Popen([sys.executable, "-m", "moefleet.cli", "trace", "record", "--out", str(trace),
                                     "--duration", "5", "--settle", "1.5"], env=env, stdout=subprocess.PIPE, text=True)
        demo = _cli("demo", "--duration", "4", "--concurrency", "2", "--tokens", "16", env=env)
        assert demo.returncode == 0, demo.stderr + demo.stdout[-2000:]
        assert "0 failed" in demo.stdout
        counted = re.search(r"the fleet counted (\d+) requests answered, 0 failed", demo.stdout)
        assert counted and int(counted.group(1)) > 0, demo.stdout[-2000:]
        assert max(len(line) for line in demo.stdout.splitlines()) <= 100
        assert recorder.wait(timeout=60) == 0
        recorded = [json.loads(line) for line in trace.read_text().splitlines()]
        assert {r["layer"] for r in recorded} == {1, 2, 3} and all(len(r["counts"]) == 16 for r in recorded)
        replayed = json.loads(_cli("trace", "replay", str(trace), "--json", env=env).stdout)
        total = sum(sum(r["counts"]) for r in recorded)
        assert total > 0 and sum(w["tokens"] for w in replayed["windows"]) == total
        outputs += [again.stdout + again.stderr, status.stdout + status.stderr, demo.stdout + demo.stderr,
                    watch.stdout + watch.stderr]
        import grpc
        import torch

        from moefleet.router_service.client import FleetClient, FleetError

        with FleetClient(address) as client:  # no token
            with pytest.raises(FleetError) as e:
                client.forward(1, torch.randn(2, 512))
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        down = _cli("down", env=env)
    assert down.returncode == 0 and "stopped" in down.stdout
    # `down` returns once the fleet's ports can be bound again, as its servers bind them (status fetched the
    # telemetry port: its closed connections wait out TIME_WAIT, which `up`'s check must not count)
    from moefleet.cli import _check_http_port
    from moefleet.core.ports import bind_error, split_address

    http_address = http.split()[0].removeprefix("http://").rstrip("/")
    assert bind_error(*split_address(address)) is None and bind_error(*split_address(http_address)) is None
    _check_http_port(split_address(http_address)[1])
    assert "no local fleet" in _cli("down", env=env).stdout
    log = (tmp_path / "local-fleet.log").read_text()
    assert "redis://:***@127.0.0.1:" in log
    for text in outputs + [down.stdout, log]:
        assert password not in text and "cli-test-token" not in text


def test_bad_setting_is_named_on_the_command_line(tmp_path):
    env = {**os.environ, "MOEFLEET_CACHE": str(tmp_path)}
    r = _cli("up", "--workers", "0", env=env, timeout=60)
    assert r.returncode == 2
    assert "num_workers" in r.stderr
    r = _cli("inspect", "--checkpoint", str(tmp_path), env=env, timeout=60)
    assert r.returncode == 2 and "config.json is missing" in r.stderr
