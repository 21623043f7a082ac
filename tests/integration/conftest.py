"""Integration fixtures: real services, started once per session.

Kept import-light: nothing heavy (Ray, torch) at module level; each fixture
imports what it starts.
"""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free 127.0.0.1 port, no persistence, for the whole session."""
    from moefleet.core.redis_server import RedisServer

    with RedisServer() as server:
        yield server


@pytest.fixture
def store(redis_server):
    """A StateStore on the session's Redis, in a namespace of its own (nothing leaks between tests)."""
    from moefleet.core.state import StateStore

    s = StateStore(redis_server.url, namespace=f"test-{uuid.uuid4().hex[:12]}")
    yield s
    s.close()


# Node types of the session's multi-node Ray: custom resources the tests place workers by.
NODE_TYPES = {"node_a": 2, "node_b": 2, "node_c": 2}


@pytest.fixture(scope="session")
def ray_cluster():
    """One multi-node Ray for the whole session, every server on loopback.

    A head node plus three worker nodes, each carrying a custom resource of its
    own (``node_a``, ``node_b``, ``node_c``), built with ``ray.cluster_utils.Cluster``.
    """
    import os

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    for name, cpus in NODE_TYPES.items():
        cluster.add_node(num_cpus=cpus, resources={name: 8})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
