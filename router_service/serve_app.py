"""The fleet as a Ray Serve application, for clusters (``serve deploy``, KubeRay ``serveConfigV2``).

``build_app(args)`` returns an application whose ingress, ``FleetIngress``,
serves the ``moefleet.v1.MoEFleet`` API through Serve's gRPC proxy (register
``moefleet.router_service.proto.fleet_pb2_grpc.add_MoEFleetServicer_to_server``
in the Serve config's ``grpc_options``, with the standard health service:
``SERVICER_FUNCTIONS``). The ingress owns the same
``RouterCore`` as the grpc.aio router actor; on first start it creates the
expert workers (detached, named actors, so a replica restart finds them) and
publishes a starting placement unless Redis already holds one.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from moefleet.core.config import RouterConfig, WorkerConfig
from moefleet.core.processes import serving_runtime_env

log = logging.getLogger(__name__)

SERVICER_FUNCTION = "moefleet.router_service.proto.fleet_pb2_grpc.add_MoEFleetServicer_to_server"
HEALTH_SERVICER_FUNCTION = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
SERVICER_FUNCTIONS = [SERVICER_FUNCTION, HEALTH_SERVICER_FUNCTION]


class ServeAppArgs(BaseModel):
    """Arguments of ``build_app`` (the ``args`` of the Serve config's application)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(default=None, description="Checkpoint directory on every node; None for the built-in model.")
    num_workers: int = Field(default=2, gt=0, description="Workers of the starting placement.")
    redis_url: str | None = Field(default=None, description="Redis URL; default the MOEFLEET_REDIS_URL environment variable.")
    namespace: str = Field(default="moefleet", description="Ray namespace and Redis key prefix.")
    router: RouterConfig = Field(default_factory=RouterConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)

    def resolved_redis_url(self) -> str:
        from moefleet.core.state import resolve_redis_url

        return resolve_redis_url(self.redis_url)


@serve.deployment(ray_actor_options={"num_cpus": 0.5, "runtime_env": serving_runtime_env()})
class FleetIngress:
    """Serve ingress: the router's serving path behind Serve's gRPC proxy."""

    def __init__(self, args: dict):
        import uuid

        import ray

        from moefleet.core.default_model import default_model_dir
        from moefleet.core.model import MoECheckpoint
        from moefleet.core.placement import spread_placement
        from moefleet.core.state import StateStore
        from moefleet.expert_workers.launch import start_worker

        from .router import RouterCore
        from .server import MoEFleetServicer
        from .transport import RayTransport

        self.args = ServeAppArgs(**args)
        checkpoint = str(self.args.checkpoint or default_model_dir())
        redis_url = self.args.resolved_redis_url()
        self.store = StateStore(redis_url, namespace=self.args.namespace, socket_timeout_s=1.0)
        placement = self.store.get_placement()
        if placement is None:
            spec = MoECheckpoint(checkpoint).spec
            ids = [f"worker-{i}" for i in range(self.args.num_workers)]
            placement = spread_placement(list(spec.moe_layers), spec.layer.num_experts, ids)
        wc = self.args.worker
        handles = [
            start_worker(d, checkpoint, keys, self.args.namespace, wc, redis_url=redis_url)
            for d, keys in placement.assignments.items()
        ]
        ray.get([h.ready.remote() for h in handles])
        if self.store.placement_version() == 0:
            placement = self.store.publish_placement(placement, expected_version=0)
        self.core = RouterCore(checkpoint, self.args.router, RayTransport(self.args.namespace), dtype=wc.dtype)
        self.core.set_placement(self.store.get_placement() or placement)
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica (a test driving the class directly)
            replica = uuid.uuid4().hex[:8]
        self.ingress_id = f"ingress-{replica}"
        self.runtime = None
        self.servicer = MoEFleetServicer(self.core)

    async def _ensure_runtime(self) -> None:
        """Start the placement watch, heartbeats and telemetry in the serving event loop (once)."""
        if self.runtime is None:
            from .runtime import RouterRuntime

            self.runtime = RouterRuntime(self.core, self.store, self.ingress_id, kind="ingress")
            self.runtime.start()
            try:
                await self.runtime.heartbeat()
            except Exception as e:  # Redis down: the runtime keeps trying
                log.warning("ingress %s: first heartbeat failed: %s", self.ingress_id, e)

    async def Forward(self, request, grpc_context=None):
        from .router import RequestError

        await self._ensure_runtime()
        try:
            return await self.servicer._serve(request, None)
        except RequestError as e:
            if grpc_context is not None:
                grpc_context.set_code(e.code)
                grpc_context.set_details(e.message)
            from .proto import fleet_pb2 as pb

            return pb.ForwardResponse(request_id=request.request_id, error_code=e.code.value[0], error_message=e.message)

    async def ForwardStream(self, request_stream, grpc_context=None):
        await self._ensure_runtime()
        async for reply in self.servicer.stream(request_stream, None):
            yield reply

    async def GetPlacement(self, request, grpc_context=None):
        return await self.servicer.GetPlacement(request, grpc_context)

    async def Check(self, request, grpc_context=None):
        """``grpc.health.v1.Health/Check`` through Serve's proxy: SERVING once every expert has a replica."""
        from grpc_health.v1 import health_pb2

        ok = self.core.ready()
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def check_health(self) -> None:
        await self._ensure_runtime()  # Serve calls this periodically from the replica's loop: the runtime starts early
        if not self.core.ready():
            raise RuntimeError("placement incomplete: some expert has no replica")


def build_app(args: dict):
    """Application builder for ``serve run`` / ``serveConfigV2``: ``import_path: moefleet.router_service.serve_app:build_app``."""
    ServeAppArgs(**args)  # fail at deploy time, naming the bad field
    return FleetIngress.bind(args)
