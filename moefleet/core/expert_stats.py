"""Per-layer expert token counts from production servers (SGLang, vLLM) as routing traces.

``load_expert_counts(path) -> [S, L, E]`` reads a ``.pt`` (``torch.save``) or
``.json`` file holding expert counts in any of these forms, and
``counts_to_trace(counts, period_s)`` turns it into a ``Trace`` (snapshot
``s`` at ``t = s * period_s``, one line per layer):

* a bare tensor / nested list ``[L, E]`` (one snapshot) or ``[S, L, E]``;
* SGLang's expert-distribution recorder, ``stat`` mode
  (``/dump_expert_distribution_record``, ``expert_distribution_recorder_*.pt``):
  a dict with ``logical_count`` ``[S, L, E]`` (one row per buffered forward
  pass; with a bounded ``expert_distribution_recorder_buffer_size`` the
  buffer is a ring, so rows are in ring order) or ``[L, E]``. The same key in
  a ``.json`` file is SGLang's ``--init-expert-location`` input;
* SGLang's ``per_token`` mode: a dict with ``records`` (one per forward pass,
  each with ``global_physical_count [L, P]``) and
  ``last_physical_to_logical_map [L, P]``;
* vLLM's EPLB state (``EplbState`` fields, e.g. dumped from a worker with
  ``collective_rpc``): ``expert_load_window [W, L, P]`` (a ring of the last
  ``W`` steps) or ``expert_load_pass [L, P]``, with
  ``physical_to_logical_map [L, P]``; or ``logical_load`` /
  ``global_expert_load_window`` already per logical expert.

Physical counts are summed onto their logical expert through the map
(slots mapped to ``-1`` are unused and dropped). Layers are numbered
``0 .. L-1`` as in the dump (the MoE layers in order); pass ``layers`` to
``counts_to_trace`` to use the model's layer numbers instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .trace import Trace, TraceError

__all__ = ["counts_to_trace", "load_expert_counts", "physical_to_logical"]

_LOGICAL_KEYS = ("logical_count", "logical_load", "global_expert_load_window")
_PHYSICAL_KEYS = ("expert_load_window", "expert_load_pass", "global_physical_count")


def _array(value: Any, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu", torch.float64).numpy()
    except ImportError:  # torch is a dependency; numpy-only use still works
        pass
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TraceError(f"{name}: expected a numeric array, got {type(value).__name__}") from None
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise TraceError(f"{name}: counts must be finite and >= 0")
    return arr


def _snapshots(arr: np.ndarray, name: str) -> np.ndarray:
    """``[L, E]`` -> ``[1, L, E]``; ``[S, L, E]`` kept."""
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise TraceError(f"{name}: expected [L, E] or [S, L, E] counts, got shape {arr.shape}")
    return arr


def physical_to_logical(physical: np.ndarray, mapping: np.ndarray, num_logical: int | None = None) -> np.ndarray:
    """Sum physical-expert counts ``[S, L, P]`` onto logical experts through ``mapping [L, P]`` -> ``[S, L, E]``.

    ``mapping[l, p]`` is the logical expert in slot ``p`` of layer ``l``; ``-1`` marks an unused slot.
    ``num_logical`` defaults to ``mapping.max() + 1``.
    """
    physical = _snapshots(np.asarray(physical, dtype=np.float64), "physical counts")
    mapping = np.asarray(mapping)
    if mapping.ndim != 2 or mapping.shape != physical.shape[1:]:
        raise TraceError(
            f"physical_to_logical_map: expected [L, P] = {tuple(physical.shape[1:])}, got shape {mapping.shape}"
        )
    if not np.all(mapping == np.round(mapping)) or np.any(mapping < -1):
        raise TraceError("physical_to_logical_map: entries must be logical expert ids or -1")
    mapping = mapping.astype(np.int64)
    num_logical = int(mapping.max()) + 1 if num_logical is None else int(num_logical)
    if num_logical <= 0 or mapping.max() >= num_logical:
        raise TraceError(f"physical_to_logical_map: ids must be < {num_logical} logical experts")
    num_snap, num_layers, _ = physical.shape
    out = np.zeros((num_snap, num_layers, num_logical))
    used = mapping >= 0
    for layer in range(num_layers):
        cols = np.flatnonzero(used[layer])
        np.add.at(out[:, layer, :], (slice(None), mapping[layer, cols]), physical[:, layer, cols])
    return out


def _from_object(obj: Any, source: str) -> np.ndarray:
    if not isinstance(obj, dict):
        return _snapshots(_array(obj, source), source)
    for key in _LOGICAL_KEYS:
        if key in obj:
            return _snapshots(_array(obj[key], key), key)
    if "records" in obj:  # SGLang per_token mode
        records = obj["records"]
        if not isinstance(records, list) or not records:
            raise TraceError("records: expected a non-empty list of forward-pass records")
        if "last_physical_to_logical_map" not in obj:
            raise TraceError("last_physical_to_logical_map: missing (needed to map SGLang's physical counts)")
        try:
            phys = np.stack([_array(r["global_physical_count"], "records[].global_physical_count") for r in records])
        except (KeyError, TypeError):
            raise TraceError("records: each record needs global_physical_count [L, P]") from None
        except ValueError as e:
            raise TraceError(f"records: global_physical_count shapes differ ({e})") from None
        return physical_to_logical(phys, _map(obj["last_physical_to_logical_map"]))
    for key in _PHYSICAL_KEYS:
        if key in obj:
            if "physical_to_logical_map" not in obj:
                raise TraceError(f"physical_to_logical_map: missing (needed to map {key} to logical experts)")
            return physical_to_logical(_array(obj[key], key), _map(obj["physical_to_logical_map"]))
    raise TraceError(
        f"{source}: no expert counts found; expected one of "
        f"{', '.join(_LOGICAL_KEYS + _PHYSICAL_KEYS)} or records (found keys {sorted(map(str, obj))[:8]})"
    )


def _map(value: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
    except ImportError:
        pass
    return np.asarray(value)


def load_expert_counts(path: str | Path) -> np.ndarray:
    """``[S, L, E]`` float64 token counts from an SGLang / vLLM expert-statistics file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"expert counts: no file {path}")
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TraceError(f"{path}: not JSON ({e})") from None
    elif path.suffix in (".pt", ".pth"):
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a corrupt or non-tensor file
            raise TraceError(f"{path}: torch.load failed ({type(e).__name__}: {e})") from None
    else:
        raise TraceError(f"{path}: expected a .pt, .pth or .json file")
    return _from_object(obj, path.name)


def counts_to_trace(counts: np.ndarray, period_s: float = 1.0, layers: Sequence[int] | None = None) -> Trace:
    """A ``Trace`` from ``[S, L, E]`` (or ``[L, E]``) counts: snapshot ``s`` at ``t = s * period_s``, a line per layer.

    Counts are rounded to whole tokens. ``layers`` gives the model layer of each row (default ``0 .. L-1``).
    """
    arr = _snapshots(np.asarray(counts, dtype=np.float64), "counts")
    if not period_s > 0:
        raise TraceError(f"period_s: must be > 0, got {period_s}")
    num_snap, num_layers, _ = arr.shape
    layer_ids = np.arange(num_layers) if layers is None else np.asarray(list(layers), dtype=np.int64)
    if layer_ids.shape != (num_layers,):
        raise TraceError(f"layers: need {num_layers} layer numbers, got {len(layer_ids)}")
    t = np.repeat(np.arange(num_snap) * float(period_s), num_layers)
    return Trace(t=t, layer=np.tile(layer_ids, num_snap), counts=np.rint(arr).reshape(num_snap * num_layers, -1))
