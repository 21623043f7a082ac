"""Local mode: a whole fleet on one machine — Ray on loopback, Redis, workers, router.

``LocalFleet(config).start()`` returns the router's gRPC address. It joins a
Ray instance already initialised in this process (tests, notebooks) or starts
one bound to 127.0.0.1, and starts its own ``redis-server`` on loopback when
no Redis URL is configured.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from moefleet.core.config import FleetConfig
from moefleet.core.default_model import default_model_dir
from moefleet.core.model import MoECheckpoint
from moefleet.core.placement import Placement, spread_placement
from moefleet.core.redis_server import RedisServer
from moefleet.core.state import StateStore
from moefleet.expert_workers.group import expert_group_actor_class
from moefleet.router_service.actor import router_actor_class
from moefleet.router_service.transport import worker_actor_name

log = logging.getLogger(__name__)

ROUTER_PREFIX = "moefleet-router:"


def _local_cuda_devices() -> int:
    """CUDA devices this machine really has (Ray's GPU count may include declared, fake ones)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def init_local_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Start (or join) Ray with every server on loopback."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    _keep_ray_token_private()


def _keep_ray_token_private() -> None:
    """Ray (2.60) writes the token of a local cluster to ~/.ray/auth_token readable by every user: make it 0600."""
    token = Path.home() / ".ray" / "auth_token"
    try:
        if token.is_file() and token.stat().st_mode & 0o077:
            token.chmod(0o600)
    except OSError as e:  # not ours to fix (another owner): say so
        log.warning("cannot restrict %s to its owner: %s", token, e.strerror)


@dataclass
class LocalFleet:
    """Workers and routers of one fleet, started in the current Ray instance."""

    config: FleetConfig = field(default_factory=FleetConfig)
    ray_address: str | None = None

    def __post_init__(self):
        self.redis: RedisServer | None = None
        self.workers: dict[str, object] = {}
        self.routers: list[object] = []
        self.addresses: list[str] = []
        self.checkpoint = str(self.config.checkpoint or default_model_dir())

    @property
    def redis_url(self) -> str:
        return self.config.redis_url or self.redis.url

    @property
    def address(self) -> str:
        return self.addresses[0]

    def start(self, placement: Placement | None = None) -> str:
        import ray

        init_local_ray(address=self.ray_address)
        if self.config.redis_url is None and self.redis is None:
            self.redis = RedisServer()
        self.store = StateStore(self.redis_url, namespace=self.config.namespace)
        spec = MoECheckpoint(self.checkpoint).spec
        if placement is None:
            ids = [f"worker-{i}" for i in range(self.config.num_workers)]
            placement = spread_placement(list(spec.moe_layers), spec.layer.num_experts, ids)
        self.start_workers(placement)
        current = self.store.placement_version()
        self.placement = self.store.publish_placement(placement.model_copy(update={"version": current}), expected_version=current)
        cls = router_actor_class()
        rc = self.config.router
        self.routers = []
        for i in range(self.config.num_routers):
            router_cfg = rc.model_dump()
            if rc.port and i:
                router_cfg["port"] = rc.port + i
            self.routers.append(
                cls.options(name=f"{ROUTER_PREFIX}{i}", namespace=self.config.namespace, num_cpus=0).remote(
                    self.checkpoint, router_cfg, self.redis_url, self.config.namespace, f"router-{i}", self.config.worker.dtype
                )
            )
        self.addresses = ray.get([r.start.remote() for r in self.routers])
        log.info("fleet up: %d workers, routers at %s", len(self.workers), self.addresses)
        return self.addresses[0]

    def start_workers(self, placement: Placement, resources: dict[str, dict[str, float]] | None = None) -> None:
        """Start one ExpertGroup actor per device of ``placement`` (not yet running), and wait until ready."""
        import ray

        cls = expert_group_actor_class()
        wc = self.config.worker
        num_gpus = wc.num_gpus
        if not num_gpus and _local_cuda_devices() >= len(placement.assignments):
            num_gpus = 1  # a GPU per worker when this machine has enough: workers then run the Triton path
            log.info("local fleet: one GPU per worker")
        new = {}
        for device_id, keys in placement.assignments.items():
            if device_id in self.workers:
                continue
            opts = dict(
                name=worker_actor_name(device_id), namespace=self.config.namespace, get_if_exists=True, num_cpus=wc.num_cpus,
                num_gpus=num_gpus, max_concurrency=wc.max_concurrency,
                resources={**wc.resources, **((resources or {}).get(device_id, {}))},
            )
            new[device_id] = cls.options(**opts).remote(
                device_id, self.checkpoint, [tuple(k) for k in keys], dtype=wc.dtype, backend=wc.backend
            )
        ray.get([w.ready.remote() for w in new.values()])
        self.workers.update(new)

    def controller_config(self, device_memory_bytes: int | None = None, **overrides):
        """A ControllerConfig for this fleet: its workers as a static inventory.

        Local mode's workers are CPU processes standing in for the GPU tier, so
        they are declared as ``kind='gpu'`` devices of accelerator type
        'local-cpu' (the planner balances load over that tier); ``local=True``
        keeps the reconciler from asking Ray for GPUs.
        device_memory_bytes: expert memory per worker; default room for twice
        its even share of experts, so hot experts can be replicated.
        """
        from moefleet.controller.main import ControllerConfig
        from moefleet.core.placement import DeviceSpec

        spec = MoECheckpoint(self.checkpoint).spec
        per_expert = spec.layer.expert_params * 4
        n = self.config.num_workers
        total = per_expert * spec.layer.num_experts * len(spec.moe_layers)
        memory = device_memory_bytes or int(2 * total / n / 0.9) + per_expert
        devices = [
            DeviceSpec(device_id=f"worker-{i}", node_id="local", kind="gpu", accelerator_type="local-cpu", memory_bytes=memory)
            for i in range(n)
        ]
        cfg = dict(
            checkpoint=self.checkpoint, redis_url=self.redis_url, namespace=self.config.namespace, ray_address=None,
            devices=devices, worker=self.config.worker, local=True,
        )
        cfg.update(overrides)
        return ControllerConfig(**cfg)

    def router_stats(self) -> list[dict]:
        import ray

        return ray.get([r.stats.remote() for r in self.routers])

    def worker_stats(self) -> dict[str, dict]:
        import ray

        ids = list(self.workers)
        return dict(zip(ids, ray.get([self.workers[i].stats.remote() for i in ids])))

    def stop(self) -> None:
        import ray

        if ray.is_initialized():
            for r in self.routers:
                try:
                    ray.get(r.stop.remote(), timeout=10)
                except Exception as e:  # the actor may already be gone; it is killed next either way
                    log.warning("router stop: %s", e)
                ray.kill(r)
            for w in self.workers.values():
                ray.kill(w)
        self.routers, self.workers = [], {}
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> "LocalFleet":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def state_file() -> Path:
    from moefleet.core.default_model import cache_root

    return cache_root() / "local-fleet.json"
