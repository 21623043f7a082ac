"""``moe-fleet deploy``: check a Ray cluster's resources, deploy the fleet's Serve config, wait until it serves.

Everything goes through the cluster's dashboard address (the one ``serve
deploy`` uses): Ray's state API for nodes and actors, Serve's REST API for the
deploy and the applications' status. Nothing is written to disk.

1. check: the actors the config starts (the ingress, the workers, the
   controller) against what the live nodes have free (``deploy_check``); a
   shortfall refuses the deploy, naming it;
2. deploy: the config as ``serve deploy`` sends it;
3. wait, until ``timeout_s``: every application RUNNING is success; one
   DEPLOY_FAILED is a failure with Serve's message; at the deadline, the
   actors still pending and why (the state API), and the deployments not yet
   healthy with Serve's message. Failures exit non-zero.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from .deploy_check import Demand, actor_resources, deployment_demands, free_resources, pending_report, shortfall


class DeployError(RuntimeError):
    """The deploy was refused or did not come up; the message says why."""


@dataclass
class DeployOutcome:
    ok: bool
    lines: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


def _dashboard_error(address: str, e: Exception) -> DeployError:
    return DeployError(f"cannot reach the cluster's dashboard at {address}: {type(e).__name__}: {e} (is Ray up there? "
                       "with Ray's token authentication, export RAY_AUTH_MODE=token in this shell)")


def config_demands(config: dict) -> tuple[list[Demand], str, list[str]]:
    """The actors the Serve config starts, the fleet's namespace, and the config's application names."""
    from moefleet.controller.serve_app import APP_NAME as CONTROLLER_APP, FleetController
    from moefleet.router_service.serve_app import FleetIngress, ServeAppArgs

    apps = {a["name"]: a for a in config["applications"]}
    fleet = next(a for a in config["applications"] if a["name"] != CONTROLLER_APP)
    args = ServeAppArgs(**fleet.get("args", {}))
    w = args.worker

    def options(dep) -> dict[str, float]:
        o = dep.ray_actor_options
        return actor_resources(o.get("num_cpus", 0), o.get("num_gpus", 0), o.get("resources"))

    demands = deployment_demands(args.num_workers, actor_resources(w.num_cpus, w.num_gpus, w.resources), options(FleetIngress),
                                 options(FleetController) if CONTROLLER_APP in apps else None)
    return demands, args.namespace, list(apps)


def _ours(namespace: str, apps: list[str]):
    """Actors of this fleet: its workers (by name, in its namespace) and the Serve replicas of its applications."""
    from moefleet.core.placement import WORKER_PREFIX

    def ours(a) -> bool:
        name = getattr(a, "name", None) or ""
        cls = getattr(a, "class_name", None) or ""
        if getattr(a, "ray_namespace", None) == namespace and name.startswith(WORKER_PREFIX):
            return True
        return any(cls.startswith(f"ServeReplica:{app}:") for app in apps)

    return ours


def cluster_state(address: str) -> tuple[list, list]:
    """The state API's live view: (nodes, actors with their required resources)."""
    from ray.util.state import list_actors, list_nodes

    try:
        nodes = list_nodes(address=address, detail=True, limit=10_000, raise_on_missing_output=False)
        actors = list_actors(address=address, detail=True, limit=10_000, raise_on_missing_output=False)
    except Exception as e:  # connection refused, unauthenticated, ...
        raise _dashboard_error(address, e) from e
    return nodes, actors


def check(address: str, config: dict) -> str | None:
    """What the cluster lacks for ``config`` (a sentence), or None when it fits."""
    demands, namespace, apps = config_demands(config)
    nodes, actors = cluster_state(address)
    return shortfall(demands, free_resources(nodes, actors, reusable=_ours(namespace, apps)))


def _deployed_at(details: dict, apps: list[str]) -> dict[str, float | None]:
    """When Serve last took a config for each application (None: no such application)."""
    return {name: ((details.get("applications") or {}).get(name) or {}).get("last_deployed_time_s") for name in apps}


def _not_healthy(details: dict, apps: list[str]) -> list[str]:
    lines = []
    for name in apps:
        app = (details.get("applications") or {}).get(name)
        if app is None:
            lines.append(f"application {name}: not created yet")
            continue
        if app.get("status") == "RUNNING":
            continue
        msg = (app.get("message") or "").strip()
        lines.append(f"application {name}: {app.get('status')}" + (f": {msg}" if msg else ""))
        for dep_name, dep in (app.get("deployments") or {}).items():
            if dep.get("status") != "HEALTHY":
                dmsg = (dep.get("message") or "").strip()
                lines.append(f"  deployment {dep_name}: {dep.get('status')}" + (f": {dmsg}" if dmsg else ""))
    return lines


def deploy(address: str, config: dict, *, timeout_s: float = 300.0, check_resources: bool = True, poll_s: float = 1.0,
           progress=None) -> DeployOutcome:
    """Check, deploy and wait (the module's docstring). ``progress(line)`` is told each phase."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    from ray.serve.schema import ServeDeploySchema

    t0 = time.monotonic()
    say = progress or (lambda line: None)
    _, namespace, apps = config_demands(config)
    if check_resources:
        problem = check(address, config)
        if problem:
            return DeployOutcome(False, [f"cannot deploy: {problem}; add nodes, deploy fewer workers (--workers) or ask "
                                         "less of each (--worker-cpus), or --skip-resource-check on a cluster that "
                                         "adds nodes by itself"], time.monotonic() - t0)
    try:
        client = ServeSubmissionClient(address)
        before = _deployed_at(client.get_serve_details(), apps)
        client.deploy_applications(ServeDeploySchema.model_validate(config).model_dump(exclude_unset=True))
    except Exception as e:
        raise _dashboard_error(address, e) from e
    say(f"deploying {', '.join(apps)} ...")
    deadline = t0 + timeout_s
    while True:
        try:
            details = client.get_serve_details()
        except Exception as e:
            raise _dashboard_error(address, e) from e
        statuses = {name: ((details.get("applications") or {}).get(name) or {}).get("status") for name in apps}
        now_at = _deployed_at(details, apps)
        fresh = all(now_at[name] is not None and now_at[name] != before[name] for name in apps)  # not the last deploy's
        if fresh and all(s == "RUNNING" for s in statuses.values()):
            return DeployOutcome(True, [f"{name} RUNNING" for name in apps], time.monotonic() - t0)
        if fresh and any(s == "DEPLOY_FAILED" for s in statuses.values()):
            return DeployOutcome(False, ["the deploy failed:"] + _not_healthy(details, apps), time.monotonic() - t0)
        if time.monotonic() >= deadline:
            nodes, actors = cluster_state(address)
            free = free_resources(nodes, actors)
            pending = pending_report(actors, free, ours=_ours(namespace, apps))
            lines = [f"not serving after {timeout_s:g}s:"] + _not_healthy(details, apps)
            lines += ["actors waiting:"] + [f"  {p}" for p in pending] if pending else ["no actor of the fleet is waiting "
                                                                                       "for resources"]
            return DeployOutcome(False, lines, time.monotonic() - t0)
        time.sleep(poll_s)
