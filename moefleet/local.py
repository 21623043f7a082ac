"""Local mode: a whole fleet on one machine — Ray on loopback, Redis, workers, routers, the controller.

``LocalFleet(config).start()`` returns the router's gRPC address. It joins a
Ray instance already initialised in this process (tests, notebooks) or starts
one bound to 127.0.0.1, starts its own ``redis-server`` on loopback when no
Redis URL is configured (and starts it again if it dies), and runs the
controller beside workers and routers unless ``config.static``, and serves the
fleet's telemetry endpoint (``/metrics``, the dashboard, ``/api/state``) on
127.0.0.1:``config.http_port`` from this process.

A worker owns its device. On a machine with a GPU per worker, each worker asks
Ray for one GPU. On a CPU machine each worker owns a disjoint set of cores
(``assign_cores``: ``cores // workers`` each, in order; every thread of the
worker process is pinned to them and torch runs as many threads), so a busy
worker cannot borrow an idle one's core: load imbalance costs what it costs on
GPUs, and balancing it pays. Routers and the controller run on the cores no
worker owns, or on all of them when every core is owned.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from moefleet.core.config import FleetConfig
from moefleet.core.default_model import default_model_dir
from moefleet.core.model import MoECheckpoint
from moefleet.core.placement import (
    DeviceSpec, Placement, assign_cores, proportional_placement, spread_placement, worker_actor_name,
)
from moefleet.core.processes import serving_runtime_env
from moefleet.core.redis_server import RedisServer, free_port
from moefleet.core.state import StateStore
from moefleet.router_service.actor import router_actor_class

log = logging.getLogger(__name__)

ROUTER_PREFIX = "moefleet-router:"
CONTROLLER_NAME = "moefleet-controller"
LOCAL_CONTROLLER_DEFAULTS = dict(
    interval_s=1.0, health_interval_s=0.25, lease_ttl_s=3.0, load_window_s=1.0, load_windows=6, load_half_life_s=2.0,
    min_tokens=50.0, drain_timeout_s=10.0,
    horizon_s=30.0, cooldown_s=4.0, confirm_steps=2,
    copy_bytes_per_s=1e9, load_bytes_per_s=1e10, rebalance_overhead_s=0.4,
)
"""Local mode reacts within seconds: a step a second over a few seconds of decayed load; a plan must win three steps
in a row (a second apart), then no other for four seconds. A move costs what one does here: weights read from the
checkpoint file at about 1 GB/s, copied in memory at about 10 GB/s, 0.4 s of publish, drain and unload (measured:
0.35-0.44 s for a rebalance of six copies); the controller corrects these from each rebalance it times."""


def _local_cuda_devices() -> int:
    """CUDA devices this machine really has (Ray's GPU count may include declared, fake ones)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def init_local_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Start (or join) Ray with every server on loopback.

    Without ``address`` a new local instance starts (``address="local"``), even where ``ray start`` left a
    cluster running on this machine: plain ``ray.init()`` would join that one (and refuse ``num_cpus``)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    _keep_ray_token_private()


def _keep_ray_token_private() -> None:
    """Ray (2.60) writes the token of a local cluster to ~/.ray/auth_token readable by every user: make it 0600."""
    token = Path.home() / ".ray" / "auth_token"
    try:
        if token.is_file() and token.stat().st_mode & 0o077:
            token.chmod(0o600)
    except OSError as e:  # not ours to fix (another owner): say so
        log.warning("cannot restrict %s to its owner: %s", token, e.strerror)


def available_cores() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


@dataclass
class LocalFleet:
    """Workers, routers and the controller of one fleet, started in the current Ray instance."""

    config: FleetConfig = field(default_factory=FleetConfig)
    ray_address: str | None = None
    worker_node_id: str | None = None
    """Start the workers and routers on this Ray node (its id); None lets Ray choose. On a multi-node Ray
    (the test suite's) it keeps a fleet beside its caller, as local mode is on one machine."""

    def _on_node(self) -> dict:
        if not self.worker_node_id:
            return {}
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(self.worker_node_id, soft=False)}

    def __post_init__(self):
        self.redis: RedisServer | None = None
        self.workers: dict[str, object] = {}
        self.routers: list[object] = []
        self.addresses: list[str] = []
        self.controller = None
        self.checkpoint = str(self.config.checkpoint or default_model_dir())
        self.devices: list[DeviceSpec] = []
        self.router_cores: tuple[int, ...] = ()
        self._supervise_stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.http = None  # the telemetry endpoint (controller/http.py), once started

    @property
    def redis_url(self) -> str:
        return self.config.redis_url or self.redis.url

    @property
    def address(self) -> str:
        return self.addresses[0]

    # -- devices -----------------------------------------------------------
    def local_devices(self) -> list[DeviceSpec]:
        """The fleet's devices: a GPU each when the machine has one per worker, else a set of cores each;
        with ``config.emulate``, the emulated devices it names (``emulated_devices``)."""
        if self.config.emulate:
            return self.emulated_devices()
        spec = MoECheckpoint(self.checkpoint).spec
        per_expert = spec.layer.expert_params * 4
        n = self.config.num_workers
        total = per_expert * spec.layer.num_experts * len(spec.moe_layers)
        # room for every expert twice over the fleet (replicas; or a dead worker's experts on the survivors)
        copies = 2 if self.config.min_replicas == "auto" else max(2, self.config.min_replicas)
        memory = max(int(copies * total / max(n - 1, 1) / 0.9) + per_expert, per_expert * 4)
        if self.config.worker.num_gpus or _local_cuda_devices() >= n:
            return [
                DeviceSpec(device_id=f"worker-{i}", node_id="local", kind="gpu", accelerator_type="local-gpu", memory_bytes=memory)
                for i in range(n)
            ]
        cores, self.router_cores = (None, ()) if not self.config.pin_cores else assign_cores(n, available_cores())
        return [
            DeviceSpec(device_id=f"worker-{i}", node_id="local", kind="gpu", accelerator_type="local-cpu", memory_bytes=memory,
                       cpus=None if cores is None else cores[i])
            for i in range(n)
        ]

    def emulated_devices(self) -> list[DeviceSpec]:
        """``config.emulate``'s devices: the simulator's device catalogue timed for the checkpoint's expert shape
        (or ``config.emulate_model``'s), ids ``h100-0``, ``l4-3``, ... Each worker computes on the CPU, owns no
        core, takes its device's modelled time per call times ``config.emulate_slowdown`` and holds what that
        device's memory holds."""
        from moefleet.controller.sim.devices import MODEL_SHAPES, ExpertShape, emulated_specs

        spec = MoECheckpoint(self.checkpoint).spec
        dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}
        held = spec.layer.expert_params * dtype_bytes[self.config.worker.dtype or spec.dtype]
        if self.config.emulate_model:
            shape = MODEL_SHAPES[self.config.emulate_model][0]
        else:
            shape = ExpertShape(spec.layer.hidden_size, spec.layer.intermediate_size, spec.layer.expert_kind == "gated",
                                dtype_bytes[spec.dtype])
        return emulated_specs(self.config.emulate, shape, simulated_layers=len(spec.moe_layers), fleet_expert_bytes=held,
                              slowdown=self.config.emulate_slowdown)

    def controller_config(self, device_memory_bytes: int | None = None, **overrides):
        """The local controller's config: this fleet's devices as a static inventory, local defaults.

        Local workers on a CPU machine stand in for the GPU tier: they are
        ``kind='gpu'`` devices of accelerator type 'local-cpu'; ``local=True``
        keeps the reconciler from asking Ray for GPUs and has it pin restarted
        workers to the device's cores.
        """
        from moefleet.controller.main import ControllerConfig
        from moefleet.controller.planner import PlannerKnobs

        devices = self.devices or self.local_devices()
        if device_memory_bytes:
            devices = [d.model_copy(update={"memory_bytes": device_memory_bytes}) for d in devices]
        cfg = dict(
            LOCAL_CONTROLLER_DEFAULTS, checkpoint=self.checkpoint, redis_url=self.redis_url, namespace=self.config.namespace,
            ray_address=None, devices=devices, local=True,
            worker=self.worker_config(devices[0].cpus if devices else None, emulated=bool(self.config.emulate)),
            planner=PlannerKnobs(min_replicas=self.config.min_replicas, min_gain=0.05),
        )
        cfg.update(self.config.controller)
        cfg.update(overrides)
        return ControllerConfig(**cfg)

    # -- lifecycle -----------------------------------------------------------
    def start(self, placement: Placement | None = None) -> str:
        import ray

        init_local_ray(address=self.ray_address)
        if self.config.redis_url is None and self.redis is None:
            self.redis = RedisServer()
        self.store = StateStore(self.redis_url, namespace=self.config.namespace)
        spec = MoECheckpoint(self.checkpoint).spec
        self.devices = self.local_devices()
        if placement is None and self.config.emulate:  # heterogeneous: shares by speed, within each device's memory
            held = spec.layer.expert_params * {"float32": 4, "bfloat16": 2, "float16": 2}[self.config.worker.dtype or spec.dtype]
            placement = proportional_placement(list(spec.moe_layers), spec.layer.num_experts, self.devices, held)
        if placement is None:
            ids = [d.device_id for d in self.devices]
            placement = spread_placement(list(spec.moe_layers), spec.layer.num_experts, ids)
        self.start_workers(placement)
        current = self.store.placement_version()
        self.placement = self.store.publish_placement(placement.model_copy(update={"version": current}), expected_version=current)
        cls = router_actor_class()
        rc = self.config.router
        self.routers = []
        for i in range(self.config.num_routers):
            router_cfg = rc.model_dump()
            # a fixed port: a router Ray restarts after its process died serves again where clients look for it
            router_cfg["port"] = rc.port + i if rc.port else free_port()
            self.routers.append(
                cls.options(
                    name=f"{ROUTER_PREFIX}{i}", namespace=self.config.namespace, num_cpus=0, runtime_env=serving_runtime_env(),
                    **self._on_node(),
                    max_restarts=-1,
                ).remote(
                    self.checkpoint, router_cfg, self.redis_url, self.config.namespace, f"router-{i}", self.config.worker.dtype
                )
            )
        self.addresses = ray.get([r.start.remote() for r in self.routers])
        if not self.config.static:
            self.start_controller()
        self.start_http()
        if self.redis is not None:
            self._supervisor = threading.Thread(target=self._supervise_redis, name="moefleet-redis-supervisor", daemon=True)
            self._supervisor.start()
        log.info("fleet up: %d workers, routers at %s, controller %s", len(self.workers), self.addresses,
                 "off (static)" if self.config.static else "on")
        return self.addresses[0]

    def start_workers(self, placement: Placement, resources: dict[str, dict[str, float]] | None = None) -> None:
        """Start one ExpertGroup worker per device of ``placement`` (not yet running), and wait until ready."""
        import ray

        from moefleet.expert_workers.launch import start_worker

        by_id = {d.device_id: d for d in self.devices}
        gpu = not self.config.emulate and (self.config.worker.num_gpus or (_local_cuda_devices() >= len(placement.assignments)))
        new = {}
        for device_id, keys in placement.assignments.items():
            if device_id in self.workers:
                continue
            dev = by_id.get(device_id)
            cpus = None if gpu or dev is None else dev.cpus
            emulated = None if dev is None else dev.emulated
            new[device_id] = start_worker(
                device_id, self.checkpoint, [tuple(k) for k in keys], self.config.namespace,
                self.worker_config(cpus, emulated=emulated is not None), emulate=emulated,
                cpus=cpus, redis_url=self.redis_url, num_gpus=1 if gpu and not self.config.worker.num_gpus else None,
                memory_bytes=None if dev is None else dev.memory_bytes,
                resources=(resources or {}).get(device_id), detached=False, node_id=self.worker_node_id,
            )
        refs = {d: w.ready.remote() for d, w in new.items()}
        ready, waiting = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.config.start_timeout_s)
        if waiting:
            stuck = sorted(d for d, r in refs.items() if r in waiting)
            raise RuntimeError(
                f"workers {stuck} did not start within {self.config.start_timeout_s:.0f}s; Ray has "
                f"{ray.cluster_resources().get('CPU', 0):.0f} CPUs and {ray.available_resources().get('CPU', 0):.0f} free "
                f"(each worker reserves worker.num_cpus={self.config.worker.num_cpus}, worker.num_gpus={self.config.worker.num_gpus})"
            )
        ray.get(ready)
        self.workers.update(new)

    def worker_config(self, cpus=None, emulated: bool = False):
        """A worker that owns pinned cores reserves none of Ray's CPUs (its cores are its own by affinity); an
        emulated one none either (its device's time is modelled, not its cores')."""
        return self.config.worker.model_copy(update={"num_cpus": 0}) if cpus or emulated else self.config.worker

    def start_controller(self, **overrides):
        """Start the controller as a Ray actor (Ray restarts it if its process dies); returns its handle."""
        from moefleet.controller.main import controller_actor_class

        cfg = self.controller_config(**overrides)
        self.controller = controller_actor_class().options(
            name=CONTROLLER_NAME, namespace=self.config.namespace, get_if_exists=True
        ).remote(cfg.model_dump(mode="json"), f"local-controller-{os.getpid()}")
        return self.controller

    # -- telemetry endpoint: reads only the store, so it runs here beside the fleet --------------
    @property
    def http_address(self) -> str | None:
        """'127.0.0.1:port' of the telemetry endpoint (None when ``http_port`` is None)."""
        return None if self.http is None else self.http.address

    def start_http(self) -> str | None:
        """Serve /metrics, the dashboard and /api/state on 127.0.0.1:``config.http_port`` (skipped when None)."""
        from moefleet.controller.http import TelemetryServer
        from moefleet.controller.telemetry import TelemetryConfig

        if self.config.http_port is None or self.http is not None:
            return self.http_address
        telemetry = TelemetryConfig(**{"window_s": self.config.router.load_window_s, **self.config.telemetry})
        try:
            self.http = TelemetryServer(self.store, telemetry, "127.0.0.1", self.config.http_port)
            return self.http.start()
        except OSError as e:
            self.http = None
            raise OSError(e.errno, f"{e.strerror}: set http_port (moe-fleet up --http-port) to a free port, "
                                   "or 0 for any") from e

    def stop_http(self) -> None:
        if self.http is not None:
            self.http.stop()
            self.http = None

    def _supervise_redis(self) -> None:
        """Local mode owns its redis-server: start it again (same port, empty) if it dies."""
        while not self._supervise_stop.wait(0.2):
            if self.redis is not None and self.redis.exited():
                log.warning("local redis-server exited; starting it again on port %d", self.redis.port)
                try:
                    self.redis.restart()
                    log.info("local redis-server is back on port %d", self.redis.port)
                except Exception as e:  # tried again on the next tick
                    log.error("could not restart redis-server: %s", e)

    def worker(self, device_id: str):
        """The live handle of a device's worker (after a restart, the new one)."""
        import ray

        return ray.get_actor(worker_actor_name(device_id), namespace=self.config.namespace)

    def router_stats(self) -> list[dict]:
        import ray

        return ray.get([r.stats.remote() for r in self.routers])

    def worker_stats(self) -> dict[str, dict]:
        import ray

        out = {}
        for d in [dev.device_id for dev in self.devices] or list(self.workers):
            try:
                out[d] = ray.get(self.worker(d).stats.remote(), timeout=10)
            except Exception as e:  # a dead worker reports nothing
                log.warning("worker %s: no stats: %s", d, e)
        return out

    def stop(self) -> None:
        import ray

        self._supervise_stop.set()
        self.stop_http()
        if ray.is_initialized():
            if self.controller is not None:
                try:
                    ray.get(self.controller.shutdown.remote(), timeout=30)
                except Exception as e:  # it may already be gone; killed next either way
                    log.warning("controller stop: %s", e)
                ray.kill(self.controller, no_restart=True)
            for r in self.routers:
                try:
                    ray.get(r.stop.remote(), timeout=10)
                except Exception as e:  # the actor may already be gone; it is killed next either way
                    log.warning("router stop: %s", e)
                ray.kill(r)
            for d in {dev.device_id for dev in self.devices} | set(self.workers):
                try:
                    ray.kill(self.worker(d))  # the current actor of the name (a restarted one included)
                except ValueError:
                    pass
            for w in self.workers.values():
                ray.kill(w)
        self.routers, self.workers, self.controller = [], {}, None
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


def read_local_state() -> dict | None:
    """The running local fleet's state file (address, Redis URL, Ray address, namespace, ...), or None when none runs."""
    import json

    f = state_file()
    if not f.is_file():
        return None
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(state.get("pid", -1)), 0)
    except (OSError, ValueError, TypeError):
        return None
    return state
