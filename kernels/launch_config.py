"""Triton launch parameters as data: the files in ``configs/``, a cached loader, a default.

Two kinds of entry, as vLLM keeps its ``fused_moe/configs/*.json``:

- ``configs/default.json`` (always there) holds the defaults for every GPU:
  ``fused_topk`` and ``combine`` (one entry each: their tiles follow E and H,
  not the batch), and ``moe``, a table of row buckets for the two grouped
  GEMMs of an expert FFN.
- ``configs/E=<E>,N=<F>,device_name=<GPU>,dtype=<dtype>.json`` (written by
  ``python -m moefleet.kernels.tune`` on the GPU it names) holds a tuned
  table for one expert count E, intermediate size F (vLLM's ``N``), device
  and dtype. ``<GPU>`` is ``torch.cuda.get_device_name()`` with spaces as
  ``_`` (``NVIDIA_H100_80GB_HBM3``).

A table maps a row count to the parameters of both kernels::

    {"16":   {"gate_up": {"BLOCK_M": 16, ...}, "down": {"BLOCK_M": 16, ...}},
     "4096": {"gate_up": {...}, "down": {...}}}

The key is N, the rows of the permuted batch the grouped GEMMs run over
(``T * K`` for a whole layer; a worker's share of it on a worker). vLLM keys by
tokens T; keying by rows lets a worker, which sees rows and not K, pick the same
entry. A call takes the entry whose key is nearest to its N (vLLM's rule), so
small batches get decode-sized tiles and large ones large tiles. Keys starting
with ``_`` (``_meta``, ``_comment``) are notes, never read as buckets.

Everything read is checked (:func:`check_kernel_config`) and cached per
(E, F, device, dtype); nothing here launches or imports a GPU.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CONFIG_DIR",
    "GEMM_KEYS",
    "MOE_KERNEL_KEYS",
    "check_kernel_config",
    "get_launch_config",
    "moe_config",
    "moe_config_file_name",
    "moe_config_table",
    "nearest_bucket",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: Keys of one grouped-GEMM kernel's launch parameters.
GEMM_KEYS: tuple[str, ...] = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
#: The two kernels of a bucket and their keys: the fused gate/up GEMM, and the
#: down GEMM, which may split its reduction in SPLIT_K parts (summed by the
#: combine kernel in a fixed order; the activation keeps gate/up whole).
MOE_KERNEL_KEYS: dict[str, tuple[str, ...]] = {"gate_up": GEMM_KEYS, "down": (*GEMM_KEYS, "SPLIT_K")}
MOE_KERNELS: tuple[str, ...] = tuple(MOE_KERNEL_KEYS)
_SINGLE_KEYS: dict[str, tuple[str, ...]] = {
    "fused_topk": ("BLOCK_ELEMENTS", "num_warps", "num_stages"),
    "combine": ("BLOCK_H", "num_warps"),
}
# tl.dot needs every tile dim >= 16 on GPUs.
_MIN_DOT_BLOCK = 16
_POW2_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_ELEMENTS", "BLOCK_H", "num_warps")


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def moe_config_file_name(num_experts: int, inter: int, device_name: str, dtype: torch.dtype | str) -> str:
    """``E=<E>,N=<F>,device_name=<name>,dtype=<dtype>.json`` (vLLM's naming; spaces in the name as ``_``)."""
    return f"E={num_experts},N={inter},device_name={device_name.replace(' ', '_')},dtype={dtype_name(dtype)}.json"


def check_kernel_config(cfg: Any, keys: tuple[str, ...], where: str) -> dict[str, int]:
    """Raise ``ValueError`` naming ``where`` unless ``cfg`` holds ``keys`` as valid positive ints."""
    if not isinstance(cfg, dict):
        raise ValueError(f"launch config {where}: expected an object, got {type(cfg).__name__}")
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ValueError(f"launch config {where} lacks {missing}")
    unknown = sorted(set(cfg) - set(keys))
    if unknown:
        raise ValueError(f"launch config {where} has unknown keys {unknown}; expected {list(keys)}")
    for key in keys:
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"launch config {where}: {key} must be a positive int, got {value!r}")
        if key in _POW2_KEYS and value & (value - 1):
            raise ValueError(f"launch config {where}: {key} must be a power of 2, got {value}")
        if key in ("BLOCK_M", "BLOCK_N", "BLOCK_K") and value < _MIN_DOT_BLOCK:
            raise ValueError(f"launch config {where}: {key} must be >= {_MIN_DOT_BLOCK}, got {value}")
    return {k: cfg[k] for k in keys}


def _check_table(table: Any, source: str) -> tuple[tuple[int, dict[str, dict[str, int]]], ...]:
    """A row-bucket table -> ((rows, {"gate_up": cfg, "down": cfg}), ...) sorted by rows."""
    if not isinstance(table, dict):
        raise ValueError(f"launch config table in {source}: expected an object of row buckets")
    buckets = []
    for key, entry in table.items():
        if key.startswith("_"):
            continue
        try:
            rows = int(key)
        except ValueError:
            raise ValueError(f"launch config table in {source}: bucket key {key!r} is not a row count") from None
        if rows < 1:
            raise ValueError(f"launch config table in {source}: bucket key {key!r} must be >= 1")
        if not isinstance(entry, dict) or set(entry) - {"_comment"} != set(MOE_KERNELS):
            raise ValueError(f"launch config table in {source}: bucket {key!r} must hold exactly {list(MOE_KERNELS)}")
        buckets.append(
            (rows, {k: check_kernel_config(entry[k], MOE_KERNEL_KEYS[k], f"{source} [{key}][{k}]") for k in MOE_KERNELS})
        )
    if not buckets:
        raise ValueError(f"launch config table in {source} has no row buckets")
    return tuple(sorted(buckets, key=lambda b: b[0]))


@functools.lru_cache(maxsize=None)
def _read_json(path: Path) -> Any:
    with path.open() as f:
        return json.load(f)


def _default_file(config_dir: Path) -> dict[str, Any]:
    path = config_dir / "default.json"
    data = _read_json(path)
    for op in (*_SINGLE_KEYS, "moe"):
        if op not in data:
            raise ValueError(f"{path} has no entry for {op!r}")
    return data


@functools.lru_cache(maxsize=None)
def _table_cached(config_dir: Path, num_experts: int, inter: int, device_name: str | None, dtype: str):
    if device_name:
        tuned = config_dir / moe_config_file_name(num_experts, inter, device_name, dtype)
        if tuned.is_file():
            return _check_table(_read_json(tuned), str(tuned)), str(tuned)
    source = str(config_dir / "default.json")
    return _check_table(_default_file(config_dir)["moe"], f"{source} ['moe']"), source


def moe_config_table(
    num_experts: int, inter: int, device_name: str | None, dtype: torch.dtype | str, config_dir: Path | None = None
) -> tuple[tuple[tuple[int, dict[str, dict[str, int]]], ...], str]:
    """(buckets, source file) for an expert FFN: the tuned file for (E, F, device, dtype) if present, else the default table."""
    return _table_cached(Path(config_dir or CONFIG_DIR), num_experts, inter, device_name, dtype_name(dtype))


def nearest_bucket(buckets, rows: int):
    """The bucket whose row key is nearest to ``rows`` (ties: the smaller key)."""
    return min(buckets, key=lambda b: (abs(b[0] - rows), b[0]))


def moe_config(
    num_experts: int,
    inter: int,
    rows: int,
    device_name: str | None,
    dtype: torch.dtype | str,
    config_dir: Path | None = None,
) -> dict[str, dict[str, int]]:
    """Launch parameters ``{"gate_up": {...}, "down": {...}}`` for N = ``rows`` permuted rows.

    Args:
        num_experts: E of the stacked weights. inter: F, the intermediate size.
        rows: N, the rows of the permuted batch (``T * K`` for a whole layer).
        device_name: ``torch.cuda.get_device_name()``, or None off CUDA (defaults).
        dtype: the input dtype.
    Returns fresh dicts (callers may change them).
    """
    buckets, _ = moe_config_table(num_experts, inter, device_name, dtype, config_dir)
    _, entry = nearest_bucket(buckets, max(1, rows))
    return {k: dict(v) for k, v in entry.items()}


@functools.lru_cache(maxsize=None)
def _single_cached(config_dir: Path, op: str) -> tuple[tuple[str, int], ...]:
    data = _default_file(config_dir)
    cfg = check_kernel_config(data[op], _SINGLE_KEYS[op], f"{config_dir / 'default.json'} [{op!r}]")
    return tuple(sorted(cfg.items()))


def get_launch_config(op: str, config_dir: Path | None = None) -> dict[str, int]:
    """Launch parameters of ``"fused_topk"`` or ``"combine"`` (from ``default.json``; cached, a fresh dict)."""
    if op not in _SINGLE_KEYS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_SINGLE_KEYS)} (expert GEMMs: moe_config)")
    return dict(_single_cached(Path(config_dir or CONFIG_DIR), op))


def clear_caches() -> None:
    """Forget every file read (after writing a new config file in the same process)."""
    _read_json.cache_clear()
    _table_cached.cache_clear()
    _single_cached.cache_clear()
