"""Quantized checkpoints: which formats are read, and how their tensors come back.

Two formats, as they are published (see ``QuantSpec`` for the layouts):

- ``fp8`` (``quant_method: fp8``, DeepSeek-V3/R1, Kimi-K2, Qwen3 FP8): a
  float8 e4m3 ``X.weight`` with ``X.weight_scale_inv`` [ceil(out / bo), ceil(in / bi)]
  (fp32) beside it; a fused tensor ``X`` has ``X_scale_inv``.
- ``mxfp4`` (``quant_method: mxfp4``, gpt-oss): the float tensor ``X``
  ``[E, in, out]`` is stored as ``X_blocks`` [E, out, in / 32, 16] (uint8, two
  e2m1 values a byte, low nibble first) and ``X_scales`` [E, out, in / 32]
  (uint8 e8m0 exponents, bias 127).

Families name the float tensor; ``QuantReader`` finds its quantized form beside
it. Reading is lazy and per expert, like plain tensors: one expert's slice of a
fused tensor, and of its scales, is all that is read. Tensors come back either
dequantized (``read``: on CPU and wherever no kernel takes the packed form) or
packed (``read_packed``: fp8 values + block scales, or MXFP4 blocks + scales,
in the canonical ``[out, in]`` orientation).

Any other ``quant_method`` is refused when the checkpoint is opened, naming the
method: never a silent cast of quantized bytes.
"""

from __future__ import annotations

import math

import torch

from .checkpoint import Checkpoint, CheckpointError, MissingTensorError, ShapeMismatchError
from .config import QuantSpec


class QuantizationError(CheckpointError):
    """A quantization format or quantized tensor that cannot be served; the message names it."""


#: e2m1 values by 4-bit code (sign bit 3), as the OCP MX spec and gpt-oss define them.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32
_FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn}
_SUPPORTED = "fp8 (float8 e4m3 with weight_scale_inv) and mxfp4 (gpt-oss *_blocks/*_scales)"


def quant_spec(cfg: dict) -> QuantSpec | None:
    """The ``QuantSpec`` of a ``config.json`` dict; None when it has no ``quantization_config``.

    Raises ``QuantizationError`` naming the method or field for anything not served.
    """
    qc = cfg.get("quantization_config")
    if qc is None and isinstance(cfg.get("text_config"), dict):
        qc = cfg["text_config"].get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise QuantizationError(f"config.json: quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise QuantizationError(f"config.json: quantization_config.fmt={fmt!r} is not served (fp8 checkpoints: 'e4m3')")
        scheme = qc.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise QuantizationError(
                f"config.json: quantization_config.activation_scheme={scheme!r} is not served (fp8: 'dynamic' only)"
            )
        scale_fmt = qc.get("scale_fmt", "float") or "float"
        if scale_fmt != "float":
            raise QuantizationError(f"config.json: quantization_config.scale_fmt={scale_fmt!r} is not served (fp8: 'float' scales)")
        expert_dtype = qc.get("expert_dtype", "fp8") or "fp8"
        if expert_dtype != "fp8":
            raise QuantizationError(f"config.json: quantization_config.expert_dtype={expert_dtype!r} is not served (fp8 experts only)")
        block = qc.get("weight_block_size")
        if block is not None:
            if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
                raise QuantizationError(f"config.json: quantization_config.weight_block_size must be two positive ints, got {block!r}")
            block = (int(block[0]), int(block[1]))
        return QuantSpec(method="fp8", weight_block_size=block)
    if method == "mxfp4":
        return QuantSpec(method="mxfp4")
    raise QuantizationError(
        f"config.json: quantization_config.quant_method={method!r} is not supported (served: {_SUPPORTED}); "
        "use a checkpoint in one of these formats or in bf16/fp16/fp32"
    )


def fp8_scale_name(name: str) -> str:
    """``X.weight`` -> ``X.weight_scale_inv``; a fused ``X`` -> ``X_scale_inv``."""
    return name[: -len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """fp32 ``[out, in]`` from float8 ``w [out, in]`` and ``scale_inv [ceil(out/bo), ceil(in/bi)]`` (or one scale)."""
    out, inp = w.shape
    s = scale_inv.float()
    if block is None or s.numel() == 1:
        return w.float() * s.reshape(())
    bo, bi = block
    s = s.repeat_interleave(bo, dim=0)[:out].repeat_interleave(bi, dim=1)[:, :inp]
    return w.float() * s


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 ``[..., out, G * 32]`` from ``blocks [..., out, G, 16]`` (uint8) and ``scales [..., out, G]`` (uint8)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = blocks.to(torch.int64)
    vals = torch.stack([lut[b & 0x0F], lut[b >> 4]], dim=-1).flatten(-2)  # [..., out, G, 32], low nibble first
    vals = vals * e8m0_scale(scales)[..., None]
    return vals.flatten(-2)


def e8m0_scale(scales: torch.Tensor) -> torch.Tensor:
    """fp32 values of OCP MX e8m0 scale bytes: ``2 ** (s - 127)``; 0 is ``2 ** -127`` (an fp32 subnormal), 255 is NaN."""
    s = scales.to(torch.int32)
    bits = torch.where(s == 0, 0x00400000, torch.where(s == 255, 0x7FC00000, s << 23))
    return bits.view(torch.float32)


def _apply_cols(t: torch.Tensor, cols: tuple[int, int, int] | None) -> torch.Tensor:
    return t if cols is None else t[..., cols[0] : cols[1] : cols[2]]


class QuantReader:
    """Reads a ``TensorRef`` from a checkpoint, through its quantized form where there is one."""

    def __init__(self, checkpoint: Checkpoint, quant: QuantSpec | None):
        self.ckpt = checkpoint
        self.quant = quant

    # -- what is stored ------------------------------------------------------
    def form(self, name: str) -> str:
        """'plain', 'fp8' or 'mxfp4': how the float tensor ``name`` is stored."""
        method = self.quant.method if self.quant else None
        if name in self.ckpt:
            if fp8_scale_name(name) in self.ckpt and self.ckpt.dtype(name) in _FP8_DTYPES:
                if method != "fp8":
                    raise QuantizationError(
                        f"{name}: float8 weights with {fp8_scale_name(name)} but config.json has no fp8 quantization_config"
                    )
                return "fp8"
            if self.ckpt.dtype(name) in _FP8_DTYPES:
                raise QuantizationError(f"{name}: float8 tensor without its {fp8_scale_name(name)}: cannot dequantize it")
            return "plain"
        if name + "_blocks" in self.ckpt:
            if method != "mxfp4":
                raise QuantizationError(f"{name}: stored as {name}_blocks but config.json has no mxfp4 quantization_config")
            if name + "_scales" not in self.ckpt:
                raise MissingTensorError(f"{self.ckpt.path.name}: tensor {name + '_scales'!r} is missing from the checkpoint")
            return "mxfp4"
        raise MissingTensorError(f"{self.ckpt.path.name}: tensor {name!r} is missing from the checkpoint")

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of the float tensor ``name`` (MXFP4: ``[..., in, out]`` as the float tensor would be)."""
        if self.form(name) == "mxfp4":
            *lead, out, groups, nbytes = self.ckpt.shape(name + "_blocks")
            if nbytes * 2 != MXFP4_BLOCK:
                raise ShapeMismatchError(f"{name}_blocks: last dim {nbytes} is not {MXFP4_BLOCK // 2} bytes (32 fp4 values)")
            return (*lead, groups * MXFP4_BLOCK, out)
        return self.ckpt.shape(name)

    # -- dequantized -----------------------------------------------------------
    def read(self, ref, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor a ref names, dequantized to ``dtype`` (default: as stored for plain tensors, fp32 otherwise)."""
        form = self.form(ref.name)
        if form == "plain":
            t = self._read_raw(ref.name, ref.expert, ref.rows)
        elif form == "fp8":
            t = self._read_fp8(ref)
        else:
            t = self._read_mxfp4(ref).transpose(-1, -2)  # [.., in, out] like the float tensor
        t = _apply_cols(t, ref.cols)
        if ref.transpose:
            t = t.transpose(-1, -2)
        t = t.contiguous()
        return t if dtype is None else t.to(dtype)

    def _read_raw(self, name: str, expert: int | None, rows: tuple[int, int] | None) -> torch.Tensor:
        if expert is not None:
            t = self.ckpt.read(name, (expert, expert + 1))[0]
            return t if rows is None else t[rows[0] : rows[1]]
        return self.ckpt.read(name, rows)

    def _fp8_block(self, name: str, w_shape: tuple[int, ...], s_shape: tuple[int, ...]) -> tuple[int, int] | None:
        block = self.quant.weight_block_size
        out, inp = w_shape[-2:]
        if block is None:
            return None
        want = (math.ceil(out / block[0]), math.ceil(inp / block[1]))
        if math.prod(s_shape) == 1 and want != (1, 1):
            return None  # one scale for the whole tensor
        if tuple(s_shape[-2:]) != want:
            raise ShapeMismatchError(
                f"{fp8_scale_name(name)}: shape {list(s_shape)} disagrees with weight {list(w_shape)} and "
                f"weight_block_size {list(block)}, which imply [..., {want[0]}, {want[1]}]"
            )
        return block

    def _read_fp8(self, ref) -> torch.Tensor:
        """fp32 dequantized weight of a ref (its expert / row range)."""
        name, sname = ref.name, fp8_scale_name(ref.name)
        w_shape, s_shape = self.ckpt.shape(name), self.ckpt.shape(sname)
        block = self._fp8_block(name, w_shape, s_shape)
        if ref.rows is None or block is None:
            w = self._read_raw(name, ref.expert, None)
            s = self.ckpt.read(sname, (ref.expert, ref.expert + 1))[0] if ref.expert is not None and len(s_shape) > 2 else self.ckpt.read(sname)
            full = dequantize_fp8(w, s, block)
            return full if ref.rows is None else full[ref.rows[0] : ref.rows[1]]
        # a row range: read the whole blocks that cover it
        r0, r1 = ref.rows
        b0, b1 = r0 // block[0], math.ceil(r1 / block[0])
        lo, hi = b0 * block[0], min(b1 * block[0], w_shape[-2])
        w = self._read_raw(name, ref.expert, (lo, hi))
        s = self.ckpt.read(sname, (ref.expert, ref.expert + 1))[0][b0:b1] if ref.expert is not None else self.ckpt.read(sname, (b0, b1))
        return dequantize_fp8(w, s, block)[r0 - lo : r1 - lo]

    def _mxfp4_parts(self, ref) -> tuple[torch.Tensor, torch.Tensor]:
        """(blocks [out, G, 16], scales [out, G]) of one expert of an MXFP4 tensor."""
        if ref.rows is not None:
            raise QuantizationError(f"{ref.name}: a row range of an MXFP4 tensor is not served")
        name = ref.name
        if ref.expert is None:
            return self.ckpt.read(name + "_blocks"), self.ckpt.read(name + "_scales")
        e = (ref.expert, ref.expert + 1)
        return self.ckpt.read(name + "_blocks", e)[0], self.ckpt.read(name + "_scales", e)[0]

    def _read_mxfp4(self, ref) -> torch.Tensor:
        blocks, scales = self._mxfp4_parts(ref)
        return dequantize_mxfp4(blocks, scales)  # [out, in]

    # -- packed ----------------------------------------------------------------
    def packable(self, ref) -> str | None:
        """'fp8' or 'mxfp4' when ``read_packed`` can return this ref packed in ``[out, in]`` orientation; else None."""
        form = self.form(ref.name)
        if form == "fp8" and ref.rows is None and ref.cols is None and not ref.transpose:
            w_shape = self.ckpt.shape(ref.name)
            if self._fp8_block(ref.name, w_shape, self.ckpt.shape(fp8_scale_name(ref.name))) is not None:
                return "fp8"
        if form == "mxfp4" and ref.rows is None and ref.transpose:
            return "mxfp4"  # the float tensor is [in, out]: transposed, the packed rows are the ref's rows
        return None

    def read_packed(self, ref) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed ``(values, scales)`` of a ref, in the canonical ``[out, in]`` orientation.

        fp8: (float8 ``[out, in]``, fp32 ``[ceil(out/bo), ceil(in/bi)]``).
        mxfp4: (uint8 ``[out, in / 2]``, uint8 ``[out, in / 32]``), ``cols`` picking output rows.
        """
        kind = self.packable(ref)
        if kind == "fp8":
            w = self._read_raw(ref.name, ref.expert, None)
            sname = fp8_scale_name(ref.name)
            s = self.ckpt.read(sname, (ref.expert, ref.expert + 1))[0] if ref.expert is not None else self.ckpt.read(sname)
            return w.contiguous(), s.float().contiguous()
        if kind == "mxfp4":
            blocks, scales = self._mxfp4_parts(ref)
            if ref.cols is not None:
                sel = slice(*ref.cols)
                blocks, scales = blocks[sel], scales[sel]
            return blocks.flatten(-2).contiguous(), scales.contiguous()
        raise QuantizationError(f"{ref.name}: not stored in a packed form this reader can hand out")


__all__ = [
    "FP4_VALUES",
    "e8m0_scale",
    "MXFP4_BLOCK",
    "QuantReader",
    "QuantizationError",
    "dequantize_fp8",
    "dequantize_mxfp4",
    "fp8_scale_name",
    "quant_spec",
]
