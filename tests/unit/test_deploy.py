"""Deployment artefacts: KubeRay manifests, Serve config, cluster-launcher config, README, Dockerfile.

Nothing is run: each file is checked with the validator its consumer uses (the KubeRay CRD
schemas, made strict; Ray Serve's ServeDeploySchema; Ray's cluster-config validation; Ray's
own KubeRay autoscaler parser) and against controller/inventory.py, the one list of node types.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shlex
import tomllib
from decimal import Decimal
from pathlib import Path

import jsonschema
import pytest
import yaml

from moefleet.controller.inventory import (
    GIB,
    NODE_TYPE_LABEL,
    NODE_TYPES,
    inventory_from_nodes,
    node_labels,
    node_resources,
    ray_start_command,
)
from moefleet.deploy_config import (
    APP_IMPORT_PATH,
    CLUSTER_BIND_HOST,
    FLEET_GRPC_PORT,
    GRPC_SERVICER_FUNCTIONS,
    SERVE_GRPC_PORT,
    ServeConfigError,
    check_serve_config,
    kuberay_container_resources,
    kuberay_group_fields,
    serve_config,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
CRDS = KUBERAY / "crds"
SHARED_CRDS = ROOT.parent / "shared" / "kuberay-crds"  # where the CRD files came from, when present

RAY_KINDS = {"RayService": "rayservice", "RayCluster": "raycluster"}
SECRET = "moefleet-redis"
DEV_TYPES = {"dev-head", "dev-cpu"}


# -- loading ----------------------------------------------------------------------------------
def _load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests() -> list[tuple[str, dict]]:
    return [(f"{p.name}#{i}", doc) for p in sorted(KUBERAY.glob("*.yaml")) for i, doc in enumerate(_load_yaml_docs(p))]


MANIFESTS = _manifests()
RAY_DOCS = [(name, doc) for name, doc in MANIFESTS if doc.get("kind") in RAY_KINDS]


def _doc(kind: str, name: str) -> dict:
    found = [d for _, d in MANIFESTS if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]


def _groups(doc: dict) -> list[tuple[str, dict, bool]]:
    """(group name, group spec, is head) of a RayService/RayCluster."""
    spec = _cluster_spec(doc)
    return [("head", spec["headGroupSpec"], True)] + [(g["groupName"], g, False) for g in spec["workerGroupSpecs"]]


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container is the first


def _pod_specs() -> list[tuple[str, dict]]:
    out = []
    for name, doc in MANIFESTS:
        if doc["kind"] in RAY_KINDS:
            out += [(f"{name}:{g}", spec["template"]["spec"]) for g, spec, _ in _groups(doc)]
        elif doc["kind"] == "Deployment":
            out.append((name, doc["spec"]["template"]["spec"]))
    return out


# -- strict CRD schemas -----------------------------------------------------------------------
def _strict(schema: dict) -> dict:
    """Close every object schema that lists its properties and does not preserve unknown fields.

    KubeRay's CRD schemas never say additionalProperties: false, so a misspelled field would
    pass; the API server's strict field validation rejects it. Walks only schema positions, so a
    field that happens to be named "properties" is not mistaken for the keyword.
    """

    def walk(node: dict) -> None:
        if not isinstance(node, dict):
            return
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for sub in (node.get("properties") or {}).values():
            walk(sub)
        for sub in (node.get("patternProperties") or {}).values():
            walk(sub)
        for key in ("additionalProperties", "not", "items"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for key in ("items", "allOf", "anyOf", "oneOf"):
            if isinstance(node.get(key), list):
                for sub in node[key]:
                    walk(sub)

    out = copy.deepcopy(schema)
    walk(out)
    return out


# The API server validates metadata itself (the CRD leaves it an open object); KubeRay adds that
# RayService/RayCluster names are DNS-1035 labels.
METADATA_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


_CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


def _shared_v1_schema(kind: str) -> dict:
    doc = yaml.load((SHARED_CRDS / _CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def _vendored_v1_schema(kind: str) -> dict:
    return json.loads((CRDS / f"{RAY_KINDS[kind]}.v1.schema.json").read_text())


def _crd_schema(kind: str, strict: bool = True) -> dict:
    """The CRD's v1 schema: from ../shared/kuberay-crds when it sits beside the checkout (as in CI), else the vendored copy."""
    schema = _shared_v1_schema(kind) if SHARED_CRDS.is_dir() else _vendored_v1_schema(kind)
    if strict:
        schema = _strict(schema)
        schema["properties"]["metadata"] = METADATA_SCHEMA
    return schema


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft4Validator]:
    out = {}
    for kind in RAY_KINDS:
        schema = _crd_schema(kind)
        jsonschema.Draft4Validator.check_schema(schema)
        out[kind] = jsonschema.Draft4Validator(schema)
    return out


def _errors(validator: jsonschema.Draft4Validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_vendored_crd_schemas_are_the_v1_schemas_of_the_shared_crds():
    """Manifests validate against ../shared/kuberay-crds where present; the vendored copy must be the same schema."""
    for kind in RAY_KINDS:
        vendored = _vendored_v1_schema(kind)
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(vendored["properties"]), kind
        if SHARED_CRDS.is_dir():
            assert vendored == _shared_v1_schema(kind), f"{kind}: vendored schema differs from {SHARED_CRDS}"


def test_the_kuberay_folder_holds_ray_custom_resources_of_both_kinds():
    assert {doc["kind"] for _, doc in RAY_DOCS} == set(RAY_KINDS)
    for name, doc in MANIFESTS:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), name


@pytest.mark.parametrize("name,doc", RAY_DOCS, ids=[n for n, _ in RAY_DOCS])
def test_ray_custom_resource_is_valid_against_its_strict_crd_schema(name, doc, validators):
    assert doc["apiVersion"] == "ray.io/v1"
    assert _errors(validators[doc["kind"]], doc) == []


def test_strict_crd_schema_rejects_a_misspelled_field(validators):
    doc = copy.deepcopy(_doc("RayService", "moefleet"))
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParam"] = {"num-cpus": "1"}
    container = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    errors = _errors(validators["RayService"], doc)
    assert any("rayStartParam" in e and "Additional properties" in e for e in errors), errors
    assert any("'resource' was unexpected" in e for e in errors), errors
    # The CRD as published would have let both through:
    assert _errors(jsonschema.Draft4Validator(_crd_schema("RayService", strict=False)), doc) == []


def test_strict_crd_schema_rejects_a_wrong_type(validators):
    doc = copy.deepcopy(_doc("RayService", "moefleet"))
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "4"
    doc["spec"]["serveConfigV2"] = yaml.safe_load(doc["spec"]["serveConfigV2"])
    errors = _errors(validators["RayService"], doc)
    assert any("maxReplicas" in e and "is not of type 'integer'" in e for e in errors), errors
    assert any(e.startswith("spec/serveConfigV2") and "is not of type 'string'" in e for e in errors), errors


def test_strictness_spares_objects_that_preserve_unknown_fields():
    schema = _strict(
        {
            "type": "object",
            "properties": {
                "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
                "closed": {"type": "object", "properties": {"properties": {"type": "object", "properties": {"b": {}}}}},
                "list": {"type": "array", "items": {"type": "object", "properties": {"c": {}}}},
            },
        }
    )
    validator = jsonschema.Draft4Validator(schema)
    assert validator.is_valid({"open": {"a": 1, "anything": 2}})
    assert not validator.is_valid({"closed": {"other": 1}})
    assert not validator.is_valid({"closed": {"properties": {"b": 1, "other": 1}}})  # a field named "properties"
    assert not validator.is_valid({"list": [{"c": 1, "other": 1}]})
    assert not validator.is_valid({"extra": 1})


def test_strict_metadata_rejects_a_name_kuberay_refuses(validators):
    doc = copy.deepcopy(_doc("RayCluster", "moefleet-dev"))
    doc["metadata"]["name"] = "MoEFleet_dev"
    assert any(e.startswith("metadata/name") for e in _errors(validators["RayCluster"], doc))


@pytest.mark.parametrize("name,doc", RAY_DOCS, ids=[n for n, _ in RAY_DOCS])
def test_groups_pass_the_kuberay_operators_own_checks(name, doc):
    """What KubeRay's ValidateRayClusterSpec refuses beyond the schema (utils/validation.go)."""
    from ray._private.label_utils import validate_node_label_syntax

    import ray

    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    for group_name, group, _ in _groups(doc):
        params = group.get("rayStartParams", {})
        assert "labels" not in params, f"{group_name}: KubeRay refuses rayStartParams['labels']"
        if group.get("resources"):
            clash = {"num-cpus", "num-gpus", "memory", "resources"} & set(params)
            assert not clash, f"{group_name}: {clash} set beside the top-level resources"
        validate_node_label_syntax(group.get("labels", {}))
        if spec.get("enableInTreeAutoscaling") and spec.get("autoscalerOptions", {}).get("version") == "v2":
            assert group["template"]["spec"].get("restartPolicy", "Never") == "Never"


# -- node types: manifests == inventory -------------------------------------------------------
@pytest.mark.parametrize("name,doc", RAY_DOCS, ids=[n for n, _ in RAY_DOCS])
def test_every_group_declares_exactly_what_the_inventory_renders_for_its_node_type(name, doc):
    for group_name, group, is_head in _groups(doc):
        type_name = group.get("labels", {}).get(NODE_TYPE_LABEL)
        assert type_name in NODE_TYPES, f"{group_name}: no known {NODE_TYPE_LABEL} label"
        if not is_head:
            assert group_name == type_name
        node_type = NODE_TYPES[type_name]
        expected = kuberay_group_fields(node_type)
        assert group.get("rayStartParams", {}) == expected["rayStartParams"], group_name
        assert group.get("resources", {}) == expected["resources"], group_name
        assert group.get("labels", {}) == expected["labels"], group_name
        assert _ray_container(group)["resources"] == kuberay_container_resources(node_type), group_name


def _as_ray_cluster(doc: dict) -> dict:
    if doc["kind"] == "RayCluster":
        return {**doc, "metadata": {**doc["metadata"], "namespace": "default"}}
    return {"metadata": {"name": doc["metadata"]["name"], "namespace": "default"}, "spec": _cluster_spec(doc)}


@pytest.mark.parametrize("name,doc", RAY_DOCS, ids=[n for n, _ in RAY_DOCS])
def test_ray_autoscaler_reads_each_group_as_its_node_type(name, doc):
    """Ray's own KubeRay parser (what the autoscaler plans with) sees the inventory's node types."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    config = _derive_autoscaling_config_from_ray_cr(_as_ray_cluster(doc))  # runs validate_config too
    node_types = config["available_node_types"]
    for group_name, group, is_head in _groups(doc):
        seen = node_types["headgroup" if is_head else group_name]
        node_type = NODE_TYPES[group["labels"][NODE_TYPE_LABEL]]
        expected = {k: v for k, v in node_resources(node_type).items() if k != "object_store_memory"}
        assert seen["resources"] == expected, group_name
        assert seen["labels"] == node_labels(node_type), group_name


def _nodes_from_manifest(doc: dict) -> list[dict]:
    """ray.nodes() entries of the nodes the groups start at their initial replicas, from the
    declarations alone: KubeRay's top-level resources as quantities, object-store-memory param."""
    from ray.autoscaler._private.kuberay.utils import parse_quantity

    nodes = []
    for group_name, group, is_head in _groups(doc):
        resources = {k: float(parse_quantity(v)) for k, v in group["resources"].items()}
        resources["object_store_memory"] = float(group["rayStartParams"]["object-store-memory"])
        if is_head:
            resources["node:__internal_head__"] = 1.0
        for i in range(1 if is_head else group["replicas"]):
            node_id = hashlib.sha256(f"{group_name}/{i}".encode()).hexdigest()[:56]
            nodes.append({"NodeID": node_id, "Alive": True, "Resources": resources, "Labels": dict(group["labels"])})
    return nodes


def test_rayservice_initial_nodes_give_the_devices_mixtral_is_sized_for():
    from moefleet.controller.planner import PlannerKnobs
    from moefleet.core.config import MoELayerSpec

    doc = _doc("RayService", "moefleet")
    inv = inventory_from_nodes(_nodes_from_manifest(doc))
    by_kind: dict[tuple, int] = {}
    for d in inv.devices:
        key = (d.kind, d.accelerator_type, d.memory_bytes // GIB, d.speed)
        by_kind[key] = by_kind.get(key, 0) + 1
    assert by_kind == {
        ("gpu", "H100", 79, 1.0): 8,
        ("gpu", "L4", 22, 0.122): 2,
        ("cpu", None, 184, 0.001): 1,
    }
    # The sizing comment's model: Mixtral-8x7B, 32 layers x 8 experts, bf16.
    mixtral = MoELayerSpec(hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2)
    expert_bytes = mixtral.expert_params * 2
    assert expert_bytes == 352_321_536
    usable = 1 - PlannerKnobs().headroom
    slots = sum(int(d.memory_bytes * usable // expert_bytes) for d in inv.devices)
    assert slots == 2352 and slots >= 32 * 8
    (cpu,) = [d for d in inv.devices if d.kind == "cpu"]
    assert int(cpu.memory_bytes * usable // expert_bytes) >= 32 * 8  # a full cold copy fits the CPU tier


def test_serve_app_starts_on_the_cpu_tier_slots_and_leaves_the_gpus_free():
    """The starting workers request what only CPU-tier nodes have, one per slot, and no GPU."""
    doc = _doc("RayService", "moefleet")
    args = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]
    worker = args.get("worker", {})
    assert worker.get("num_gpus", 0) == 0
    assert worker["resources"] == {"moefleet_cpu_tier": 1}
    slots = sum(
        group["replicas"]
        for _, group, is_head in _groups(doc)
        if not is_head and NODE_TYPES[group["labels"][NODE_TYPE_LABEL]].cpu_tier
    )
    assert args["num_workers"] <= slots


def test_dev_cluster_nodes_give_two_cpu_tier_devices():
    inv = inventory_from_nodes(_nodes_from_manifest(_doc("RayCluster", "moefleet-dev")))
    assert [(d.kind, d.memory_bytes) for d in inv.devices] == [("cpu", 2 * GIB)] * 2


# -- Services, secrets, controller, pods ------------------------------------------------------
def test_grpc_service_exposes_port_9000_of_the_head_pod_where_the_ingress_serves():
    svc = _doc("Service", "moefleet-grpc")
    assert svc["spec"]["type"] == "ClusterIP"
    (port,) = svc["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("grpc", FLEET_GRPC_PORT, "grpc")
    selector = svc["spec"]["selector"]
    assert selector["ray.io/node-type"] == "head"  # KubeRay's label of the head pod
    from moefleet.router_service.serve_app import HEAD_NODE_RESOURCE, FleetIngress

    # the ingress (and so the router's port) is pinned to the head node
    assert FleetIngress.ray_actor_options["resources"][HEAD_NODE_RESOURCE] > 0
    rayservice = _doc("RayService", "moefleet")
    for group_name, group, is_head in _groups(rayservice):
        pod_labels = group["template"]["metadata"]["labels"]
        assert {k: v for k, v in selector.items() if k != "ray.io/node-type"}.items() <= pod_labels.items(), group_name
        ports = {p["name"]: p["containerPort"] for p in _ray_container(group)["ports"]}
        assert (ports.get("grpc") == FLEET_GRPC_PORT) == is_head, group_name
    router = _serve_config_v2()["applications"][0]["args"]["router"]
    assert (router["host"], router["port"]) == (CLUSTER_BIND_HOST, FLEET_GRPC_PORT)
    # KubeRay keeps only the port named "serve" of spec.serveService: gRPC must not rely on it.
    serve_service_ports = rayservice["spec"].get("serveService", {}).get("spec", {}).get("ports", [])
    assert all(p.get("name") == "serve" for p in serve_service_ports)


def test_no_service_exposes_anything_outside_the_cluster_or_the_dashboard_at_all():
    for name, doc in MANIFESTS:
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", name
            assert all(p["port"] not in (8265, 10001, 6379) or doc["metadata"]["name"] == "moefleet-redis"
                       for p in doc["spec"]["ports"]), name
    for name, doc in RAY_DOCS:
        assert "headService" not in _cluster_spec(doc), name  # KubeRay's own head Service stays ClusterIP


def _volume_of_mount(pod: dict, container: dict, path: str) -> dict:
    (mount,) = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume


def test_router_serves_tls_from_the_secret_and_requires_the_token_on_the_head():
    from moefleet.core.config import RouterConfig
    from moefleet.router_service import security

    rayservice = _doc("RayService", "moefleet")
    router = RouterConfig(**_serve_config_v2()["applications"][0]["args"]["router"])
    assert security.auth_required(router)  # not loopback: the router refuses to start without a token
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    container = _ray_container(rayservice["spec"]["rayClusterConfig"]["headGroupSpec"])
    for path in (router.tls_cert, router.tls_key):
        assert _volume_of_mount(head, container, path)["secret"]["secretName"] == "moefleet-tls", path
    assert _secret_ref(_env(container), "MOEFLEET_AUTH_TOKEN") == ("moefleet-auth", "token")
    dev = _doc("RayCluster", "moefleet-dev")
    assert _secret_ref(_env(_ray_container(dev["spec"]["headGroupSpec"])), "MOEFLEET_AUTH_TOKEN") == ("moefleet-auth", "token")


def test_every_ray_cluster_uses_rays_token_authentication_from_a_secret():
    for name, doc in RAY_DOCS:
        assert _cluster_spec(doc)["authOptions"] == {"mode": "token", "secretName": "moefleet-ray-auth"}, name
    env = _env(_doc("Deployment", "moefleet-controller")["spec"]["template"]["spec"]["containers"][0])
    assert env["RAY_AUTH_MODE"]["value"] == "token"  # its Ray Client connects to a token-guarded head
    assert _secret_ref(env, "RAY_AUTH_TOKEN") == ("moefleet-ray-auth", "auth_token")


def test_every_container_has_a_read_only_root_no_privilege_escalation_and_no_capabilities():
    for name, pod in _pod_specs():
        for container in pod["containers"]:
            sc = container.get("securityContext", {})
            assert sc.get("readOnlyRootFilesystem") is True, f"{name}: {container['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}: {container['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: {container['name']}"
            if container["image"].startswith("registry.example.com/"):
                # Ray writes sessions, logs and spills under /tmp: an emptyDir, not the image
                assert _volume_of_mount(pod, container, "/tmp/ray")["emptyDir"] is not None, name


def _policies() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc["spec"] for _, doc in MANIFESTS if doc["kind"] == "NetworkPolicy"}


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _pod_labels() -> list[tuple[str, dict]]:
    out = []
    for name, doc in MANIFESTS:
        if doc["kind"] in RAY_KINDS:
            out += [(f"{name}:{g}", spec["template"]["metadata"]["labels"]) for g, spec, _ in _groups(doc)]
        elif doc["kind"] == "Deployment":
            out.append((name, doc["spec"]["template"]["metadata"]["labels"]))
    return out


def test_network_policies_leave_clients_only_the_grpc_port():
    policies = _policies()
    assert set(policies) == {"moefleet-ray", "moefleet-redis", "moefleet-controller"}
    for name, labels in _pod_labels():
        selecting = [p for p in policies.values() if _selects(p["podSelector"], labels)]
        assert selecting and all("Ingress" in p["policyTypes"] for p in selecting), f"{name}: no ingress policy"
    ray = policies["moefleet-ray"]
    open_rules = [r for r in ray["ingress"] if "from" not in r]  # rules for any source
    assert [[(p["protocol"], p["port"]) for p in r["ports"]] for r in open_rules] == [[("TCP", FLEET_GRPC_PORT)]]
    for rule in ray["ingress"]:
        for peer in rule.get("from", []):
            assert "ipBlock" not in peer
            fleet_pod = _selects(peer["podSelector"], {"moefleet.io/app": "moefleet"})
            operator = peer["podSelector"].get("matchLabels") == {"app.kubernetes.io/component": "kuberay-operator"}
            controller = _selects(peer["podSelector"], {"app.kubernetes.io/name": "moefleet-controller"})
            assert fleet_pod or operator or controller, peer
            if not fleet_pod:  # outside the cluster's pods: named ports only (dashboard for the operator)
                assert rule["ports"], rule
    redis = policies["moefleet-redis"]
    assert _selects(redis["podSelector"], _doc("Deployment", "moefleet-redis")["spec"]["template"]["metadata"]["labels"])
    (rule,) = redis["ingress"]
    assert [p["port"] for p in rule["ports"]] == [6379]
    for peer in rule["from"]:
        assert set(peer) == {"podSelector"}  # no namespaceSelector / ipBlock: this namespace's fleet pods only
        assert _selects(peer["podSelector"], {"moefleet.io/app": "moefleet"}) or _selects(
            peer["podSelector"], {"app.kubernetes.io/name": "moefleet-controller"})
    (rule,) = policies["moefleet-controller"]["ingress"]  # telemetry only, only from Prometheus
    assert [p["port"] for p in rule["ports"]] == [8470]
    assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [{"app.kubernetes.io/name": "prometheus"}]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret_ref(env: dict, name: str) -> tuple[str, str]:
    ref = env[name]["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_ray_pods_read_the_redis_url_from_the_secret():
    for name, doc in RAY_DOCS:
        for group_name, group, _ in _groups(doc):
            env = _env(_ray_container(group))
            assert _secret_ref(env, "MOEFLEET_REDIS_URL") == (SECRET, "url"), f"{name}:{group_name}"


def test_redis_password_comes_from_the_secret_and_never_appears_in_a_command_line():
    redis = _doc("Deployment", "moefleet-redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    env = _env(container)
    assert _secret_ref(env, "REDIS_PASSWORD") == (SECRET, "password")
    assert _secret_ref(env, "REDISCLI_AUTH") == (SECRET, "password")  # redis-cli probes without -a
    words = " ".join(container.get("command", []) + container.get("args", []))
    assert "--requirepass" not in words and " -a " not in words
    assert re.search(r"image: redis:\d+\.\d+\.\d+", (KUBERAY / "redis.yaml").read_text())
    service = _doc("Service", "moefleet-redis")
    assert service["spec"]["ports"][0]["port"] == 6379


def _strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def test_no_manifest_holds_a_credential():
    for name, doc in MANIFESTS:
        assert doc["kind"] != "Secret", name
        for text in _strings(doc):
            assert not re.search(r"rediss?://[^\s:/@]*:[^\s@]+@", text), f"{name}: a URL with a password"


def test_controller_runs_its_module_with_its_config_and_the_redis_secret():
    deployment = _doc("Deployment", "moefleet-controller")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == [
        "python", "-m", "moefleet.controller.main", "--config", "/etc/moefleet/controller.yaml"
    ]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["config"] == "/etc/moefleet"
    assert volumes["config"]["configMap"]["name"] == "moefleet-controller"
    assert _secret_ref(_env(container), "MOEFLEET_REDIS_URL") == (SECRET, "url")

    from moefleet.controller.main import ControllerConfig

    configmap = _doc("ConfigMap", "moefleet-controller")
    config = ControllerConfig.model_validate(yaml.safe_load(configmap["data"]["controller.yaml"]))
    assert config.ray_address == "ray://moefleet-head-svc:10001"  # KubeRay's head Service of RayService moefleet
    assert config.redis_url is None  # MOEFLEET_REDIS_URL, from the Secret
    args = yaml.safe_load(_doc("RayService", "moefleet")["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert (config.namespace, config.checkpoint) == (args["namespace"], args["checkpoint"])
    assert config.devices == [] and not config.local  # the inventory comes from the Ray cluster's nodes


def test_telemetry_endpoint_beside_the_controller_is_exposed_by_a_service():
    from moefleet.controller.main import ControllerConfig

    config = ControllerConfig.model_validate(yaml.safe_load(_doc("ConfigMap", "moefleet-controller")["data"]["controller.yaml"]))
    assert config.http_port == 8470 and config.http_host == "0.0.0.0"  # reachable from the Service, not only loopback
    deployment = _doc("Deployment", "moefleet-controller")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == config.http_port
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    svc = _doc("Service", "moefleet-telemetry")
    (port,) = svc["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("http", config.http_port, "http")
    assert svc["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    annotations = svc["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.http_port) and annotations["prometheus.io/path"] == "/metrics"


def test_every_pod_runs_as_non_root_with_a_pinned_image():
    images = set()
    for name, pod in _pod_specs():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"].get("runAsUser", 1) != 0, name
        for container in pod["containers"]:
            repo, _, tag = container["image"].rpartition(":")
            assert repo and "/" not in tag and tag not in ("", "latest"), f"{name}: {container['image']}"
            if container["image"].startswith("registry.example.com/"):
                images.add(container["image"])
    assert len(images) == 1, f"Ray pods and the controller must run one image: {images}"


# -- Serve config -----------------------------------------------------------------------------
def _serve_config_v2() -> dict:
    return yaml.safe_load(_doc("RayService", "moefleet")["spec"]["serveConfigV2"])


def test_serve_config_v2_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    config = _serve_config_v2()
    check_serve_config(config)
    schema = ServeDeploySchema.model_validate(config)
    # No Serve gRPC proxy (Ray 2.60's cannot speak TLS): the ingress serves the API itself.
    assert "grpc_options" not in config and schema.grpc_options.grpc_servicer_functions == []
    assert [app.import_path for app in schema.applications] == [APP_IMPORT_PATH]
    assert SERVE_GRPC_PORT == FLEET_GRPC_PORT


def test_serve_config_v2_is_the_generated_serve_config():
    config = _serve_config_v2()
    args = config["applications"][0]["args"]
    assert config == serve_config(args)
    assert "redis_url" not in args  # read from MOEFLEET_REDIS_URL


def test_generated_serve_config_validates_with_serve_deploy_schema():
    from ray.serve.schema import ServeDeploySchema

    config = serve_config({"checkpoint": "/models/m", "num_workers": 4, "namespace": "fleet"})
    parsed = ServeDeploySchema.model_validate(config)
    assert parsed.applications[0].args == {
        "checkpoint": "/models/m", "num_workers": 4, "namespace": "fleet", "router": {"host": "0.0.0.0", "port": 9000}
    }
    assert yaml.safe_load(yaml.safe_dump(config)) == config


def test_serve_config_check_rejects_a_wrong_type():
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    config = serve_config({})
    config["http_options"]["port"] = "eight-thousand"
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate(config)
    with pytest.raises(ServeConfigError, match="http_options.port"):
        check_serve_config(config)
    with pytest.raises(ServeConfigError, match="applications"):
        check_serve_config({"grpc_options": {"port": 9000}})


def test_serve_config_check_rejects_a_misspelled_key_serve_itself_ignores():
    from ray.serve.schema import ServeDeploySchema

    config = serve_config({})
    config["grpc_option"] = {"port": 9000, "grpc_servicer_functions": list(GRPC_SERVICER_FUNCTIONS)}
    ServeDeploySchema.model_validate(config)  # Serve accepts it, and would start no gRPC proxy
    with pytest.raises(ServeConfigError, match="grpc_option"):
        check_serve_config(config)
    config = serve_config({})
    config["applications"][0]["import-path"] = config["applications"][0]["import_path"]
    with pytest.raises(ServeConfigError, match=r"applications\[0\]\.import-path"):
        check_serve_config(config)


def test_serve_config_refuses_a_redis_password_in_the_args():
    with pytest.raises(ServeConfigError, match="MOEFLEET_REDIS_URL"):
        serve_config({"redis_url": "redis://:hunter2@redis:6379/0"})
    assert serve_config({"redis_url": "redis://redis:6379/0"})["applications"][0]["args"]["redis_url"]


def test_grpc_servicer_function_is_importable():
    import importlib

    for path in GRPC_SERVICER_FUNCTIONS:
        module, _, name = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name))


def test_the_application_builder_accepts_the_manifest_args():
    import importlib

    from ray.serve import Application

    module_name, _, attr = APP_IMPORT_PATH.partition(":")
    build_app = getattr(importlib.import_module(module_name), attr)
    assert isinstance(build_app(_serve_config_v2()["applications"][0]["args"]), Application)  # binds; starts nothing


def test_serve_config_refuses_args_the_application_refuses():
    with pytest.raises(ServeConfigError, match="router_port"):
        serve_config({"router_port": 50051})
    with pytest.raises(ServeConfigError, match="num_workers"):
        serve_config({"num_workers": 0})
    with pytest.raises(ServeConfigError, match="tls_cert"):
        serve_config({"router": {"tls_key": "/k.pem"}})
    with pytest.raises(ServeConfigError, match="serve_grpc"):
        serve_config({"serve_grpc": False})


def test_serve_config_keeps_the_routers_tls_and_token_settings():
    router = {"tls_cert": "/etc/t/tls.crt", "tls_key": "/etc/t/tls.key", "tls_client_ca": "/etc/t/ca.crt"}
    args = serve_config({"router": router})["applications"][0]["args"]
    assert args["router"] == {"host": CLUSTER_BIND_HOST, "port": FLEET_GRPC_PORT, **router}
    assert serve_config({"router": {"host": "10.0.0.5", "port": 9443}})["applications"][0]["args"]["router"] == {
        "host": "10.0.0.5", "port": 9443}


def test_cli_writes_the_serve_config(tmp_path, capsys):
    from moefleet.deploy_config import main

    out = tmp_path / "serve.yaml"
    argv = ["serve-config", "--checkpoint", "/m", "--num-workers", "3", "--arg", "router={batch_window_ms: 1.5}"]
    assert main([*argv, "-o", str(out)]) == 0
    config = yaml.safe_load(out.read_text())
    args = config["applications"][0]["args"]
    assert args == {"checkpoint": "/m", "num_workers": 3, "router": {"host": "0.0.0.0", "port": 9000, "batch_window_ms": 1.5}}
    assert main(["check", str(out)]) == 0
    assert main(["ray-start", "cpu", "--address", "10.0.0.1:6379"]) == 0
    assert capsys.readouterr().out.strip().endswith(ray_start_command(NODE_TYPES["cpu"], "10.0.0.1:6379"))


# -- Ray cluster launcher config --------------------------------------------------------------
def _launcher_config() -> dict:
    return yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())


def _prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_launcher_config_passes_rays_validation():
    prepared = _prepared(_launcher_config())
    assert prepared["head_node_type"] == "head"


def test_cluster_launcher_node_types_declare_exactly_what_the_inventory_renders():
    config = _launcher_config()
    node_types = config["available_node_types"]
    assert set(node_types) == set(NODE_TYPES) - DEV_TYPES
    for name, entry in node_types.items():
        assert entry["resources"] == node_resources(NODE_TYPES[name]), name
        assert entry["labels"] == node_labels(NODE_TYPES[name]), name
    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "--resources" not in commands and "--labels" not in commands  # the node types' own declarations apply


def test_cluster_launcher_nodes_give_the_node_types_devices():
    nodes = []
    for name, entry in _launcher_config()["available_node_types"].items():
        resources = {k: float(v) for k, v in entry["resources"].items()}
        node_id = f"{name:>8}".replace(" ", "0") + "0" * 48
        nodes.append({"NodeID": node_id, "Alive": True, "Resources": resources, "Labels": entry["labels"]})
    devices = inventory_from_nodes(nodes).devices
    assert sum(d.kind == "gpu" for d in devices) == NODE_TYPES["h100"].gpus + NODE_TYPES["l4"].gpus
    assert sum(d.kind == "cpu" for d in devices) == 1


def test_rays_cluster_validation_rejects_a_fractional_resource_and_an_unknown_key():
    config = _launcher_config()
    config["available_node_types"]["l4"]["resources"]["moefleet_speed"] = 0.122
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'integer'"):
        _prepared(config)
    config = _launcher_config()
    config["availabe_node_types"] = config.pop("available_node_types")
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        _prepared(config)


def test_cluster_launcher_runs_the_manifests_image():
    (image,) = {c["image"] for _, pod in _pod_specs() for c in pod["containers"] if "moe-fleet" in c["image"]}
    assert _launcher_config()["docker"]["image"] == image


# -- README -----------------------------------------------------------------------------------
def test_readme_ray_start_commands_are_what_the_inventory_renders():
    readme = (DEPLOY / "README.md").read_text()
    assert ray_start_command(NODE_TYPES["head"]) in readme
    for name in sorted(set(NODE_TYPES) - DEV_TYPES - {"head"}):
        assert ray_start_command(NODE_TYPES[name], "$HEAD_IP:6379") in readme, name


def test_readme_turns_on_rays_token_before_any_ray_start_or_deploy():
    readme = (DEPLOY / "README.md").read_text()
    bare = readme[readme.index("## 2. A Ray cluster"): readme.index("## 3. Ray cluster launcher")]
    first_start = bare.index("ray start --head")
    assert bare.index("ray get-auth-token --generate") < first_start  # a token exists before the head starts
    assert bare.index("export RAY_AUTH_MODE=token") < first_start
    assert bare.index("export MOEFLEET_AUTH_TOKEN=") < first_start  # the router on 0.0.0.0 requires one
    assert bare.index("export RAY_AUTH_MODE=token", first_start) < bare.index("ray start --address")
    assert "serve deploy moefleet-serve.yaml" in bare and "tls_cert:" in bare
    launcher = readme[readme.index("## 3. Ray cluster launcher"): readme.index("## 4. Kubernetes")]
    assert launcher.index("export RAY_AUTH_MODE=token") < launcher.index("ray up deploy/ray-cluster.yaml")
    kube = readme[readme.index("## 4. Kubernetes"):]
    for secret in ("moefleet-redis", "moefleet-ray-auth --from-literal=auth_token=", "moefleet-auth --from-literal=token=",
                   "moefleet-tls --from-file=tls.crt --from-file=tls.key"):
        assert f"kubectl create secret generic {secret}" in kube, secret
    dev = kube[kube.index("### Development cluster"):]
    assert dev.index("export RAY_AUTH_MODE=token") < dev.index("serve deploy")


def test_cluster_launcher_starts_every_node_with_rays_token_and_reads_secrets_from_files():
    config = _launcher_config()
    assert config["file_mounts"]["/home/ray/.ray-auth-token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        text = " ".join(config[key])
        assert "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/home/ray/.ray-auth-token;" in text, key
        assert text.index("RAY_AUTH_MODE=token") < text.index("ray start --"), key
    assert 'export MOEFLEET_AUTH_TOKEN="$(cat /home/ray/.moefleet-auth-token)"' in " ".join(config["head_start_ray_commands"])


def test_readme_applies_every_manifest():
    readme = (DEPLOY / "README.md").read_text()
    for path in KUBERAY.glob("*.yaml"):
        assert f"kubectl apply -f deploy/kuberay/{path.name}" in readme, path.name


# -- Dockerfile -------------------------------------------------------------------------------
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines, current = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
        current = ""
    return lines


def _build_args(instructions) -> dict[str, str]:
    out = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            out[key] = value
    return out


def test_dockerfile_base_image_is_pinned_and_matches_ray_and_python():
    import ray

    instructions = _dockerfile()
    args = _build_args(instructions)
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) == 1
    image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], froms[0].split()[0])
    repo, _, tag = image.rpartition(":")
    assert repo == "rayproject/ray" and tag and tag != "latest"
    assert tag.startswith(f"{ray.__version__}-py311-cu"), tag
    cuda = tag.rsplit("-", 1)[1]
    assert args["TORCH_INDEX_URL"].endswith(f"/whl/{cuda}")  # torch's CUDA build == the base image's CUDA


def test_dockerfile_installs_the_package_with_the_pinned_torch():
    instructions = _dockerfile()
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs)
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in runs
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"torch=={_build_args(instructions)['TORCH_VERSION']}" in pyproject["project"]["dependencies"]
    copied = " ".join(rest for word, rest in instructions if word == "COPY")
    for folder in set(pyproject["tool"]["setuptools"]["package-dir"].values()):
        assert f" {folder}/ " in f" {copied} ", f"{folder}/ is not copied into the image"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    folders = list(pyproject["tool"]["setuptools"]["package-dir"].values())
    for needed in ["pyproject.toml", "README.md", *folders]:
        assert f"!{needed}" in ignore, f"{needed} is excluded from the build context"


def test_dockerfile_runs_as_a_non_root_user():
    users = [rest for word, rest in _dockerfile() if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_has_a_grpc_healthcheck_and_a_default_command():
    instructions = _dockerfile()
    (health,) = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    assert "CMD" in health and "moefleet.router_service.healthcheck" in health
    assert re.search(r"127\.0\.0\.1:" + str(SERVE_GRPC_PORT), health)
    commands = [json.loads(rest) for word, rest in instructions if word in ("CMD", "ENTRYPOINT")]
    assert commands == [["serve", "run", "/home/ray/moefleet-serve.yaml"]]
    generated = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "moefleet.deploy_config serve-config --output /home/ray/moefleet-serve.yaml" in generated
    assert str(SERVE_GRPC_PORT) in [shlex.split(rest) for word, rest in instructions if word == "EXPOSE"][0]


def test_quantities_in_manifests_parse_as_kubernetes_quantities():
    from ray.autoscaler._private.kuberay.utils import parse_quantity

    for name, doc in RAY_DOCS:
        for group_name, group, _ in _groups(doc):
            for value in group["resources"].values():
                assert parse_quantity(value) > Decimal(0), f"{name}:{group_name}"
