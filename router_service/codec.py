"""Tensors <-> ``moefleet.v1.Tensor`` messages, with validation that names the bad field."""

from __future__ import annotations

import math
import warnings

import torch

from .proto import fleet_pb2 as pb

TORCH_DTYPES = {
    pb.FLOAT32: torch.float32,
    pb.BFLOAT16: torch.bfloat16,
    pb.FLOAT16: torch.float16,
    pb.INT32: torch.int32,
}
PB_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}
FLOAT_DTYPES = (pb.FLOAT32, pb.BFLOAT16, pb.FLOAT16)


class TensorError(ValueError):
    """A tensor message that cannot be decoded; the message names the field."""


def encode(t: torch.Tensor) -> pb.Tensor:
    t = t.detach().contiguous().cpu()
    if t.dtype not in PB_DTYPES:
        raise TensorError(f"cannot encode dtype {t.dtype}")
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(data=data, shape=list(t.shape), dtype=PB_DTYPES[t.dtype])


def describe(meta: pb.Tensor, t: torch.Tensor) -> memoryview:
    """Write ``t``'s shape and dtype into ``meta``; return its bytes (a view, no copy) for ``wire.encode``."""
    t = t.detach().contiguous().cpu()
    if t.dtype not in PB_DTYPES:
        raise TensorError(f"cannot encode dtype {t.dtype}")
    meta.shape[:] = list(t.shape)
    meta.dtype = PB_DTYPES[t.dtype]
    if not t.numel():
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def decode(
    msg: pb.Tensor, field: str, *, ndim: int | None = None, float_only: bool = True, data=None, writable: bool = True
) -> torch.Tensor:
    """Decode ``msg``; raise TensorError naming ``field`` for a bad dtype, shape or byte length.

    data: the tensor's bytes when they were received apart from the message
    (``wire.decode``: a view of the received buffer); default ``msg.data``.
    writable: False returns a tensor over those bytes, without a copy where
    they are aligned for the dtype; the caller must not write to it.
    """
    allowed = FLOAT_DTYPES if float_only else tuple(TORCH_DTYPES)
    if msg.dtype not in allowed:
        names = ", ".join(pb.DType.Name(d) for d in allowed)
        raise TensorError(f"{field}.dtype: {pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else msg.dtype} is not supported (use one of {names})")
    shape = list(msg.shape)
    if ndim is not None and len(shape) != ndim:
        raise TensorError(f"{field}.shape: expected {ndim} dimensions, got {shape}")
    if any(d < 0 for d in shape):
        raise TensorError(f"{field}.shape: negative dimension in {shape}")
    if any(d > MAX_DIM for d in shape):
        raise TensorError(f"{field}.shape: dimension over {MAX_DIM} in {shape}")
    dtype = TORCH_DTYPES[msg.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    want = math.prod(shape) * itemsize
    if data is None:
        data = msg.data
    got = memoryview(data).nbytes
    if got != want:
        raise TensorError(
            f"{field}.data: {got} bytes disagree with shape {shape} and dtype {pb.DType.Name(msg.dtype)} ({want} bytes)"
        )
    if want == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        t = torch.frombuffer(data, dtype=dtype).reshape(shape)
    if writable or t.data_ptr() % itemsize:  # a copy: writable, or aligned for the dtype
        t = t.clone()
    return t


MAX_DIM = 1 << 31
"""Largest dimension accepted: empty tensors ([0, huge]) are refused before torch sizes them."""
