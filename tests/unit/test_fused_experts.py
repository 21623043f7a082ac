"""The fused routed-expert path: device-side alignment, gather in the first GEMM, deterministic combine.

Runs under Triton's interpreter on CPU (tiny shapes) and compiled on a GPU
with ``TRITON_INTERPRET=0`` (see ``tests/kernel_helpers.py``).
"""

import json

import numpy as np
import pytest
import torch

from moefleet.kernels import fused_moe, triton_moe
from moefleet.kernels.checks import DEBUG_ENV
from moefleet.kernels.fused_moe import align_tiles, fused_experts, fused_experts_reference
from moefleet.kernels.launch_config import CONFIG_DIR
from moefleet.kernels.permute import align, rows_to_topk
from moefleet.kernels.triton_moe import fused_topk_reference, grouped_ffn, grouped_ffn_reference
from tests.kernel_helpers import DEVICE, ffn_weights, on_device, use_moe_config

TOL = {"atol": 1e-5, "rtol": 1e-5}
TILE16 = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 1, "num_stages": 1}


def small_entry(split_k: int = 1) -> dict:
    return {"gate_up": dict(TILE16), "down": {**TILE16, "SPLIT_K": split_k}}


def routing(num_tokens, num_experts, top_k, seed, drop=()):
    """topk ids/weights [T, K] on DEVICE from random logits; ``drop`` lists (t, k) slots set to -1 / 0."""
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))
    ids, weights = fused_topk_reference(logits, top_k, "softmax", True)
    for t, k in drop:
        ids[t, k], weights[t, k] = -1, 0.0
    return on_device(ids, weights)


def hidden_states(num_tokens, hidden, seed, dtype=torch.float32):
    return on_device(torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype))


# --- align --------------------------------------------------------------------


def test_align_groups_kept_slots_by_expert_in_slot_order_and_puts_dropped_slots_last():
    ids = on_device(torch.tensor([[2, 0], [-1, 2], [0, 3], [2, -1]]))
    a = align(ids, num_experts=4)
    assert a.expert_offsets.tolist() == [0, 2, 2, 5, 6]  # e0: 2 slots, e1: none, e2: 3, e3: 1
    assert a.sorted_slots[:6].tolist() == [1, 4, 0, 3, 6, 5]
    assert sorted(a.sorted_slots[6:].tolist()) == [2, 7]
    assert a.sorted_slots.shape == (8,)  # fixed size T * K whatever the routing


def test_align_rejects_out_of_range_ids_when_checked_and_drops_them_when_not():
    ids = on_device(torch.tensor([[1, 5], [0, -2]]))
    with pytest.raises(ValueError, match=r"expert ids must be -1 \(dropped\) or in \[0, 4\)"):
        align(ids, num_experts=4, check=True)
    a = align(ids, num_experts=4, check=False)
    assert a.expert_offsets.tolist() == [0, 1, 2, 2, 2]
    assert a.sorted_slots[:2].tolist() == [2, 0]


@pytest.mark.parametrize(
    ("tokens", "top_k", "experts", "block_m", "block_m_down"),
    [(1, 2, 8, 16, None), (7, 2, 3, 16, 32), (37, 8, 256, 16, 64), (150, 2, 8, 64, 128), (65, 1, 1, 16, None)],
)
def test_align_kernel_gives_the_torch_alignment_and_tile_maps_bit_for_bit(tokens, top_k, experts, block_m, block_m_down):
    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, experts, (tokens, top_k), generator=g)
    ids[torch.rand(tokens, top_k, generator=g) < 0.15] = -1  # dropped slots
    ids[0, 0] = experts + 3 if tokens > 1 else ids[0, 0]  # out of range counts as dropped when unchecked
    ids = on_device(ids)
    got = align_tiles(ids, experts, block_m, block_m_down, check=False, use_kernel=True)
    want = align_tiles(ids, experts, block_m, block_m_down, check=False, use_kernel=False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for (te, tr), (we, wr) in zip(got[2:], want[2:]):
        assert te.dtype == we.dtype == torch.int32 and tr.dtype == wr.dtype == torch.int64
        assert torch.equal(te, we) and torch.equal(tr, wr)


# --- fused experts against the reference -----------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_fused_experts_matches_reference_with_dropped_slots(monkeypatch, gated, top_k):
    use_moe_config(monkeypatch, small_entry())
    num_tokens, hidden, inter, experts = 21, 40, 24, 5
    ids, weights = routing(num_tokens, experts, top_k, seed=1, drop=[(3, 0), (7, top_k - 1)])
    x = hidden_states(num_tokens, hidden, seed=2)
    w13, w2, b13, b2 = ffn_weights(experts, hidden, inter, gated, with_bias=not gated)
    kw = {"gated": gated, "activation": "silu" if gated else "gelu", "b13": b13, "b2": b2}
    want = fused_experts_reference(x, ids, weights, w13, w2, **kw)
    torch.testing.assert_close(fused_experts(x, ids, weights, w13, w2, **kw), want, **TOL)


def test_fused_experts_with_default_configs_handles_a_token_with_every_slot_dropped():
    ids, weights = routing(6, 4, 2, seed=3, drop=[(2, 0), (2, 1)])
    x = hidden_states(6, 32, seed=4)
    w13, w2, _, _ = ffn_weights(4, 32, 16, True, with_bias=False)
    out = fused_experts(x, ids, weights, w13, w2, gated=True, activation="silu")
    torch.testing.assert_close(out, fused_experts_reference(x, ids, weights, w13, w2, gated=True, activation="silu"), **TOL)
    assert torch.count_nonzero(out[2]) == 0


def test_fused_experts_adds_extra_in_fp32_and_casts_to_out_dtype():
    """A large ``extra`` plus a small routed sum: added in fp32 the small part survives; added in bf16 it is lost.

    ``extra`` = 64 (bf16's spacing there is 0.5) and routed weights of 1e-3 make a routed sum of about 1e-3: the
    fp32 sum keeps it to fp32 precision (a few ulps of 64), a bf16 addition rounds it away, an error 15x the tolerance.
    """
    ids, weights = routing(9, 4, 2, seed=5)
    weights = weights * 1e-3
    x = hidden_states(9, 24, seed=6, dtype=torch.bfloat16)
    extra = on_device(torch.full((9, 24), 64.0, dtype=torch.bfloat16))
    w13, w2, _, _ = ffn_weights(4, 24, 16, True, with_bias=False, dtype=torch.bfloat16)
    kw = {"gated": True, "activation": "silu", "extra": extra}
    out = fused_experts(x, ids, weights, w13, w2, out_dtype=torch.float32, **kw)
    assert out.dtype == torch.float32
    routed = fused_experts_reference(x, ids, weights, w13, w2, out_dtype=torch.float32, gated=True, activation="silu")
    assert routed.abs().max() > 1e-4  # the part a bf16 addition would lose
    torch.testing.assert_close(out, routed + 64.0, atol=6e-5, rtol=0)  # a few fp32 ulps of 64
    assert fused_experts(x, ids, weights, w13, w2, **kw).dtype == torch.bfloat16


def test_fused_experts_handles_zero_tokens():
    w13, w2, _, _ = ffn_weights(3, 16, 8, True, with_bias=False)
    ids = on_device(torch.empty(0, 2, dtype=torch.int64))
    out = fused_experts(hidden_states(0, 16, 0), ids, on_device(torch.empty(0, 2)), w13, w2, gated=True, activation="silu")
    assert out.shape == (0, 16)


# --- fused gather -----------------------------------------------------------------


def test_fused_gather_reads_hidden_rows_in_the_first_gemm_without_a_gathered_copy(monkeypatch):
    # A worker's form: U output rows, each reading a row of a larger hidden [T, H] via token_index.
    use_moe_config(monkeypatch, small_entry())
    seen = []
    real = fused_moe._launch_gate_up
    monkeypatch.setattr(fused_moe, "_launch_gate_up", lambda x, *a, **k: (seen.append(x), real(x, *a, **k))[1])
    x = hidden_states(30, 40, seed=8)
    token_index = on_device(torch.tensor([29, 3, 17, 4, 0, 22, 11]))
    ids, weights = routing(7, 5, 2, seed=9, drop=[(1, 1)])
    w13, w2, _, _ = ffn_weights(5, 40, 24, True, with_bias=False)
    kw = {"gated": True, "activation": "silu", "token_index": token_index}
    out = fused_experts(x, ids, weights, w13, w2, **kw)
    torch.testing.assert_close(out, fused_experts_reference(x, ids, weights, w13, w2, **kw), **TOL)
    assert len(seen) == 1 and seen[0].data_ptr() == x.data_ptr() and seen[0].shape == x.shape


def test_grouped_ffn_row_index_equals_index_select_then_grouped_ffn(monkeypatch):
    use_moe_config(monkeypatch, small_entry())
    x = hidden_states(25, 40, seed=10)
    row_index = on_device(torch.randint(0, 25, (37,), generator=torch.Generator().manual_seed(11)))
    offsets = on_device(torch.tensor([0, 9, 9, 30, 37]))
    w13, w2, b13, b2 = ffn_weights(4, 40, 24, True, with_bias=True)
    kw = {"gated": True, "activation": "gelu_tanh", "b13": b13, "b2": b2}
    want = grouped_ffn_reference(x.index_select(0, row_index), offsets, w13, w2, **kw)
    torch.testing.assert_close(grouped_ffn(x, offsets, w13, w2, row_index=row_index, **kw), want, **TOL)


def test_out_of_range_token_index_is_a_value_error_when_checked(monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    ids, weights = routing(3, 4, 2, seed=12)
    w13, w2, _, _ = ffn_weights(4, 16, 8, True, with_bias=False)
    bad = on_device(torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match=r"token_index values must lie in \[0, 5\)"):
        fused_experts(hidden_states(5, 16, 0), ids, weights, w13, w2, gated=True, activation="silu", token_index=bad * 2)
    with pytest.raises(ValueError, match=r"row_index values must lie in \[0, 5\)"):
        grouped_ffn(hidden_states(5, 16, 0), on_device(torch.tensor([0, 1, 3, 3, 3])), w13, w2,
                    gated=True, activation="silu", row_index=on_device(torch.tensor([0, 1, 9])))  # fmt: skip


# --- deterministic combine --------------------------------------------------------


def test_combine_kernel_sums_each_tokens_slots_in_slot_order():
    # y [S, T*K, H] with values whose sum depends on the order in fp32; the kernel
    # must give exactly the left-to-right sum over k (then s), dropped slots skipped.
    g = torch.Generator().manual_seed(13)
    split, tokens, k, hidden = 2, 5, 3, 37
    y = torch.randn(split, tokens * k, hidden, generator=g) * torch.tensor([1.0, 1e7, 1e-3])[None, :, None].repeat(1, tokens, 1)
    ids = torch.randint(0, 4, (tokens, k), generator=g)
    ids[1, 2] = -1
    extra = torch.randn(tokens, hidden, generator=g)
    want = torch.zeros(tokens, hidden)
    for kk in range(k):
        for s in range(split):
            want = want + torch.where((ids[:, kk] >= 0)[:, None], y[s, kk::k], torch.zeros(()))
    want = want + extra
    y, ids, extra = on_device(y, ids, extra)
    out = on_device(torch.empty(tokens, hidden))
    fused_moe._launch_combine(y, ids, 4, extra, out)
    assert torch.equal(out.cpu(), want)


def test_fused_experts_gives_bitwise_identical_outputs_across_runs(monkeypatch):
    use_moe_config(monkeypatch, small_entry(split_k=3))
    ids, weights = routing(33, 6, 4, seed=14, drop=[(5, 2)])
    x = hidden_states(33, 48, seed=15)
    w13, w2, _, _ = ffn_weights(6, 48, 40, True, with_bias=False)
    kw = {"gated": True, "activation": "silu"}
    first = fused_experts(x, ids, weights, w13, w2, **kw)
    second = fused_experts(x, ids, weights, w13, w2, **kw)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, fused_experts_reference(x, ids, weights, w13, w2, **kw), **TOL)


@pytest.mark.parametrize("split_k", [2, 4])
def test_split_reduction_parts_sum_to_the_unsplit_result(monkeypatch, split_k):
    ids, weights = routing(10, 3, 2, seed=16)
    x = hidden_states(10, 24, seed=17)
    w13, w2, b13, b2 = ffn_weights(3, 24, 72, False, with_bias=True)  # F = 72: 5 K-steps of 16 over 2 or 4 parts
    kw = {"gated": False, "activation": "relu", "b13": b13, "b2": b2}
    use_moe_config(monkeypatch, small_entry(split_k=1))
    whole = fused_experts(x, ids, weights, w13, w2, **kw)
    use_moe_config(monkeypatch, small_entry(split_k=split_k))
    torch.testing.assert_close(fused_experts(x, ids, weights, w13, w2, **kw), whole, **TOL)


# --- every launch configuration in the config files ---------------------------------------


def _config_entries():
    """(id, entry, dtype) for every distinct row-bucket entry of every file in kernels/configs/."""
    seen, out = set(), []
    for path in sorted(CONFIG_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        table = data["moe"] if path.name == "default.json" else data
        dtypes = [torch.float32, torch.bfloat16] if path.name == "default.json" else [
            getattr(torch, path.stem.split("dtype=")[1])
        ]
        for key, entry in table.items():
            if key.startswith("_"):
                continue
            for dtype in dtypes:
                sig = (json.dumps(entry, sort_keys=True), dtype)
                if sig not in seen:
                    seen.add(sig)
                    out.append(pytest.param(entry, dtype, id=f"{path.stem[:40]}[{key}]-{str(dtype)[6:]}"))
    return out


@pytest.mark.parametrize(("entry", "dtype"), _config_entries())
def test_every_launch_configuration_in_the_config_files_matches_reference(monkeypatch, entry, dtype):
    # Tiny ragged shapes: one program per tile even for the largest tiles, every mask exercised.
    use_moe_config(monkeypatch, entry)
    ids, weights = routing(11, 4, 2, seed=18, drop=[(4, 1)])
    x = hidden_states(11, 40, seed=19, dtype=dtype)
    w13, w2, _, _ = ffn_weights(4, 40, 24, True, with_bias=False, dtype=dtype)
    kw = {"gated": True, "activation": "silu"}
    out = fused_experts(x, ids, weights, w13, w2, out_dtype=torch.float32, **kw)
    tol = TOL if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    want = fused_experts_reference(x.float(), ids, weights, w13.float(), w2.float(), **kw)
    torch.testing.assert_close(out, want, **tol)


# --- the worker's form ---------------------------------------------------------------


def test_rows_to_topk_rebuilds_each_destinations_rows_in_row_order():
    row_expert = np.array([0, 0, 1, 2, 2, 2])
    row_weight = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    row_dest = np.array([1, 0, 1, 2, 0, 1])
    ids, weights = rows_to_topk(row_expert, row_weight, row_dest, num_dest=4)
    assert ids.tolist() == [[0, 2, -1], [0, 1, 2], [2, -1, -1], [-1, -1, -1]]
    np.testing.assert_allclose(weights, [[0.2, 0.5, 0], [0.1, 0.3, 0.6], [0.4, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"row_dest must lie in \[0, 2\)"):
        rows_to_topk(row_expert, row_weight, row_dest, num_dest=2)


def test_worker_rows_through_fused_experts_equal_the_gather_ffn_index_add_path():
    # The worker's batch: rows grouped by expert, a weight and a unique-token slot per row.
    g = torch.Generator().manual_seed(20)
    x = hidden_states(12, 32, seed=21)
    row_token = np.array([0, 3, 7, 3, 5, 7, 11, 0, 5])
    row_expert = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    row_weight = torch.rand(9, generator=g).numpy()
    unique, inverse = np.unique(row_token, return_inverse=True)
    w13, w2, _, _ = ffn_weights(3, 32, 16, True, with_bias=False)
    kw = {"gated": True, "activation": "silu"}
    offsets = on_device(torch.tensor([0, 3, 6, 9]))
    y = grouped_ffn_reference(x.index_select(0, on_device(torch.from_numpy(row_token))), offsets, w13, w2, **kw)
    want = torch.zeros(len(unique), 32, device=DEVICE).index_add_(
        0, on_device(torch.from_numpy(inverse)), y * on_device(torch.from_numpy(row_weight))[:, None]
    )
    ids, weights = rows_to_topk(row_expert, row_weight, inverse, len(unique))
    out = fused_experts(
        x, on_device(torch.from_numpy(ids)), on_device(torch.from_numpy(weights)), w13, w2,
        token_index=on_device(torch.from_numpy(unique)), out_dtype=torch.float32, **kw,
    )  # fmt: skip
    torch.testing.assert_close(out, want, **TOL)


# --- bad input ---------------------------------------------------------------------------


def _fe_args(**change):
    w13, w2, _, _ = ffn_weights(3, 8, 4, gated=True, with_bias=False)
    args = {
        "hidden": torch.randn(5, 8),
        "topk_ids": torch.tensor([[0, 1], [2, 0], [1, 1], [0, -1], [2, 2]]),
        "topk_weights": torch.rand(5, 2),
        "w13": w13.cpu(),
        "w2": w2.cpu(),
        "gated": True,
        "activation": "silu",
    }
    args.update(change)
    return {k: on_device(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"topk_ids": torch.tensor([0, 1])}, r"topk_ids must be a 2-D \[U, K\] tensor"),
        ({"topk_ids": torch.zeros(5, 2)}, r"topk_ids must be int64"),
        ({"topk_weights": torch.rand(5, 3)}, r"topk_weights must have topk_ids' shape \[5, 2\]"),
        ({"topk_ids": torch.tensor([[0, 1], [2, 3], [1, 1], [0, -1], [2, 2]])}, r"expert ids must be -1 \(dropped\) or in \[0, 3\)"),
        ({"hidden": torch.randn(4, 8)}, r"topk_ids has 5 rows but hidden has 4; pass token_index"),
        ({"extra": torch.randn(5, 7)}, r"extra must have shape \[U, H\] = \[5, 8\]"),
        ({"w2": torch.randn(3, 8, 5)}, r"w2 must be \[E, H, F\] = \[3, 8, 4\]"),
        ({"hidden": torch.randn(5, 8).double()}, r"hidden must be float16, bfloat16 or float32"),
    ],
)
def test_fused_experts_rejects_bad_input_with_value_error(monkeypatch, change, message):
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match=message):
        fused_experts(**_fe_args(**change))
