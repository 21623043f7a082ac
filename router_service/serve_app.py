"""The fleet as a Ray Serve application, for clusters (``serve deploy``, KubeRay ``serveConfigV2``).

``build_app(args)`` returns an application whose ingress, ``FleetIngress``,
owns the same ``RouterCore`` as the grpc.aio router actor; on first start it
creates the expert workers (detached, named actors, so a replica restart finds
them) and publishes a starting placement unless Redis already holds one.

The API reaches clients through the replica's own grpc.aio ``RouterServer`` on
``router.host:router.port`` (``serve_grpc``, the default): the same server as
local mode, with its TLS / mutual TLS, bearer token, admission limits and
stream flow control. Ray Serve 2.60's gRPC proxy cannot speak TLS (it binds
``[::]:PORT`` with ``add_insecure_port``), so cluster configs do not use it;
it can still carry the API (register ``SERVICER_FUNCTIONS`` in the Serve
config's ``grpc_options``), and then the methods below check the same token.
"""

from __future__ import annotations

import logging

import grpc
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from moefleet.core.config import RouterConfig, WorkerConfig

log = logging.getLogger(__name__)

SERVICER_FUNCTION = "moefleet.router_service.server.add_moefleet_servicer"
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
    serve_grpc: bool = Field(
        default=True,
        description="Serve the API from this replica's own gRPC server on router.host:router.port (TLS, token, limits).",
    )

    def resolved_redis_url(self) -> str:
        from moefleet.core.state import resolve_redis_url

        return resolve_redis_url(self.redis_url)


HEAD_NODE_RESOURCE = "node:__internal_head__"
"""Ray's resource of the head node (Serve pins its own controller with it): the ingress, and so the
fleet's gRPC port, lives on the head, where the cluster's Service and the guide send clients."""


@serve.deployment(ray_actor_options={"num_cpus": 0.5, "resources": {HEAD_NODE_RESOURCE: 0.001}})
class FleetIngress:
    """Serve ingress: the router's serving path, on its own gRPC server (``serve_grpc``) or behind Serve's gRPC proxy."""

    async def __init__(self, args: dict):
        import asyncio

        from moefleet.core.default_model import default_model_dir
        from moefleet.core.model import MoECheckpoint
        from moefleet.core.placement import spread_placement
        from moefleet.core.state import StateStore
        from moefleet.expert_workers.group import expert_group_actor_class

        from . import security
        from .router import RouterCore
        from .server import MoEFleetServicer, RouterServer
        from .transport import RayTransport, worker_actor_name

        self.args = ServeAppArgs(**args)
        # Fail before touching the cluster when the router could not start securely (no token where one is required).
        self.token = security.resolve_token(self.args.router)
        checkpoint = str(self.args.checkpoint or default_model_dir())
        self.store = StateStore(self.args.resolved_redis_url(), namespace=self.args.namespace)
        placement = self.store.get_placement()
        if placement is None:
            spec = MoECheckpoint(checkpoint).spec
            ids = [f"worker-{i}" for i in range(self.args.num_workers)]
            placement = spread_placement(list(spec.moe_layers), spec.layer.num_experts, ids)
        wc = self.args.worker
        cls = expert_group_actor_class()
        handles = [
            cls.options(
                name=worker_actor_name(d), namespace=self.args.namespace, lifetime="detached", get_if_exists=True,
                num_cpus=wc.num_cpus, num_gpus=wc.num_gpus, resources=wc.resources, max_concurrency=wc.max_concurrency,
            ).remote(d, checkpoint, [tuple(k) for k in keys], dtype=wc.dtype, backend=wc.backend)
            for d, keys in placement.assignments.items()
        ]
        await asyncio.gather(*(h.ready.remote() for h in handles))
        if self.store.placement_version() == 0:
            placement = self.store.publish_placement(placement, expected_version=0)
        self.core = RouterCore(checkpoint, self.args.router, RayTransport(self.args.namespace), dtype=wc.dtype)
        self.core.set_placement(self.store.get_placement() or placement)
        self.servicer = MoEFleetServicer(self.core)
        self.server = RouterServer(self.core, self.args.router) if self.args.serve_grpc else None
        if self.server is not None:
            await self.server.start()

        def on_placement(p):
            self.core.set_placement(p)
            if self.server is not None:
                asyncio.ensure_future(self.server.set_serving(self.core.ready()))

        loop = asyncio.get_running_loop()
        self._watch = self.store.watch_placement(
            lambda p: loop.call_soon_threadsafe(on_placement, p), since_version=self.core.placement.version
        )

    def _refusal(self, grpc_context):
        """A RequestError when the call through Serve's gRPC proxy lacks the token; None when it may proceed."""
        from . import security
        from .router import RequestError

        if self.token is None:
            return None
        metadata = grpc_context.invocation_metadata() if grpc_context is not None else ()
        why = security.check_bearer(metadata, self.token)
        return None if why is None else RequestError(grpc.StatusCode.UNAUTHENTICATED, why)

    async def Forward(self, request, grpc_context=None):
        from .proto import fleet_pb2 as pb
        from .router import RequestError
        from .server import error_reply

        try:
            refused = self._refusal(grpc_context)
            if refused:
                raise refused
            return await self.servicer._serve(request, None)
        except RequestError as e:
            if grpc_context is not None:
                grpc_context.set_code(e.code)
                grpc_context.set_details(e.message)
            request_id = request.request_id if isinstance(request, pb.ForwardRequest) else ""
            return error_reply(request_id, e)

    async def ForwardStream(self, request_stream, grpc_context=None):
        refused = self._refusal(grpc_context)
        if refused:
            from .server import error_reply

            yield error_reply("", refused)
            return
        async for reply in self.servicer.stream(request_stream, None):
            yield reply

    async def GetPlacement(self, request, grpc_context=None):
        refused = self._refusal(grpc_context)
        if refused and grpc_context is not None:
            grpc_context.set_code(refused.code)
            grpc_context.set_details(refused.message)
            from .proto import fleet_pb2 as pb

            return pb.GetPlacementResponse()
        return await self.servicer.GetPlacement(request, grpc_context)

    async def Check(self, request, grpc_context=None):
        """``grpc.health.v1.Health/Check`` through Serve's proxy: SERVING once every expert has a replica."""
        from grpc_health.v1 import health_pb2

        ok = self.core.ready()
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    def check_health(self) -> None:
        if not self.core.ready():
            raise RuntimeError("placement incomplete: some expert has no replica")

    async def __del__(self):
        if self.server is not None:
            await self.server.stop()


def build_app(args: dict):
    """Application builder for ``serve run`` / ``serveConfigV2``: ``import_path: moefleet.router_service.serve_app:build_app``."""
    ServeAppArgs(**args)  # fail at deploy time, naming the bad field
    return FleetIngress.bind(args)
