"""The chaos suite, short: a worker SIGKILLed with two replicas of every expert, the router actor SIGKILLed,
and Redis FLUSHALL, each under steady load on a local fleet, every answer checked and every request
accounted for (``benchmarks/bench_chaos.py`` runs every scenario, longer, and reports the figures).

Bounded: each scenario runs a few seconds of load around its fault; clients give up on a call after 20 s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def chaos(tmp_path_factory, ray_cluster):
    import bench_chaos

    from moefleet import MoEModel

    path = bench_chaos.checkpoint(str(tmp_path_factory.mktemp("chaos")), hidden=256, ffn=512)
    args = bench_chaos.parse_args(["--before", "2", "--after", "3", "--clients", "2", "--tokens", "16"])
    return bench_chaos, path, MoEModel.from_pretrained(path, backend="torch"), args


def test_a_worker_killed_with_two_replicas_of_every_expert_fails_nothing(chaos):
    bench, path, model, args = chaos
    r = bench.run_scenario("worker_sigkill_min2", path, model, args)
    assert r["answered_after_fault"] > 0 and r["repaired_after_s"] is not None, r
    assert (r["failed"], r["wrong"], r["lost"]) == (0, 0, 0), r


def test_a_killed_router_actor_comes_back_on_its_address_and_loses_nothing(chaos):
    bench, path, model, args = chaos
    r = bench.run_scenario("router_sigkill", path, model, args)
    assert r["router_back_after_s"] is not None and r["answered_after_fault"] > 0, r
    assert (r["wrong"], r["lost"]) == (0, 0), r  # calls open on the killed process fail (UNAVAILABLE): none is lost
    assert set(r["failed_codes"]) <= {"UNAVAILABLE"}, r


def test_redis_flushall_under_load_fails_nothing_and_the_placement_comes_back(chaos):
    bench, path, model, args = chaos
    r = bench.run_scenario("redis_flushall", path, model, args)
    assert r["placement_republished_after_s"] is not None and r["routers_followed"], r
    assert (r["failed"], r["wrong"], r["lost"]) == (0, 0, 0), r
