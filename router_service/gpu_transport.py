"""Which path a layer call's tensors take between a router and one worker, chosen from where each runs.

The names are the cost model's (``moefleet.core.cost_model.TRANSPORTS``):

- ``cuda_ipc``: router and worker hold CUDA tensors on one node, and each
  process can open the other's GPU. The router exports the call's hidden
  states once (:func:`moefleet.core.cuda_ipc.export_tensor`, a few hundred
  bytes in the call); the worker opens them in place, reads only its rows,
  and returns a handle to its partial output, which the router opens and sums
  on its GPU. No byte crosses the host.
- ``shared_memory``: router and worker on one node, but not both on GPUs they
  can share (a CPU fleet; a router without a GPU; GPUs in separate
  ``CUDA_VISIBLE_DEVICES``). The call's batch goes into host shared memory
  once, for every such worker of the node (a compiled graph's channel, or
  Ray's object store), and each worker copies only its own rows to its device.
- ``rows``: the worker is on another node. Only its unique tokens travel, and
  its partial output back. Between GPU nodes those rows pass through host
  memory on both ends: a GPU-to-GPU path (NCCL through a compiled graph or Ray
  Direct Transport) is not built, and the reason says so.

:func:`choose_transport` is pure (plain data in, a name and a reason out);
:func:`local_endpoint` describes the calling process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moefleet.core.cuda_ipc import gpu_uuid, visible_gpu_uuids

CUDA_IPC = "cuda_ipc"
SHARED_MEMORY = "shared_memory"
ROWS = "rows"
TRANSPORTS = (CUDA_IPC, SHARED_MEMORY, ROWS)


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
    """(``"cuda_ipc"``, ``"shared_memory"`` or ``"rows"``, the reason) for tensors between ``router`` and ``worker``."""
    if router.node != worker.node:
        if router.gpu is not None and worker.gpu is not None:
            return ROWS, "router and worker are on different nodes: rows only, through host memory (NCCL path not built)"
        return ROWS, "router and worker are on different nodes: only the worker's rows cross the network"
    if router.gpu is None or worker.gpu is None:
        side = "router" if router.gpu is None else "worker"
        return SHARED_MEMORY, f"same node; the {side} keeps its tensors on the CPU"
    if router.gpu not in worker.visible_gpus or worker.gpu not in router.visible_gpus:
        return SHARED_MEMORY, "same node, but router and worker cannot see each other's GPU (separate CUDA_VISIBLE_DEVICES)"
    return CUDA_IPC, "same node, GPUs visible to both processes"


def local_endpoint(node: str, device: torch.device | str) -> Endpoint:
    """This process's Endpoint for tensors kept on ``device``."""
    device = torch.device(device)
    if device.type != "cuda":
        return Endpoint(node=node)
    return Endpoint(node=node, gpu=gpu_uuid(device), visible_gpus=visible_gpu_uuids())
