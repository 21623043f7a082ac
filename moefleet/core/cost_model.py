"""What one layer call costs, and where: bytes per link and seconds per stage. One model, used twice.

The router counts what its calls move with :func:`call_bytes`
(``moefleet_transport_bytes_total``), and the simulator (``moe-fleet plan``)
charges its simulated calls with the same function and :func:`call_seconds`,
so the simulator models the transport the product has.

How a call's tensors travel (``router_service/transport.py`` picks one per
worker, from where router and worker keep their tensors):

* ``shared_memory``: router and worker on one node, hidden states in host
  memory. The router writes the call's batch ``[T, H]`` once (a compiled
  graph's shared-memory channel, or one object in Ray's store) and every
  worker of that node reads it in place, materialising only its own rows. Each
  worker writes its partial output ``[U, H]`` back the same way.
* ``cuda_ipc``: router and worker on one node, tensors on GPUs that both
  processes can open. Only handles move; the worker reads the router's batch
  and the router the worker's partial in place. No byte crosses the host.
* ``rows``: the worker is on another node. Only the rows it computes cross the
  network: its unique tokens ``[U, H]`` there, its partial ``[U, H]`` back.
* ``local``: a worker in the router's own process (tests, the in-process fleet).

Plain data in, plain data out: no Ray, no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

TRANSPORTS = ("shared_memory", "cuda_ipc", "rows", "local")
"""Labels of ``moefleet_transport_bytes_total{transport}``."""


@dataclass(frozen=True)
class WorkerPart:
    """One worker's share of one layer call.

    rows: (token, expert) assignments it computes. unique_tokens: tokens among
    them (the partial output rows it returns). experts: distinct experts it runs.
    transport: how the router reaches it (``TRANSPORTS``).
    """

    worker: str
    rows: int
    unique_tokens: int
    transport: str
    experts: int = 1

    def __post_init__(self):
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport: expected one of {TRANSPORTS}, got {self.transport!r}")
        if self.rows < 0 or self.unique_tokens < 0 or self.unique_tokens > max(self.rows, 0):
            raise ValueError(f"worker {self.worker}: need 0 <= unique_tokens <= rows, got {self.unique_tokens} and {self.rows}")


@dataclass(frozen=True)
class CallBytes:
    """Bytes one layer call moves: per transport in each direction, and per worker.

    to_workers / from_workers: transport -> bytes. per_worker: worker -> (to, from);
    the shared batch of ``shared_memory`` is written once for all of a node's
    workers and counted once, under the transport, not per worker.
    """

    to_workers: dict[str, int] = field(default_factory=dict)
    from_workers: dict[str, int] = field(default_factory=dict)
    per_worker: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def total_to(self) -> int:
        return sum(self.to_workers.values())

    @property
    def total_from(self) -> int:
        return sum(self.from_workers.values())


def call_bytes(tokens: int, hidden: int, act_bytes: int, partial_bytes: int, parts: Iterable[WorkerPart]) -> CallBytes:
    """The bytes a call of ``tokens`` hidden states ``[T, hidden]`` moves to and from its workers.

    act_bytes: bytes per element of the hidden states as sent (the compute dtype);
    partial_bytes: per element of the partials returned (the workers' compute dtype).
    """
    to: dict[str, int] = {}
    back: dict[str, int] = {}
    per: dict[str, tuple[int, int]] = {}
    shared_written = False
    for p in parts:
        if p.rows == 0:
            continue
        if p.transport == "shared_memory":
            if not shared_written:
                to[p.transport] = to.get(p.transport, 0) + tokens * hidden * act_bytes
                shared_written = True
            sent, returned = 0, p.unique_tokens * hidden * partial_bytes
        elif p.transport == "rows":
            sent, returned = p.unique_tokens * hidden * act_bytes, p.unique_tokens * hidden * partial_bytes
        else:  # cuda_ipc, local: read in place
            sent, returned = 0, 0
        to[p.transport] = to.get(p.transport, 0) + sent
        back[p.transport] = back.get(p.transport, 0) + returned
        per[p.worker] = (sent, returned)
    return CallBytes(to, back, per)


@dataclass(frozen=True)
class LinkSpeeds:
    """Bytes per second of each transport, and the fixed cost of reaching a worker.

    Defaults: host memory copies on the development machine (about 10 GB/s,
    DESIGN.md), 50 GB/s for a network between GPU nodes (400 Gb/s), and GPU
    memory for CUDA IPC, where only handles move.
    """

    shared_memory: float = 10e9
    cuda_ipc: float = 1e12
    rows: float = 50e9
    local: float = 1e12
    latency_s: float = 0.0
    """Seconds one worker's round trip costs besides its bytes (the call's fixed cost, per worker)."""

    def bytes_per_s(self, transport: str) -> float:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport: expected one of {TRANSPORTS}, got {transport!r}")
        return float(getattr(self, transport))


@dataclass(frozen=True)
class RouterSpeeds:
    """The router's own work per call: fixed seconds, plus its gate (FLOPs) and combine (bytes) at its device's speed.

    per_call_s: validation, dispatch planning, the transport's submission;
    flops_per_s: gate ``T x H x E`` multiply-adds; combine_bytes_per_s: summing
    the partials into the output in fp32.
    """

    per_call_s: float = 0.0
    flops_per_s: float = 1e11
    combine_bytes_per_s: float = 10e9


def call_seconds(
    tokens: int,
    hidden: int,
    num_experts: int,
    act_bytes: int,
    partial_bytes: int,
    parts: Iterable[WorkerPart],
    compute_s: Mapping[str, float],
    links: LinkSpeeds = LinkSpeeds(),
    router: RouterSpeeds = RouterSpeeds(),
) -> dict[str, float]:
    """Seconds per stage of one call, and ``total``: the router's gate, its batch into the transport, each
    worker's inbound bytes + compute (``compute_s[worker]``) + outbound bytes (the slowest counts), the combine.

    Stages: ``router`` (fixed), ``gate``, ``to_workers`` (the shared batch written, then the slowest
    worker's own inbound rows), ``workers`` (the slowest worker's inbound + compute + outbound + latency),
    ``combine``, ``total``.
    """
    parts = [p for p in parts if p.rows]
    nbytes = call_bytes(tokens, hidden, act_bytes, partial_bytes, parts)
    gate_s = 2.0 * tokens * hidden * num_experts / router.flops_per_s
    shared_s = nbytes.to_workers.get("shared_memory", 0) / links.bytes_per_s("shared_memory") if parts else 0.0
    slowest = 0.0
    inbound_max = 0.0
    for p in parts:
        sent, returned = nbytes.per_worker.get(p.worker, (0, 0))
        speed = links.bytes_per_s(p.transport)
        inbound = sent / speed
        inbound_max = max(inbound_max, inbound)
        slowest = max(slowest, links.latency_s + inbound + float(compute_s.get(p.worker, 0.0)) + returned / speed)
    combine_s = sum(p.unique_tokens for p in parts) * hidden * 4 / router.combine_bytes_per_s
    total = router.per_call_s + gate_s + shared_s + slowest + combine_s
    return {
        "router": router.per_call_s, "gate": gate_s, "to_workers": shared_s + inbound_max, "workers": slowest,
        "combine": combine_s, "total": total,
    }


def weight_load_seconds(weight_bytes: int, source: str, *, checkpoint_bytes_per_s: float = 2e9, peer_bytes_per_s: float = 50e9) -> float:
    """Seconds to bring one expert's weights onto a device: read from the checkpoint, or copied from a peer holding them."""
    if source == "checkpoint":
        return weight_bytes / checkpoint_bytes_per_s
    if source == "peer":
        return weight_bytes / peer_bytes_per_s
    raise ValueError(f"source: expected 'checkpoint' or 'peer', got {source!r}")
