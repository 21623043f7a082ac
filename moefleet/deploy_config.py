"""Cluster deployment configs: the Serve config for ``serve deploy`` and what a KubeRay group declares.

Cluster-only. The Serve config below runs the fleet's application, whose
ingress replica (on the head node) serves MoE Fleet's gRPC API from its own
grpc.aio server on ``0.0.0.0:9000`` (``CLUSTER_BIND_HOST``, ``FLEET_GRPC_PORT``):
TLS / mutual TLS when ``router.tls_*`` name the files, and a bearer token,
which a router listening beyond loopback requires. Ray Serve's gRPC proxy is
not configured: Ray 2.60's binds ``[::]`` without TLS. Serve's HTTP proxy
(``0.0.0.0:8000``) stays, for KubeRay's health checks. Local mode
(``moe-fleet up``, ``make demo``, the tests) never uses this module: it serves
gRPC from ``LocalFleet`` on 127.0.0.1.

The same application runs in three places, from one definition here:

* ``serve_config(args)`` -> YAML for ``serve deploy`` on a bare Ray cluster
  (``python -m moefleet.deploy_config serve-config ...``);
* ``deploy/kuberay/rayservice.yaml``'s ``serveConfigV2`` (checked against
  ``serve_config`` by the unit tests);
* the container image's default command (``serve run`` of a generated config).

CLI::

    python -m moefleet.deploy_config serve-config --checkpoint /models/m --num-workers 1 \\
        --arg 'worker={resources: {moefleet_cpu_tier: 1}}' -o serve.yaml
    python -m moefleet.deploy_config ray-start l4 --address HEAD_IP:6379
    python -m moefleet.deploy_config node-types
    python -m moefleet.deploy_config check serve.yaml
"""

from __future__ import annotations

import argparse
import sys
from typing import Any
from urllib.parse import urlsplit

import yaml

from moefleet.controller.serve_app import APP_NAME as CONTROLLER_APP_NAME
from moefleet.controller.serve_app import IMPORT_PATH as CONTROLLER_IMPORT_PATH
from moefleet.router_service.serve_app import SERVICER_FUNCTIONS
from moefleet.controller.inventory import GIB, NODE_TYPES, NodeType, node_labels, node_resources, ray_start_command

APP_NAME = "moefleet"
APP_IMPORT_PATH = "moefleet.router_service.serve_app:build_app"
GRPC_SERVICER_FUNCTIONS = tuple(SERVICER_FUNCTIONS)
"""The fleet API (bytes in, parsed by the servicer) and the standard health service, for Serve's gRPC proxy where one is used."""
FLEET_GRPC_PORT = 9000
"""The fleet's public gRPC API in a cluster: the ingress replica's own server, on the head node."""
SERVE_GRPC_PORT = FLEET_GRPC_PORT
"""Former name of FLEET_GRPC_PORT (the port Serve's gRPC proxy used to serve the API on)."""
SERVE_HTTP_PORT = 8000
"""Serve's HTTP proxy port: KubeRay probes ``/-/healthz`` on it."""
REDIS_URL_ENV = "MOEFLEET_REDIS_URL"
"""Environment variable the Serve application reads the Redis URL from when ``redis_url`` is not in args."""
CLUSTER_BIND_HOST = "0.0.0.0"
"""Cluster only: the HTTP proxy must be reachable from other machines/pods. Never used in local mode."""


class ServeConfigError(ValueError):
    """A Serve config that Serve would reject, or would silently misread (an unknown key)."""


def serve_config(
    args: dict[str, Any] | None = None, *, app_name: str = APP_NAME, grpc_port: int = FLEET_GRPC_PORT,
    controller: dict[str, Any] | None = None, host: str = CLUSTER_BIND_HOST, http_port: int = SERVE_HTTP_PORT,
) -> dict:
    """A Serve deploy config (``ServeDeploySchema``) that runs the fleet's application in a cluster.

    Args:
        args: the application builder's arguments, validated here with
            ``ServeAppArgs`` as ``build_app`` will (``checkpoint``,
            ``num_workers``, ``namespace``, ``router``, ``worker``,
            ``redis_url``). Leave ``redis_url`` out to have the app read
            ``$MOEFLEET_REDIS_URL``: a URL with a password here would be stored
            in plain text by the Serve controller, so it is refused. The
            router's ``host`` and ``port`` default to ``0.0.0.0`` and
            ``grpc_port``; its token comes from ``auth_token_file`` or the
            head's ``$MOEFLEET_AUTH_TOKEN`` (required: the port is not loopback),
            TLS from ``tls_cert``/``tls_key``/``tls_client_ca``.
        app_name: the Serve application's name.
        grpc_port: the fleet's gRPC port (the ingress replica's own server).
        controller: when given, a second application, ``moefleet-controller``
            (``controller/serve_app.py``): the controller with these
            ``ControllerConfig`` settings on the head node, serving the fleet's
            telemetry; ``checkpoint``, ``namespace`` and ``worker`` default to
            the fleet's (and must equal them). None: no controller (static).
        host: the address the router and Serve's HTTP proxy bind (all
            interfaces; 127.0.0.1 for a one-machine cluster).
        http_port: Serve's HTTP proxy port.

    Returns the config as plain data (dump it with ``yaml.safe_dump``); it is
    validated with ``check_serve_config`` first.
    """
    from pydantic import ValidationError

    from moefleet.router_service.serve_app import ServeAppArgs

    args = dict(args or {})
    router = args.get("router")
    if router is None or isinstance(router, dict):
        args["router"] = {"host": host, "port": grpc_port, **(router or {})}
    try:
        ServeAppArgs(**args)
    except ValidationError as e:
        raise ServeConfigError(f"args: not valid for {APP_IMPORT_PATH}: {e}") from e
    redis_url = args.get("redis_url")
    if redis_url and urlsplit(str(redis_url)).password:
        raise ServeConfigError(
            f"args.redis_url: holds a password; set it in ${REDIS_URL_ENV} (from a secret) and leave redis_url out"
        )
    if args.get("serve_grpc", True) is False:
        raise ServeConfigError("args.serve_grpc: false would leave the cluster without the fleet's gRPC API")
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": http_port},
        "applications": [{"name": app_name, "route_prefix": "/", "import_path": APP_IMPORT_PATH, "args": args}],
    }
    if controller is not None:
        config["applications"].append({
            "name": CONTROLLER_APP_NAME, "route_prefix": None, "import_path": CONTROLLER_IMPORT_PATH,
            "args": controller_args(controller, args),
        })
    check_serve_config(config)
    return config


def controller_args(controller: dict[str, Any], app_args: dict[str, Any]) -> dict[str, Any]:
    """The controller application's args: ``controller`` (ControllerConfig fields), with the fleet's checkpoint,
    namespace and worker settings filled in; refused when they differ from the fleet's or hold a password."""
    from pydantic import ValidationError

    from moefleet.controller.main import ControllerConfig
    from moefleet.router_service.serve_app import ServeAppArgs

    app = ServeAppArgs(**app_args)
    out = {k: v for k, v in controller.items() if k != "ray_address"}
    fleet = {"checkpoint": app.checkpoint, "namespace": app.namespace}
    if "worker" in app_args or "worker" in out:  # a worker as the fleet starts them (restarts, new devices)
        fleet["worker"] = app.worker.model_dump(mode="json", exclude_defaults=True)
    for key, value in fleet.items():
        if key not in out:
            if value is not None:
                out[key] = value
            continue
        mine = out[key]
        if key == "worker":
            mine, value = ControllerConfig(worker=out[key]).worker.model_dump(mode="json"), app.worker.model_dump(mode="json")
        if mine != value:
            raise ServeConfigError(f"controller.{key}: {mine!r} differs from the fleet's {value!r}; leave it out "
                                   "(the controller takes the fleet's)")
    if out.get("redis_url") and urlsplit(str(out["redis_url"])).password:
        raise ServeConfigError(f"controller.redis_url: holds a password; set it in ${REDIS_URL_ENV} and leave redis_url out")
    if out.get("devices"):
        raise ServeConfigError("controller.devices: a static inventory is for local mode; in a cluster the controller "
                               "reads the nodes and the fleet's workers")
    try:
        ControllerConfig(**out)
    except ValidationError as e:
        raise ServeConfigError(f"controller: not a valid ControllerConfig: {e}") from e
    return out


def _unknown_keys(data: dict, model: type, where: str) -> list[str]:
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    return [f"{where}.{k}" if where else k for k in data if k not in known]


def check_serve_config(config: dict) -> None:
    """Validate with Ray's ``ServeDeploySchema`` and refuse unknown keys.

    ``ServeDeploySchema`` ignores unknown top-level, ``http_options`` and
    ``grpc_options`` keys (forward compatibility), so a misspelled
    ``grpc_option:`` would silently give a Serve without gRPC; this check names it.
    """
    from pydantic import ValidationError
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
        gRPCOptionsSchema,
    )

    if not isinstance(config, dict):
        raise ServeConfigError(f"a Serve config is a mapping, got {type(config).__name__}")
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        raise ServeConfigError(f"not a valid Serve deploy config: {e}") from e
    unknown = _unknown_keys(config, ServeDeploySchema, "")
    for key, model in (("http_options", HTTPOptionsSchema), ("grpc_options", gRPCOptionsSchema)):
        if isinstance(config.get(key), dict):
            unknown += _unknown_keys(config[key], model, key)
    for i, app in enumerate(config.get("applications") or []):
        unknown += _unknown_keys(app, ServeApplicationSchema, f"applications[{i}]")
        for j, dep in enumerate(app.get("deployments") or []):
            unknown += _unknown_keys(dep, DeploymentSchema, f"applications[{i}].deployments[{j}]")
    if unknown:
        raise ServeConfigError(f"unknown keys Serve would ignore: {', '.join(unknown)}")


# -- KubeRay group rendering (what the manifests must say; the tests compare) ------------------
def kuberay_group_fields(node_type: NodeType) -> dict[str, Any]:
    """A KubeRay (>= 1.5) group's ``rayStartParams``, ``resources`` and ``labels`` for a node type.

    KubeRay turns the top-level ``resources`` into ``--num-cpus``/``--num-gpus``/
    ``--memory``/``--resources`` and ``labels`` into ``--labels``; it refuses
    ``rayStartParams['labels']`` and resource flags in both places.
    ``object_store_memory`` cannot be a custom resource, so it stays a rayStartParam.
    """
    declared = node_resources(node_type)
    resources: dict[str, str] = {}
    for name, value in declared.items():
        if name == "object_store_memory":
            continue
        resources[name] = f"{value // GIB}Gi" if name == "memory" else str(value)
    return {
        "rayStartParams": {"object-store-memory": str(declared["object_store_memory"])},
        "resources": resources,
        "labels": node_labels(node_type),
    }


def kuberay_container_resources(node_type: NodeType) -> dict[str, dict[str, str]]:
    """The Ray container's requests and limits (equal: Guaranteed QoS) for a node type."""
    amounts = {"cpu": str(node_type.cpus), "memory": f"{node_type.container_memory_gib}Gi"}
    if node_type.gpus:
        amounts["nvidia.com/gpu"] = str(node_type.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


# -- CLI ---------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moefleet.deploy_config", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("serve-config", help="write the Serve config for `serve deploy` (cluster only)")
    p.add_argument("--checkpoint", help="checkpoint directory on every node (default: the built-in model)")
    p.add_argument("--num-workers", type=int, help="ExpertGroup workers of the starting placement")
    p.add_argument("--namespace", help="Ray namespace and Redis key prefix")
    p.add_argument(
        "--arg", action="append", default=[], metavar="KEY=VALUE", help="another build_app argument (YAML value)"
    )
    p.add_argument("--grpc-port", type=int, default=FLEET_GRPC_PORT, help="the fleet's gRPC port (router.port)")
    p.add_argument("-o", "--output", help="file to write (default: stdout)")

    p = sub.add_parser("ray-start", help="print the `ray start` command for a node of a type")
    p.add_argument("node_type", choices=sorted(NODE_TYPES))
    p.add_argument("--address", help="head address HOST:PORT to join (omit for a head node)")

    sub.add_parser("node-types", help="list the node types and what each declares")

    p = sub.add_parser("check", help="validate a Serve config file strictly")
    p.add_argument("path")

    ns = parser.parse_args(argv)
    if ns.cmd == "serve-config":
        args: dict[str, Any] = {}
        for key in ("checkpoint", "num_workers", "namespace"):
            if getattr(ns, key) is not None:
                args[key] = getattr(ns, key)
        for item in ns.arg:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"--arg {item!r}: expected KEY=VALUE")
            args[key] = _parse_value(value)
        text = yaml.safe_dump(serve_config(args, grpc_port=ns.grpc_port), sort_keys=False)
        if ns.output:
            with open(ns.output, "w") as f:
                f.write(text)
        else:
            sys.stdout.write(text)
    elif ns.cmd == "ray-start":
        print(ray_start_command(NODE_TYPES[ns.node_type], ns.address))
    elif ns.cmd == "node-types":
        for t in NODE_TYPES.values():
            print(f"{t.name}: {t.description}")
            print(f"  resources: {node_resources(t)}")
            print(f"  labels:    {node_labels(t)}")
    elif ns.cmd == "check":
        with open(ns.path) as f:
            check_serve_config(yaml.safe_load(f))
        print(f"{ns.path}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
