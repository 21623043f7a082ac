"""Which path a layer call's tensors take between the router and one worker, chosen from where each runs.

- ``cuda_ipc``: router and worker hold CUDA tensors on one node, and the
  worker's process can see the router's GPU (and the router the worker's).
  The router exports the call's hidden states once
  (:func:`moefleet.core.cuda_ipc.export_tensor`, a few hundred bytes inline in
  the actor call); the worker opens them in place, runs its experts, and
  returns a handle to its partial output, which the router opens and combines
  on its GPU. No byte crosses the host.
- ``object_store``: anything else. CPU workers; a router without a GPU;
  different nodes; GPUs that cannot see each other (Ray gives each GPU
  actor only its own GPU, so two actors on different GPUs of one node land
  here). The hidden states go through Ray's object store as numpy, as they
  always have.

GPU pairs that CUDA IPC cannot join (other nodes, other GPUs) would be served
by Ray Direct Transport over NCCL; that path is not built here, and the
choice says so in its reason.

:func:`choose_transport` is pure (plain data in, a name and a reason out);
:func:`local_endpoint` describes the calling process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moefleet.core.cuda_ipc import gpu_uuid, visible_gpu_uuids

CUDA_IPC = "cuda_ipc"
OBJECT_STORE = "object_store"
TRANSPORTS = (CUDA_IPC, OBJECT_STORE)


@dataclass(frozen=True)
class Endpoint:
    """Where a router or worker process keeps its tensors.

    node: the node's id (Ray's node id, or a host name).
    gpu: UUID of the GPU its tensors live on, or None for the CPU.
    visible_gpus: UUIDs of every GPU the process can open (its CUDA_VISIBLE_DEVICES).
    """

    node: str
    gpu: str | None = None
    visible_gpus: tuple[str, ...] = ()


def choose_transport(router: Endpoint, worker: Endpoint) -> tuple[str, str]:
    """(``"cuda_ipc"`` or ``"object_store"``, the reason) for tensors between ``router`` and ``worker``."""
    if router.gpu is None or worker.gpu is None:
        side = "router" if router.gpu is None else "worker"
        return OBJECT_STORE, f"the {side} keeps its tensors on the CPU"
    if router.node != worker.node:
        return OBJECT_STORE, "router and worker are on different nodes (NCCL transport not built)"
    if router.gpu not in worker.visible_gpus or worker.gpu not in router.visible_gpus:
        return OBJECT_STORE, (
            "router and worker cannot see each other's GPU (separate CUDA_VISIBLE_DEVICES; NCCL transport not built)"
        )
    return CUDA_IPC, "same node, GPUs visible to both processes"


def local_endpoint(node: str, device: torch.device | str) -> Endpoint:
    """This process's Endpoint for tensors kept on ``device``."""
    device = torch.device(device)
    if device.type != "cuda":
        return Endpoint(node=node)
    return Endpoint(node=node, gpu=gpu_uuid(device), visible_gpus=visible_gpu_uuids())
