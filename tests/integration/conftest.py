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


# The session's multi-node Ray: three differently-resourced nodes, declared as the
# inventory's node types (an H100 node, an L4 node, a CPU-tier node) with fake GPUs
# and fewer CPUs, plus a custom resource of their own (node_a, node_b, node_c).
TEST_NODES = {"node_a": ("h100", 2), "node_b": ("l4", 1), "node_c": ("cpu", 0)}


@pytest.fixture(scope="session")
def ray_cluster():
    """One multi-node Ray for the whole session, every server on loopback.

    A head node plus three worker nodes (``TEST_NODES``), built with
    ``ray.cluster_utils.Cluster``.
    """
    import os

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    from moefleet.controller.inventory import NODE_TYPES, custom_resources

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    for name, (node_type, gpus) in TEST_NODES.items():
        cluster.add_node(num_cpus=2, num_gpus=gpus, resources={name: 8, **custom_resources(NODE_TYPES[node_type])})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
