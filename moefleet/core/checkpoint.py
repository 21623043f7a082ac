"""Lazy reading of Hugging Face-format checkpoint directories.

A checkpoint directory holds ``config.json`` and either ``model.safetensors``
or a sharded ``model.safetensors.index.json``. Tensors are memory-mapped and
read on demand, one tensor (or a row range of one) at a time: asking for two
experts reads those experts' bytes and no others.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A checkpoint that cannot be served; the message names what is wrong."""


class UnknownFamilyError(CheckpointError):
    pass


class MissingTensorError(CheckpointError):
    pass


class ShapeMismatchError(CheckpointError):
    pass


class CorruptCheckpointError(CheckpointError):
    pass


class Checkpoint:
    """Tensor index over the safetensors files of one checkpoint directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self.path}: config.json is missing")
        try:
            self.config: dict = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise CorruptCheckpointError(f"{config_file}: not valid JSON ({e})") from e
        self._files: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._lock = threading.Lock()
        self.reads: list[str] = []
        """Names of tensors read so far, in order (for inspection and tests)."""
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CorruptCheckpointError(f"{index}: not a safetensors index ({e})") from e
            for name, file in weight_map.items():
                self._files[name] = self.path / file
            for file in sorted(set(self._files.values())):
                if not file.is_file():
                    raise MissingTensorError(f"{file}: shard named in the index is missing")
                self._open(file)
        elif single.is_file():
            for name in self._open(single).keys():
                self._files[name] = single
        else:
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")

    def _open(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise CorruptCheckpointError(f"{file.name}: corrupt safetensors file ({e})") from e
            self._handles[file] = handle
        return handle

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def names(self) -> list[str]:
        return sorted(self._files)

    def _file(self, name: str) -> Path:
        try:
            return self._files[name]
        except KeyError:
            raise MissingTensorError(f"{self.path.name}: tensor {name!r} is missing from the checkpoint") from None

    def shape(self, name: str) -> tuple[int, ...]:
        with self._lock:
            return tuple(self._open(self._file(name)).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype name of ``name`` ("BF16", "F8_E4M3", "U8", ...)."""
        with self._lock:
            return self._open(self._file(name)).get_slice(name).get_dtype()

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor ``name``, or only its rows ``[start, stop)`` of dim 0, copied out of the map."""
        with self._lock:
            handle = self._open(self._file(name))
            sl = handle.get_slice(name)
            try:
                if rows is None and not sl.get_shape():  # a 0-d tensor (a per-tensor scale) takes no slice
                    t = handle.get_tensor(name)
                else:
                    t = sl[rows[0] : rows[1]] if rows is not None else sl[:]
            except (SafetensorError, RuntimeError, ValueError) as e:
                raise CorruptCheckpointError(f"{self.path.name}: cannot read tensor {name!r} ({e})") from e
            self.reads.append(name)
        return t.clone() if t.dim() == 0 else t.contiguous()
