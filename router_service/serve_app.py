"""The fleet as a Ray Serve application, for clusters (``serve deploy``, KubeRay ``serveConfigV2``).

``build_app(args)`` returns an application whose ingress, ``FleetIngress``,
owns the same ``RouterCore`` as the grpc.aio router actor; on first start it
creates the expert workers (detached, named actors, so a replica restart finds
them) and publishes a starting placement unless Redis already holds one.

Once a controller leads, only it publishes: a replica restarted after the store
lost its table publishes nothing over the leader's (it follows what the leader
republishes); with no leader it publishes what the running workers hold.

The API reaches clients through the replica's own grpc.aio ``RouterServer`` on
``router.host:router.port`` (``serve_grpc``, the default): the same server as
local mode, with its TLS / mutual TLS, bearer token, admission limits and
stream flow control. Ray Serve 2.60's gRPC proxy cannot speak TLS (it binds
``[::]:PORT`` with ``add_insecure_port``), so cluster configs do not use it;
it can still carry the API (register ``SERVICER_FUNCTIONS`` in the Serve
config's ``grpc_options``), and then the methods below check the same token.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from moefleet.core.config import RouterConfig, WorkerConfig
from moefleet.core.processes import serving_runtime_env

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
    start_timeout_s: float = Field(
        default=120.0, gt=0,
        description="Longest wait for the starting workers; past it the replica fails naming the workers still pending.",
    )

    def resolved_redis_url(self) -> str:
        from moefleet.core.state import resolve_redis_url

        return resolve_redis_url(self.redis_url)


HEAD_NODE_RESOURCE = "node:__internal_head__"
"""Ray's resource of the head node (Serve pins its own controller with it): the ingress, and so the
fleet's gRPC port, lives on the head, where the cluster's Service and the guide send clients."""


@serve.deployment(ray_actor_options={"num_cpus": 0.5, "resources": {HEAD_NODE_RESOURCE: 0.001},
                                     "runtime_env": serving_runtime_env()})
class FleetIngress:
    """Serve ingress: the router's serving path, on its own gRPC server (``serve_grpc``) or behind Serve's gRPC proxy."""

    def __init__(self, args: dict):
        import uuid

        import ray

        from moefleet.core.default_model import default_model_dir
        from moefleet.core.model import MoECheckpoint
        from moefleet.core.placement import FLEET_DEVICES_RECORD, Placement, spread_placement, worker_actor_name
        from moefleet.core.state import LeaseLostError, StaleVersionError, StateStore
        from moefleet.expert_workers.launch import start_worker

        from . import security
        from .router import RouterCore
        from .server import MoEFleetServicer
        from .transport import RayTransport

        self.args = ServeAppArgs(**args)
        # Fail before touching the cluster when the router could not serve securely: no token where one is
        # required, TLS files that cannot be read.
        self.token = security.resolve_token(self.args.router)
        security.server_credentials(self.args.router)
        checkpoint = str(self.args.checkpoint or default_model_dir())
        redis_url = self.args.resolved_redis_url()
        self.store = StateStore(redis_url, namespace=self.args.namespace, socket_timeout_s=1.0)
        placement = self.store.get_placement()
        starting = placement is None
        if starting:
            spec = MoECheckpoint(checkpoint).spec
            ids = [f"worker-{i}" for i in range(self.args.num_workers)]
            placement = spread_placement(list(spec.moe_layers), spec.layer.num_experts, ids)
        wc = self.args.worker
        running = set()
        for d in placement.assignments:
            try:
                ray.get_actor(worker_actor_name(d), namespace=self.args.namespace)
                running.add(d)
            except ValueError:
                pass
        handles = {
            d: start_worker(d, checkpoint, keys, self.args.namespace, wc, redis_url=redis_url)
            for d, keys in placement.assignments.items()
        }
        wait_for_workers(handles, wc, self.args.start_timeout_s)
        if starting or self.store.get_record(FLEET_DEVICES_RECORD) is None:
            record_fleet_devices(self.store, handles, wc)
        if self.store.placement_version() == 0:
            if running:  # workers outlived the table (the store lost its data): what they hold is the placement
                held = dict(zip(handles, ray.get([h.experts.remote() for h in handles.values()])))
                placement = Placement(assignments={d: [tuple(k) for k in keys] for d, keys in held.items() if keys})
            try:
                placement = self.store.publish_placement(placement, expected_version=0)
            except (LeaseLostError, StaleVersionError) as e:  # the leader (or another replica) publishes
                log.info("ingress: not publishing a starting placement: %s", e)
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica (a test driving the class directly)
            replica = uuid.uuid4().hex[:8]
        self.ingress_id = f"ingress-{replica}"
        transport = RayTransport(self.args.namespace, router_key=f"router:{self.ingress_id}",
                                 compiled_graphs=self.args.router.compiled_graphs)
        self.core = RouterCore(checkpoint, self.args.router, transport, dtype=wc.dtype)
        self.core.set_placement(self.store.get_placement() or placement)
        self.runtime = None
        self.server = None
        self.servicer = MoEFleetServicer(self.core)

    async def _ensure_runtime(self) -> None:
        """Start the placement watch, heartbeats and telemetry in the serving event loop (once)."""
        if self.runtime is None:
            from .runtime import RouterRuntime

            self.runtime = RouterRuntime(self.core, self.store, self.ingress_id, kind="ingress")
            if self.args.serve_grpc:
                from .server import RouterServer

                self.server = RouterServer(self.core, self.args.router)
                await self.server.start()
                self.runtime.info["address"] = self.server.address
                self.runtime.on_placement = lambda _p: asyncio.ensure_future(self.server.set_serving(self.core.ready()))
            self.runtime.start()
            try:
                await self.runtime.heartbeat()
            except Exception as e:  # Redis down: the runtime keeps trying
                log.warning("ingress %s: first heartbeat failed: %s", self.ingress_id, e)

    def _refusal(self, grpc_context):
        """A RequestError when a call through Serve's gRPC proxy lacks the token; None when it may proceed."""
        from . import security
        from .router import RequestError

        if self.token is None:
            return None
        metadata = grpc_context.invocation_metadata() if grpc_context is not None else ()
        why = security.check_bearer(metadata, self.token)
        return None if why is None else RequestError(grpc.StatusCode.UNAUTHENTICATED, why)

    async def Forward(self, request, grpc_context=None):
        from .router import RequestError
        from .server import _request_id, error_reply

        await self._ensure_runtime()
        try:
            refused = self._refusal(grpc_context)
            if refused:
                raise refused
            return await self.servicer._serve(request, None)
        except RequestError as e:
            if grpc_context is not None:
                grpc_context.set_code(e.code)
                grpc_context.set_details(e.message)
            return error_reply(_request_id(request), e)

    async def ForwardStream(self, request_stream, grpc_context=None):
        await self._ensure_runtime()
        refused = self._refusal(grpc_context)
        if refused:
            from .server import error_reply

            yield error_reply("", refused)
            return
        async for reply in self.servicer.stream(request_stream, None):
            yield reply

    async def GetPlacement(self, request, grpc_context=None):
        """The placement, under the same token as ``Forward``: through a DeploymentHandle (no gRPC context to
        carry the token) a fleet that requires one refuses with ``RequestError`` UNAUTHENTICATED."""
        refused = self._refusal(grpc_context)
        if refused:
            if grpc_context is None:
                raise refused
            from .proto import fleet_pb2 as pb

            grpc_context.set_code(refused.code)
            grpc_context.set_details(refused.message)
            return pb.GetPlacementResponse()
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

    async def __del__(self):
        if self.server is not None:
            await self.server.stop()


def wait_for_workers(handles: dict, worker: WorkerConfig, timeout_s: float) -> None:
    """Wait until every worker answers; past ``timeout_s`` raise naming those pending and what each reserves."""
    import ray

    refs = {d: h.ready.remote() for d, h in handles.items()}
    _, waiting = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    if waiting:
        stuck = sorted(d for d, r in refs.items() if r in waiting)
        asks = {"CPU": worker.num_cpus, "GPU": worker.num_gpus, **worker.resources}
        asks_text = ", ".join(f"{k}: {v:g}" for k, v in asks.items() if v)
        free = ray.available_resources()
        free_text = ", ".join(f"{k}: {free.get(k, 0):g}" for k, v in asks.items() if v)
        raise RuntimeError(
            f"workers {stuck} did not start within {timeout_s:g}s: each reserves {{{asks_text}}} and the cluster has "
            f"{{{free_text}}} free; add nodes, deploy fewer workers, or ask less per worker (worker.num_cpus, "
            "worker.num_gpus, worker.resources)"
        )
    ray.get(list(refs.values()))


def record_fleet_devices(store, handles: dict, worker: WorkerConfig) -> None:
    """Record the started workers as the fleet's devices (``FLEET_DEVICES_RECORD``): where each runs, what it reserves."""
    import ray

    from moefleet.core.placement import FLEET_DEVICES_RECORD

    ids = sorted(handles)
    nodes = ray.get([handles[d].node_id.remote() for d in ids])
    stats = ray.get([handles[d].stats.remote() for d in ids])
    devices = {
        d: {"node_id": node, "num_cpus": worker.num_cpus, "num_gpus": worker.num_gpus, "resources": dict(worker.resources),
            "accelerator": st.get("accelerator") or {}}
        for d, node, st in zip(ids, nodes, stats)
    }
    store.put_record(FLEET_DEVICES_RECORD, {"devices": devices})


def build_app(args: dict):
    """Application builder for ``serve run`` / ``serveConfigV2``: ``import_path: moefleet.router_service.serve_app:build_app``."""
    ServeAppArgs(**args)  # fail at deploy time, naming the bad field
    return FleetIngress.bind(args)
