"""Triton MoE kernels against their torch references.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before any import), which is slow: shapes stay tiny, but
are ragged and not powers of two so that every mask is exercised. With
``TRITON_INTERPRET=0`` on a CUDA machine the same tests run the compiled
kernels on the GPU (``DEVICE``); the references then run on the GPU too.
"""

import ast
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moefleet.kernels import triton_moe
from moefleet.kernels.checks import DEBUG_ENV
from moefleet.kernels.triton_moe import (
    ACTIVATIONS,
    fused_topk,
    fused_topk_reference,
    grouped_ffn,
    grouped_ffn_reference,
    grouped_gemm,
    grouped_gemm_reference,
)

from tests.kernel_helpers import ffn_weights, offsets_for, on_device, use_moe_config

TOL = {"atol": 1e-5, "rtol": 1e-5}

# Smallest tiles tl.dot allows: many row tiles, column tiles and K steps on tiny shapes.
SMALL_TOPK = {"BLOCK_ELEMENTS": 16, "num_warps": 1, "num_stages": 1}
SMALL_GEMM = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 1, "num_stages": 1}
SMALL_MOE = {
    "gate_up": {**SMALL_GEMM, "GROUP_M": 3},
    "down": {**SMALL_GEMM, "SPLIT_K": 1},
}


@pytest.fixture
def small_tiles(monkeypatch):
    real = triton_moe.get_launch_config
    monkeypatch.setattr(
        triton_moe, "get_launch_config", lambda op: dict(SMALL_TOPK) if op == "fused_topk" else real(op)
    )
    use_moe_config(monkeypatch, SMALL_MOE)


@pytest.fixture
def debug_checks(monkeypatch):
    """Value checks of index inputs: always on CPU, on CUDA only in debug mode."""
    monkeypatch.setenv(DEBUG_ENV, "1")


# --- fused_topk -------------------------------------------------------------


def assert_same_topk(got, want):
    ids, weights = got
    ref_ids, ref_weights = want
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, **TOL)


@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_topk_softmax_matches_reference(renormalize):
    logits = on_device(torch.randn(37, 12, generator=torch.Generator().manual_seed(1)))
    args = (logits, 3, "softmax", renormalize)
    assert_same_topk(fused_topk(*args), fused_topk_reference(*args))


@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_topk_sigmoid_with_bias_and_scaling_matches_reference(renormalize):
    g = torch.Generator().manual_seed(2)
    logits, bias = on_device(torch.randn(29, 20, generator=g), torch.randn(20, generator=g) * 0.5)
    args = (logits, 4, "sigmoid", renormalize, bias, 2.5)
    assert_same_topk(fused_topk(*args), fused_topk_reference(*args))


def test_fused_topk_handles_many_experts_and_rows_spread_over_programs(small_tiles):
    # E = 300 pads to a 512-wide block; 16-element programs hold one row each.
    logits = on_device(torch.randn(5, 300, generator=torch.Generator().manual_seed(3)))
    args = (logits, 8, "softmax", True)
    assert_same_topk(fused_topk(*args), fused_topk_reference(*args))


def test_fused_topk_handles_top_k_equal_to_num_experts_and_single_expert():
    logits = on_device(torch.randn(6, 5, generator=torch.Generator().manual_seed(4)))
    assert_same_topk(fused_topk(logits, 5, "softmax", False), fused_topk_reference(logits, 5, "softmax", False))
    one = logits[:, :1]
    assert_same_topk(fused_topk(one, 1, "sigmoid", True), fused_topk_reference(one, 1, "sigmoid", True))


def test_fused_topk_reads_bfloat16_and_noncontiguous_logits():
    # Distinct values that bf16 keeps exactly, so no ties reorder the ids.
    g = torch.Generator().manual_seed(5)
    logits = on_device(torch.stack([torch.randperm(10, generator=g) * 0.25 for _ in range(7)]).to(torch.bfloat16))
    strided = logits.T.contiguous().T  # same values, column-major strides
    assert not strided.is_contiguous()
    args = (3, "softmax", True)
    assert_same_topk(fused_topk(strided, *args), fused_topk_reference(logits, *args))


def test_fused_topk_handles_zero_tokens():
    ids, weights = fused_topk(on_device(torch.empty(0, 8)), 2)
    assert ids.shape == (0, 2) and weights.shape == (0, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"logits": torch.randn(8)}, "2-D"),
        ({"logits": torch.ones(4, 8, dtype=torch.int64)}, "floating"),
        ({"top_k": 9}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"scoring": "softmax_topk"}, "scoring"),
        ({"bias": torch.zeros(7)}, "bias must have shape"),
        ({"logits": torch.randn(2, 2048)}, "at most"),
    ],
)
def test_fused_topk_rejects_bad_input_with_value_error(kwargs, message):
    call = {"logits": torch.randn(4, 8), "top_k": 2, "scoring": "sigmoid", "bias": None}
    call.update(kwargs)
    call = {k: on_device(v) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    with pytest.raises(ValueError, match=message):
        fused_topk(**call)


# --- grouped_gemm -----------------------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_gemm_matches_reference_on_ragged_experts(with_bias):
    g = torch.Generator().manual_seed(6)
    offsets = offsets_for([3, 70, 1, 9, 17])
    x, w = on_device(torch.randn(100, 24, generator=g), torch.randn(5, 40, 24, generator=g))
    bias = on_device(torch.randn(5, 40, generator=g)) if with_bias else None
    torch.testing.assert_close(grouped_gemm(x, w, offsets, bias), grouped_gemm_reference(x, w, offsets, bias), **TOL)


def test_grouped_gemm_handles_empty_experts(small_tiles):
    g = torch.Generator().manual_seed(7)
    offsets = offsets_for([0, 21, 0, 0, 5, 0])  # empty first, middle and last experts
    x, w, bias = on_device(torch.randn(26, 33, generator=g), torch.randn(6, 19, 33, generator=g), torch.randn(6, 19, generator=g))
    torch.testing.assert_close(grouped_gemm(x, w, offsets, bias), grouped_gemm_reference(x, w, offsets, bias), **TOL)


def test_grouped_gemm_covers_many_row_and_column_tiles(small_tiles):
    # 16-row tiles, grouped by 2 for the swizzle, 3 column tiles, 3 K steps.
    g = torch.Generator().manual_seed(8)
    offsets = offsets_for([17, 40, 3, 0, 33])
    x, w = on_device(torch.randn(93, 37, generator=g), torch.randn(5, 45, 37, generator=g))
    torch.testing.assert_close(grouped_gemm(x, w, offsets), grouped_gemm_reference(x, w, offsets), **TOL)


@settings(max_examples=15, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    kd=st.integers(1, 40),
    m=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_grouped_gemm_matches_reference_for_any_ragged_split(counts, kd, m, seed):
    g = torch.Generator().manual_seed(seed)
    offsets = offsets_for(counts)
    x, w = on_device(torch.randn(sum(counts), kd, generator=g), torch.randn(len(counts), m, kd, generator=g))
    bias = on_device(torch.randn(len(counts), m, generator=g))
    torch.testing.assert_close(grouped_gemm(x, w, offsets, bias), grouped_gemm_reference(x, w, offsets, bias), **TOL)


def test_grouped_gemm_handles_zero_rows():
    y = grouped_gemm(*on_device(torch.empty(0, 8), torch.randn(3, 5, 8)), offsets_for([0, 0, 0]))
    assert y.shape == (0, 5)


def test_grouped_gemm_accepts_noncontiguous_inputs_and_int32_offsets():
    g = torch.Generator().manual_seed(9)
    offsets = offsets_for([4, 0, 11])
    x = on_device(torch.randn(20, 15, generator=g)).T  # [15, 20], column-major
    w = on_device(torch.randn(3, 20, 12, generator=g)).transpose(1, 2)  # [3, 12, 20]
    want = grouped_gemm_reference(x, w, offsets)
    torch.testing.assert_close(grouped_gemm(x, w, offsets.to(torch.int32)), want, **TOL)


def test_grouped_gemm_bfloat16_is_close_to_fp32_reference():
    g = torch.Generator().manual_seed(10)
    offsets = offsets_for([5, 12, 0, 30])
    x, w = on_device(torch.randn(47, 32, generator=g), torch.randn(4, 24, 32, generator=g) * 0.2)
    y = grouped_gemm(x.bfloat16(), w.bfloat16(), offsets)
    assert y.dtype == torch.bfloat16
    want = grouped_gemm_reference(x.bfloat16().float(), w.bfloat16().float(), offsets)
    torch.testing.assert_close(y.float(), want, atol=2e-2, rtol=1e-2)


def _gemm_args(**change):
    args = {
        "x": torch.randn(10, 8),
        "w": torch.randn(3, 6, 8),
        "expert_offsets": offsets_for([2, 3, 5]),
        "bias": None,
    }
    args.update(change)
    return args


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.randn(10, 8, 1)}, r"x must be 2-D"),
        ({"w": torch.randn(3, 6, 7)}, r"reduction dim"),
        ({"w": torch.randn(3, 6, 8, dtype=torch.float64)}, r"w must be float16, bfloat16 or float32"),
        ({"w": torch.randn(3, 6, 8).half()}, r"w dtype .* must equal x dtype"),
        ({"expert_offsets": offsets_for([2, 3])}, r"expert_offsets must have shape \[E \+ 1\]"),
        ({"expert_offsets": offsets_for([2, 3, 5]).float()}, r"expert_offsets must be int64"),
        ({"expert_offsets": offsets_for([2, 3, 4])}, r"end at N = 10"),
        ({"expert_offsets": torch.tensor([0, 6, 4, 10])}, r"never decrease"),
        ({"expert_offsets": torch.tensor([1, 3, 6, 10])}, r"start at 0"),
        ({"bias": torch.randn(3, 8)}, r"bias must have shape \[E, M\]"),
    ],
)
def test_grouped_gemm_rejects_bad_input_with_value_error(debug_checks, change, message):
    args = {k: on_device(v) if isinstance(v, torch.Tensor) else v for k, v in _gemm_args(**change).items()}
    with pytest.raises(ValueError, match=message):
        grouped_gemm(**args)


# --- grouped_ffn ------------------------------------------------------------


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_grouped_ffn_matches_reference_for_each_activation(gated, activation):
    offsets = offsets_for([7, 0, 30, 2])
    x = on_device(torch.randn(39, 24, generator=torch.Generator().manual_seed(11)))
    w13, w2, b13, b2 = ffn_weights(4, 24, 20, gated, with_bias=not gated)
    kwargs = {"gated": gated, "activation": activation, "b13": b13, "b2": b2}
    want = grouped_ffn_reference(x, offsets, w13, w2, **kwargs)
    torch.testing.assert_close(grouped_ffn(x, offsets, w13, w2, **kwargs), want, **TOL)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_grouped_ffn_with_biases_spans_many_tiles(small_tiles, gated):
    # Non-power-of-2 H and F across several 16-wide tiles, K steps and swizzle groups.
    offsets = offsets_for([18, 0, 5, 33, 1])
    x = on_device(torch.randn(57, 40, generator=torch.Generator().manual_seed(12)))
    w13, w2, b13, b2 = ffn_weights(5, 40, 36, gated, with_bias=True)
    kwargs = {"gated": gated, "activation": "silu", "b13": b13, "b2": b2}
    want = grouped_ffn_reference(x, offsets, w13, w2, **kwargs)
    torch.testing.assert_close(grouped_ffn(x, offsets, w13, w2, **kwargs), want, **TOL)


def test_grouped_ffn_handles_empty_experts_and_zero_rows():
    w13, w2, _, _ = ffn_weights(3, 16, 8, gated=True, with_bias=False)
    x = on_device(torch.randn(9, 16, generator=torch.Generator().manual_seed(13)))
    offsets = offsets_for([0, 9, 0])
    kwargs = {"gated": True, "activation": "gelu"}
    want = grouped_ffn_reference(x, offsets, w13, w2, **kwargs)
    torch.testing.assert_close(grouped_ffn(x, offsets, w13, w2, **kwargs), want, **TOL)
    empty = grouped_ffn(on_device(torch.empty(0, 16)), offsets_for([0, 0, 0]), w13, w2, **kwargs)
    assert empty.shape == (0, 16)


def test_grouped_ffn_bfloat16_is_close_to_reference():
    offsets = offsets_for([12, 3, 0, 20])
    x = on_device(torch.randn(35, 32, generator=torch.Generator().manual_seed(14)).bfloat16())
    w13, w2, _, _ = ffn_weights(4, 32, 24, gated=True, with_bias=False, dtype=torch.bfloat16)
    y = grouped_ffn(x, offsets, w13, w2, gated=True, activation="silu")
    assert y.dtype == torch.bfloat16
    want = grouped_ffn_reference(x.float(), offsets, w13.float(), w2.float(), gated=True, activation="silu")
    torch.testing.assert_close(y.float(), want, atol=3e-2, rtol=2e-2)


def _ffn_args(**change):
    w13, w2, _, _ = ffn_weights(3, 8, 4, gated=True, with_bias=False)
    args = {
        "x_sorted": torch.randn(10, 8),
        "expert_offsets": offsets_for([2, 3, 5]),
        "w13": w13,
        "w2": w2,
        "gated": True,
        "activation": "silu",
    }
    args.update(change)
    return args


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"activation": "swish"}, r"activation must be one of"),
        ({"w13": torch.randn(3, 7, 8)}, r"odd row count 7"),
        ({"w13": torch.randn(3, 8, 6)}, r"w13 must be \[E, 2F, H\] with H = 8"),
        ({"w2": torch.randn(3, 8, 5)}, r"w2 must be \[E, H, F\] = \[3, 8, 4\]"),
        ({"gated": False}, r"w2 must be \[E, H, F\] = \[3, 8, 8\]"),
        ({"w2": torch.randn(3, 8, 4).bfloat16()}, r"must have x_sorted's dtype"),
        ({"b13": torch.randn(3, 4)}, r"b13 must have shape \[E, 2F\] = \[3, 8\]"),
        ({"b2": torch.randn(3, 4)}, r"b2 must have shape \[E, H\] = \[3, 8\]"),
        ({"expert_offsets": offsets_for([2, 3, 6])}, r"end at N = 10"),
    ],
)
def test_grouped_ffn_rejects_bad_input_with_value_error(debug_checks, change, message):
    args = {k: on_device(v) if isinstance(v, torch.Tensor) else v for k, v in _ffn_args(**change).items()}
    with pytest.raises(ValueError, match=message):
        grouped_ffn(**args)


# --- tile map and launch configs ---------------------------------------------


def test_expert_tile_map_covers_each_row_once_within_its_expert():
    counts = [17, 0, 16, 1, 40]
    offsets = offsets_for(counts)
    tile_expert, tile_row_start = triton_moe._expert_tile_map(offsets, sum(counts), 16)
    covered = []
    for e, start in zip(tile_expert.tolist(), tile_row_start.tolist()):
        if e < 0:
            continue
        end = min(start + 16, int(offsets[e + 1]))
        assert int(offsets[e]) <= start < end
        covered.extend(range(start, end))
    assert covered == list(range(sum(counts)))
    assert (tile_expert >= 0).sum() == 2 + 0 + 1 + 1 + 3


@pytest.mark.parametrize("module", sorted(p.name for p in Path(triton_moe.__file__).parent.glob("*.py")))
def test_kernels_modules_import_nothing_of_ours_outside_kernels(module):
    # kernels/ is the bottom floor: its modules import each other, nothing else of the project.
    tree = ast.parse((Path(triton_moe.__file__).parent / module).read_text())
    relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert all(n.level == 1 for n in relative), [(n.level, n.module) for n in relative]
    absolute = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
    absolute += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in absolute if m.split(".")[0] == "moefleet"], absolute
