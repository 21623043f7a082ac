"""What a deployment asks of a Ray cluster, what the cluster has free, and why an actor waits.

Pure: plain data in (nodes and actors as Ray's state API lists them, as dicts),
messages out. ``moe-fleet deploy`` checks the cluster before it deploys
(``shortfall``: refuse, naming what is missing) and, when the application
does not come up in time, says which actors wait and why
(``pending_report``).

Free resources are a node's total minus what its live actors reserve (Ray's
state API gives both); tasks and placement groups are not counted. Actors the
deployment will reuse (the fleet's own workers, its Serve replicas) count as
free: a second ``moe-fleet deploy`` over a running fleet asks for nothing new.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

HEAD_NODE_RESOURCE = "node:__internal_head__"
"""Only the head node has it (Ray's own name); the ingress and the controller ask for a sliver of it."""
PENDING_STATES = ("PENDING_CREATION", "DEPENDENCIES_UNREADY", "RESTARTING")
"""Actor states of the state API that mean: not running yet."""
_EPS = 1e-9


@dataclass(frozen=True)
class Demand:
    """One actor the deployment starts: who it is and the Ray resources it reserves."""

    what: str  # "the ingress", "worker-0", "the controller"
    group: str  # how messages count it: "ingress", "worker", "controller"
    resources: Mapping[str, float]

    @property
    def on_head(self) -> bool:
        return self.resources.get(HEAD_NODE_RESOURCE, 0) > 0


@dataclass
class NodeFree:
    """A live node: what it declares and what is free of it."""

    node_id: str
    ip: str = ""
    head: bool = False
    total: dict[str, float] = field(default_factory=dict)
    free: dict[str, float] = field(default_factory=dict)

    def name(self) -> str:
        where = ", ".join(x for x in ("head" if self.head else "", self.ip) if x)
        return f"node {self.node_id[:8]}" + (f" ({where})" if where else "")

    def fits(self, resources: Mapping[str, float]) -> bool:
        return all(self.free.get(r, 0.0) + _EPS >= amount for r, amount in resources.items() if amount > 0)


def actor_resources(num_cpus: float = 0.0, num_gpus: float = 0.0, resources: Mapping[str, float] | None = None) -> dict[str, float]:
    """Ray actor options as the resource names Ray accounts them in (CPU, GPU, custom)."""
    out = {"CPU": float(num_cpus), "GPU": float(num_gpus), **{k: float(v) for k, v in (resources or {}).items()}}
    return {k: v for k, v in out.items() if v > 0}


def deployment_demands(num_workers: int, worker: Mapping[str, float], ingress: Mapping[str, float],
                       controller: Mapping[str, float] | None = None) -> list[Demand]:
    """The actors of a fleet's application: the ingress, ``num_workers`` workers alike, and the controller if any."""
    out = [Demand("the ingress", "ingress", dict(ingress))]
    out += [Demand(f"worker-{i}", "worker", dict(worker)) for i in range(num_workers)]
    if controller is not None:
        out.append(Demand("the controller", "controller", dict(controller)))
    return out


def _get(item, key, default=None):
    return item.get(key, default) if isinstance(item, Mapping) else getattr(item, key, default)


def free_resources(nodes: Iterable, actors: Iterable, reusable: Callable[[object], bool] = lambda a: False) -> list[NodeFree]:
    """Live nodes with what is free on each: total minus the resources its live actors reserve.

    nodes / actors: the state API's ``list_nodes`` / ``list_actors(detail=True)`` entries (dicts or
    its dataclasses): ``node_id``, ``node_ip``, ``is_head_node``, ``state``, ``resources_total``;
    ``state``, ``node_id``, ``required_resources``. ``reusable(actor)``: actors whose resources the
    deployment takes over (counted as free).
    """
    out = {}
    for n in nodes:
        if _get(n, "state") != "ALIVE":
            continue
        total = {k: float(v) for k, v in (_get(n, "resources_total") or {}).items()}
        out[_get(n, "node_id")] = NodeFree(_get(n, "node_id"), _get(n, "node_ip") or "", bool(_get(n, "is_head_node")),
                                            total, dict(total))
    for a in actors:
        node = out.get(_get(a, "node_id"))
        if node is None or _get(a, "state") != "ALIVE" or reusable(a):
            continue
        for r, amount in (_get(a, "required_resources") or {}).items():
            node.free[r] = node.free.get(r, 0.0) - float(amount)
    for node in out.values():
        node.free = {r: max(0.0, v) for r, v in node.free.items()}
    return sorted(out.values(), key=lambda n: (not n.head, n.node_id))


def place(demands: list[Demand], nodes: list[NodeFree]) -> tuple[dict[str, str], list[Demand]]:
    """First fit: head-pinned demands first, then the largest; returns {what: node_id} and what did not fit."""
    room = [NodeFree(n.node_id, n.ip, n.head, n.total, dict(n.free)) for n in nodes]
    order = sorted(demands, key=lambda d: (not d.on_head, -sum(v for k, v in d.resources.items() if not k.startswith("node:"))))
    placed, unplaced = {}, []
    for d in order:
        node = next((n for n in room if n.fits(d.resources)), None)
        if node is None:
            unplaced.append(d)
            continue
        for r, amount in d.resources.items():
            node.free[r] = node.free.get(r, 0.0) - amount
        placed[d.what] = node.node_id
    return placed, unplaced


def fmt_amount(x: float) -> str:
    return f"{x:g}" if abs(x - round(x)) > _EPS else str(int(round(x)))


def resource_label(name: str, amount: float) -> str:
    """'2.5 CPUs', '1 GPU', '2 of moefleet_cpu_tier'."""
    if name in ("CPU", "GPU"):
        return f"{fmt_amount(amount)} {name}{'' if abs(amount - 1) < _EPS else 's'}"
    if name == "memory":
        return f"{amount / 2**30:.1f} GiB of memory"
    return f"{fmt_amount(amount)} of {name}"


def resources_text(resources: Mapping[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if not k.startswith("node:")}
    text = ", ".join(resource_label(k, v) for k, v in sorted(shown.items()))
    if resources.get(HEAD_NODE_RESOURCE):
        text += (" " if text else "") + "on the head node"
    return text or "nothing"


def _who(demands: list[Demand]) -> str:
    """'the ingress and 2 workers'."""
    counts: dict[str, int] = {}
    for d in demands:
        counts[d.group] = counts.get(d.group, 0) + 1
    parts = []
    for group, n in counts.items():
        if group == "worker":
            parts.append(f"{n} worker{'s' if n != 1 else ''}")
        else:
            parts.append(f"the {group}")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def nodes_text(nodes: list[NodeFree], names: Iterable[str]) -> str:
    """'node 8be42060 (head, 127.0.0.1): 2 of 8 CPUs free'; one clause per node."""
    names = [r for r in names if not r.startswith("node:")] or ["CPU"]
    out = []
    for n in nodes:
        parts = []
        for r in names:
            if r not in n.total:
                parts.append(f"no {r}")
            elif r in ("CPU", "GPU"):
                parts.append(f"{fmt_amount(n.free.get(r, 0.0))} of {resource_label(r, n.total[r])} free")
            else:
                parts.append(f"{r} {fmt_amount(n.free.get(r, 0.0))} of {fmt_amount(n.total[r])} free")
        out.append(f"{n.name()}: {', '.join(parts)}")
    return "; ".join(out) if out else "no live node"


def shortfall(demands: list[Demand], nodes: list[NodeFree]) -> str | None:
    """None when every demand fits on the free resources; else what is missing, in a sentence.

    Sums first ("needs 2.5 CPUs for the ingress and 2 workers; the cluster has 2 free"), then, when
    the sums fit but no node has room for one actor, that actor.
    """
    _, unplaced = place(demands, nodes)
    if not unplaced:
        return None
    wanted = sorted({r for d in demands for r in d.resources if not r.startswith("node:")})
    short = []
    for r in wanted:
        users = [d for d in demands if d.resources.get(r, 0) > 0]
        need = sum(d.resources[r] for d in users)
        have = sum(n.free.get(r, 0.0) for n in nodes)
        if need > have + _EPS:
            short.append(f"needs {resource_label(r, need)} for {_who(users)}; the cluster has {fmt_amount(have)} free")
    if not any(n.head for n in nodes) and any(d.on_head for d in demands):
        short.append("needs a head node (Ray's node:__internal_head__); none is alive")
    if not short:
        d = unplaced[0]
        where = "the head node" if d.on_head else "one node"
        short.append(f"{d.what} needs {resources_text(d.resources)} on {where}; no node has that free")
    return "; ".join(short) + f" ({nodes_text(nodes, wanted)})"


def _actor_name(a) -> str:
    name = _get(a, "name") or ""
    cls = _get(a, "class_name") or "actor"
    return name or cls


def pending_report(actors: Iterable, nodes: list[NodeFree], ours: Callable[[object], bool] = lambda a: True) -> list[str]:
    """One line per actor of ours that is not running yet: its state, what it asks and why it waits."""
    lines = []
    for a in actors:
        state = _get(a, "state")
        if state not in PENDING_STATES or not ours(a):
            continue
        need = {k: float(v) for k, v in (_get(a, "required_resources") or {}).items()}
        undeclared = [r for r in need if need[r] > 0 and not any(r in n.total for n in nodes)]
        if undeclared:
            why = f"no node declares {', '.join(sorted(undeclared))}"
        elif any(n.fits(need) for n in nodes):
            why = "a node has room for it: Ray has not placed it yet (its process is starting, or waits on a dependency)"
        else:
            why = f"no node has that free ({nodes_text(nodes, need)})"
        lines.append(f"{_actor_name(a)}: {state}, asks {resources_text(need)}: {why}")
    return lines
