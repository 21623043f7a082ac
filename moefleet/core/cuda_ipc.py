"""Hand CUDA tensors between processes of one node without a host round trip (CUDA IPC).

``export_tensor(t)`` turns a CUDA tensor into a :class:`CudaTensorHandle`: a
few hundred bytes (the CUDA IPC handle of the allocation holding ``t``, its
offset, shape, strides and dtype, the GPU's UUID, and an IPC event that
orders a consumer after the producer's writes). It pickles like any small
object, so it travels inline in a Ray actor call or a pipe. ``open_tensor``
in another process of the same node maps that memory: the tensor it returns
*is* the producer's, no byte is copied through the host.

Both rest on ``torch.multiprocessing``'s CUDA reductions (what torch's own
multiprocessing queues use): a reference count shared through the handle
keeps the producer's block allocated while a consumer holds a view, even
after the producer drops its own reference; a producer reclaims blocks its
consumers have released with ``torch.cuda.ipc_collect()``.

What CUDA IPC needs: producer and consumer on one node, and the producer's
GPU visible to the consumer (the same GPU, or a peer GPU the consumer's
``CUDA_VISIBLE_DEVICES`` includes). Ray gives each GPU actor only its own
GPU, so between actors on *different* GPUs a handle cannot be opened:
:func:`open_tensor` then raises ``ValueError`` naming the UUID, and such
pairs use another path (see ``router_service/gpu_transport.py``).

The base floor: imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CudaTensorHandle", "export_tensor", "gpu_uuid", "open_tensor", "visible_gpu_uuids"]

# Position of the device index in torch's rebuild_cuda_tensor arguments.
_DEVICE_ARG = 6


def gpu_uuid(device: torch.device | int) -> str:
    """The GPU's UUID as CUDA reports it (stable across processes, unlike device indices)."""
    return str(torch.cuda.get_device_properties(device).uuid)


def visible_gpu_uuids() -> tuple[str, ...]:
    """UUIDs of the GPUs this process can see, by local index; () without CUDA."""
    if not torch.cuda.is_available():
        return ()
    return tuple(gpu_uuid(i) for i in range(torch.cuda.device_count()))


@dataclass(frozen=True)
class CudaTensorHandle:
    """A CUDA tensor exported for another process of the same node (see module docstring).

    gpu: UUID of the GPU holding the memory. shape, dtype, nbytes: of the tensor.
    """

    gpu: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    _rebuild_args: tuple[Any, ...]


def export_tensor(t: torch.Tensor) -> CudaTensorHandle:
    """A handle to ``t``'s memory for another process; ``t`` must be a dense CUDA tensor."""
    from torch.multiprocessing.reductions import reduce_tensor

    if not isinstance(t, torch.Tensor) or not t.is_cuda:
        raise ValueError(f"export_tensor needs a CUDA tensor, got {getattr(t, 'device', type(t).__name__)}")
    if t.is_sparse or t.layout != torch.strided:
        raise ValueError(f"export_tensor needs a dense (strided) tensor, got layout {t.layout}")
    if t.requires_grad:
        t = t.detach()
    _, args = reduce_tensor(t)
    return CudaTensorHandle(
        gpu=gpu_uuid(t.device), shape=tuple(t.shape), dtype=t.dtype, nbytes=t.numel() * t.element_size(), _rebuild_args=args
    )


def open_tensor(handle: CudaTensorHandle) -> torch.Tensor:
    """The producer's tensor, mapped into this process (no copy); ValueError if its GPU is not visible here."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if not isinstance(handle, CudaTensorHandle):
        raise ValueError(f"open_tensor needs a CudaTensorHandle, got {type(handle).__name__}")
    visible = visible_gpu_uuids()
    if handle.gpu not in visible:
        raise ValueError(
            f"GPU {handle.gpu} holding the tensor is not visible in this process (visible: {list(visible)}); "
            "CUDA IPC needs the producer's GPU among this process's CUDA_VISIBLE_DEVICES"
        )
    args = list(handle._rebuild_args)
    args[_DEVICE_ARG] = visible.index(handle.gpu)  # the producer's index may differ from ours
    return rebuild_cuda_tensor(*args)
