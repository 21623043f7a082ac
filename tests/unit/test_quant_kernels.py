"""The packed-weight kernels (``kernels/quant.py``) and the split activation (``kernels/glu.py``) against their torch references.

On CPU the Triton kernels run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1): shapes stay tiny, ragged and not powers of two, so that
masks, empty experts and partial blocks are all exercised.
"""

from __future__ import annotations

import pytest
import torch

from moefleet.kernels import glu as glu_ops
from moefleet.kernels import quant as Q

REL = 1e-5


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = REL) -> None:
    scale = max(1.0, want.float().abs().max().item())
    err = (got.float() - want.float()).abs().max().item()
    assert err <= rel * scale, f"max abs error {err} vs output range {scale}"


@pytest.fixture(params=["default", "small"])
def tiles(request, monkeypatch):
    if request.param == "small":
        monkeypatch.setitem(Q._LAUNCH, "BLOCK_M", 16)
        monkeypatch.setitem(Q._LAUNCH, "BLOCK_N", 16)
        monkeypatch.setitem(Q._LAUNCH, "MXFP4_BLOCK_K", 32)
    return request.param


def test_activation_quantization_is_bitwise_torchs_round_to_nearest_even():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 70, generator=g) * torch.logspace(-4, 3, 70)
    x[2] = 0.0  # an all-zero row: scale eps, values 0
    x[3, :16] = torch.tensor([448.0, 1.0 + 1 / 16, 1.0 + 3 / 16, -(2.0 + 1 / 8), 2**-9, 3 * 2**-10, 2**-10, 0.0] * 2)  # ties, subnormals
    for group in (16, 32, 128):
        q, s = Q.per_token_group_quant_fp8(x, group)
        q_ref, s_ref = Q.per_token_group_quant_fp8_reference(x, group)
        assert torch.equal(s, s_ref)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), f"group {group}"
        assert s.shape == (9, -(-70 // group))


def test_activation_quantization_keeps_bf16_inputs_within_fp8_precision():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    q, s = Q.per_token_group_quant_fp8(x, 32)
    back = q.float().view(5, 2, 32) * s[..., None]
    assert (back.view(5, 64) - x.float()).abs().max() <= x.float().abs().max() * 2**-4


def _fp8_problem(counts, m, kd, block, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = len(counts)
    n = sum(counts)
    x = torch.randn(n, kd, generator=g)
    w = (torch.randn(e, m, kd, generator=g) * 40).to(torch.float8_e4m3fn)
    ws = torch.rand(e, -(-m // block[0]), -(-kd // block[1]), generator=g) * 0.01 + 1e-3
    offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist())
    return x, w, ws, offsets


@pytest.mark.parametrize(
    "counts, m, kd, block",
    [
        ([5, 0, 17, 3], 40, 48, (16, 16)),  # an empty expert, partial output block
        ([1, 30], 24, 70, (16, 32)),  # a partial K block (70 = 2 x 32 + 6)
        ([0, 0, 9], 33, 16, (32, 16)),
    ],
)
def test_fp8_grouped_gemm_equals_reference(counts, m, kd, block, tiles):
    x, w, ws, offsets = _fp8_problem(counts, m, kd, block)
    bias = torch.randn(len(counts), m)
    xq, xs = Q.per_token_group_quant_fp8(x, block[1])
    for b in (None, bias):
        for out_dtype in (torch.float32, torch.bfloat16):
            got = Q.fp8_grouped_gemm(xq, xs, w, ws, offsets, block, b, out_dtype=out_dtype)
            want = Q.fp8_grouped_gemm_reference(xq, xs, w, ws, offsets, block, b, out_dtype=out_dtype)
            assert got.dtype == out_dtype
            _close(got, want, REL if out_dtype == torch.float32 else 2**-7)


def test_fp8_grouped_linear_approximates_the_dequantized_product():
    """Per-token-group scaling keeps the w8a8 product within a few percent of the exact one."""
    x, w, ws, offsets = _fp8_problem([7, 11], 32, 64, (16, 32), seed=2)
    got = Q.fp8_grouped_linear(x, w, ws, offsets, (16, 32))
    _close(got, Q.fp8_grouped_linear_reference(x, w, ws, offsets, (16, 32)))
    wd = w.float() * ws.repeat_interleave(16, 1).repeat_interleave(32, 2)
    exact = torch.cat([x[:7] @ wd[0].T, x[7:] @ wd[1].T])
    assert ((got - exact).abs().max() / exact.abs().max()).item() <= 0.05


def _mxfp4_problem(counts, m, kd, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = len(counts)
    blocks = torch.randint(0, 256, (e, m, kd // 2), generator=g, dtype=torch.uint8)
    scales = torch.randint(118, 130, (e, m, kd // 32), generator=g, dtype=torch.uint8)
    x = torch.randn(sum(counts), kd, generator=g)
    offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist())
    return x, blocks, scales, offsets


@pytest.mark.parametrize("counts, m, kd", [([5, 0, 17, 3], 40, 96), ([1, 30], 24, 32), ([0, 9], 33, 64)])
def test_mxfp4_grouped_gemm_equals_reference(counts, m, kd, tiles):
    x, blocks, scales, offsets = _mxfp4_problem(counts, m, kd)
    bias = torch.randn(len(counts), m)
    for b in (None, bias):
        _close(Q.mxfp4_grouped_gemm(x, blocks, scales, offsets, b), Q.mxfp4_grouped_gemm_reference(x, blocks, scales, offsets, b))
    xb = x.bfloat16()
    got = Q.mxfp4_grouped_gemm(xb, blocks, scales, offsets)
    assert got.dtype == torch.bfloat16
    _close(got, Q.mxfp4_grouped_gemm_reference(xb, blocks, scales, offsets), 2**-7)


def test_mxfp4_decoding_covers_every_code_and_exponent():
    """One byte per (code pair): all 256 bytes, with scales from 2**-10 to 2**5."""
    blocks = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(16, 16)  # [M=16, Kd/2=16]
    scales = torch.arange(117, 133, dtype=torch.int32).to(torch.uint8).view(16, 1)
    eye = torch.eye(32)
    got = Q.mxfp4_grouped_gemm(eye, blocks[None], scales[None], torch.tensor([0, 32]))  # x = I: y = W.T
    want = Q.dequantize_mxfp4_reference(blocks, scales)
    assert torch.equal(got.T, want)
    assert want[0, 2] == 0.5 * 2.0**-10 and want[0, 3] == 0.0  # byte 0x01: low nibble 0.5, high 0
    assert want[8, 1] == -0.0 and want[8, 0] == 0.0 and want[15, 30] == -6.0 * 2.0**5  # byte 0x80: high -0; byte 0xFF


def test_mxfp4_edge_exponents_decode_as_the_ocp_spec_says():
    """e8m0 exponent 0 is 2**-127 (not 0), 254 is 2**127, 255 is NaN (not infinity), in the kernel and both references."""
    from moefleet.core.quant import dequantize_mxfp4, e8m0_scale

    edge = torch.tensor([0, 1, 127, 254, 255], dtype=torch.uint8)
    for decode in (Q.e8m0_scale, e8m0_scale):
        got = decode(edge)
        assert got[0].item() == 2.0**-127 and got[0] > 0
        assert got[1].item() == 2.0**-126 and got[2].item() == 1.0 and got[3].item() == 2.0**127
        assert torch.isnan(got[4])
    blocks = torch.full((5, 16), 0x22, dtype=torch.uint8)  # every fp4 value 1.0 (code 2)
    scales = edge.view(5, 1)
    want = torch.tensor([2.0**-127, 2.0**-126, 1.0, 2.0**127, float("nan")])[:, None].expand(5, 32)
    for dense in (Q.dequantize_mxfp4_reference(blocks, scales), dequantize_mxfp4(blocks.view(5, 1, 16), scales)):
        torch.testing.assert_close(dense.reshape(5, 32), want, rtol=0, atol=0, equal_nan=True)
    got = Q.mxfp4_grouped_gemm(torch.eye(32), blocks[None], scales[None], torch.tensor([0, 32]))  # y = W.T
    torch.testing.assert_close(got.T, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("activation", sorted(glu_ops.ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_glu_equals_reference(activation, dtype):
    x = (torch.randn(13, 2 * 150, generator=torch.Generator().manual_seed(3)) * 6).to(dtype)  # F = 150 > one block
    got = glu_ops.glu(x, activation, True, alpha=1.3, limit=2.5)
    _close(got, glu_ops.glu_reference(x, activation, True, alpha=1.3, limit=2.5), REL if dtype == torch.float32 else 2**-7)
    if activation != "clamped_swiglu":
        _close(glu_ops.glu(x, activation, False), glu_ops.glu_reference(x, activation, False), REL if dtype == torch.float32 else 2**-7)


def test_clamped_swiglu_is_gpt_oss_formula():
    g = torch.tensor([[-9.0, -1.0, 0.5, 3.0, 9.0]])
    u = torch.tensor([[-9.0, 0.2, 1.0, 8.0, 2.0]])
    h = glu_ops.glu(torch.cat([g, u], dim=1), "clamped_swiglu", True, alpha=1.702, limit=7.0)
    gc, uc = g.clamp(max=7.0), u.clamp(-7.0, 7.0)
    _close(h, (uc + 1) * gc * torch.sigmoid(1.702 * gc))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: Q.per_token_group_quant_fp8(torch.zeros(2, 3, dtype=torch.int32), 16), "x must be"),
        (lambda: Q.fp8_grouped_gemm(torch.zeros(4, 32).to(torch.float8_e4m3fn), torch.ones(4, 2), torch.zeros(2, 8, 32).to(torch.float8_e4m3fn),
                                    torch.ones(2, 1, 2), torch.tensor([0, 2, 4]), (16, 24)), "block_in must be a power of 2"),
        (lambda: Q.fp8_grouped_gemm(torch.zeros(4, 32).to(torch.float8_e4m3fn), torch.ones(4, 2), torch.zeros(2, 8, 32).to(torch.float8_e4m3fn),
                                    torch.ones(2, 1, 1), torch.tensor([0, 2, 4]), (16, 16)), "w_scale must be fp32"),
        (lambda: Q.fp8_grouped_gemm(torch.zeros(4, 32).to(torch.float8_e4m3fn), torch.ones(4, 2), torch.zeros(2, 8, 32).to(torch.float8_e4m3fn),
                                    torch.ones(2, 1, 2), torch.tensor([0, 3, 2]), (16, 16)), "expert_offsets must rise"),
        (lambda: Q.mxfp4_grouped_gemm(torch.zeros(4, 48), torch.zeros(1, 8, 24, dtype=torch.uint8), torch.zeros(1, 8, 1, dtype=torch.uint8),
                                      torch.tensor([0, 4])), "multiple of 32"),
        (lambda: Q.mxfp4_grouped_gemm(torch.zeros(4, 32), torch.zeros(1, 8, 16, dtype=torch.uint8), torch.zeros(1, 8, 2, dtype=torch.uint8),
                                      torch.tensor([0, 4])), "w_scales must be uint8"),
        (lambda: glu_ops.glu(torch.zeros(3, 5), "silu", True), "odd width"),
        (lambda: glu_ops.glu(torch.zeros(3, 4), "clamped_swiglu", False), "needs gated"),
    ],
)
def test_bad_arguments_are_value_errors_before_launch(call, match):
    with pytest.raises(ValueError, match=match):
        call()
