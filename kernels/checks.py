"""When the kernels check the *values* of their index inputs.

Shapes, dtypes and devices are always checked (host metadata, free). Values
(expert offsets that never decrease, expert ids below E) live on the device:
reading them on CUDA is a device-to-host copy that stalls the stream and breaks
CUDA-graph capture. So on CUDA they are checked only in debug mode, set with
``MOEFLEET_KERNEL_DEBUG=1``; on CPU tensors they are always checked (no copy).
The serving path builds its offsets and ids itself, so they are right by
construction; the kernels never read or write outside their tensors whatever
the values (every index is masked by the row ranges they are given).
"""

from __future__ import annotations

import os

import torch

DEBUG_ENV = "MOEFLEET_KERNEL_DEBUG"


def debug_mode() -> bool:
    """True when ``MOEFLEET_KERNEL_DEBUG`` is set to anything but ``""`` or ``"0"``."""
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def check_values(t: torch.Tensor, requested: bool | None = None) -> bool:
    """Whether to check ``t``'s values: as ``requested`` if given, else off CUDA or in debug mode."""
    if requested is not None:
        return bool(requested)
    return not t.is_cuda or debug_mode()
