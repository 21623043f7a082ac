"""Tensors as numpy arrays for Ray's zero-copy object store, bf16 included.

numpy has no bfloat16: a bf16 tensor travels as its uint16 bit pattern with
the dtype name beside it.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"dtype: {dtype} is not one of {sorted(DTYPES)}")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A torch view of ``a`` (read-only arrays from the object store included)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(a)
    if dtype == "bfloat16":
        return t.view(torch.bfloat16)
    want = DTYPES[dtype]
    if t.dtype != want:
        raise ValueError(f"array of {t.dtype} where {dtype} was declared")
    return t
