"""DeepSeek-EPLB-convention baseline: shapes, dtypes and the invariants that tie its outputs together."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moefleet.controller.eplb import balanced_packing, rebalance_experts, replicate_greedy

# DeepSeek's README example: 2 layers, 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs.
README_WEIGHT = torch.tensor(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)


def _check_consistent(weight, phy2log, log2phy, logcnt, num_replicas, num_gpus):
    num_layers, num_experts = weight.shape
    assert phy2log.shape == (num_layers, num_replicas)
    assert logcnt.shape == (num_layers, num_experts)
    assert log2phy.shape[:2] == (num_layers, num_experts)
    assert log2phy.shape[2] == int(logcnt.max())
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    # every logical expert has at least one replica, and the counts add up
    assert (logcnt >= 1).all()
    assert (logcnt.sum(dim=1) == num_replicas).all()
    for layer in range(num_layers):
        for e in range(num_experts):
            slots = log2phy[layer, e]
            n = int(logcnt[layer, e])
            assert (slots[:n] >= 0).all() and (slots[n:] == -1).all()
            assert (phy2log[layer, slots[:n]] == e).all()
        # each slot is listed exactly once in log2phy
        listed = log2phy[layer][log2phy[layer] >= 0]
        assert sorted(listed.tolist()) == list(range(num_replicas))
        assert torch.equal(torch.bincount(phy2log[layer], minlength=num_experts), logcnt[layer])


def test_outputs_have_deepseek_shapes_and_dtypes():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    _check_consistent(README_WEIGHT, phy2log, log2phy, logcnt, 16, 8)


def test_phy2log_log2phy_logcnt_agree_flat():
    weight = torch.rand(3, 18) * 100
    phy2log, log2phy, logcnt = rebalance_experts(weight, 24, 3, 2, 4)  # 3 % 2 != 0: global policy
    _check_consistent(weight, phy2log, log2phy, logcnt, 24, 4)


def test_each_gpu_gets_r_over_g_slots_and_a_balanced_load():
    weight = torch.tensor([[float(v) for v in range(1, 17)]])
    phy2log, _, logcnt = rebalance_experts(weight, 32, 1, 1, 8)
    per_slot = weight[0, phy2log[0]] / logcnt[0, phy2log[0]]
    per_gpu = per_slot.view(8, 4).sum(dim=1)  # slot r on GPU r // 4
    assert per_gpu.numel() == 8
    assert per_gpu.max() / per_gpu.mean() < 1.1  # LPT with 4 slots per GPU


def test_hierarchical_keeps_groups_on_a_node():
    weight = torch.rand(4, 32) * 1000
    num_replicas, num_groups, num_nodes, num_gpus = 48, 8, 4, 8
    phy2log, log2phy, logcnt = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    _check_consistent(weight, phy2log, log2phy, logcnt, num_replicas, num_gpus)
    group_size, per_node = 32 // num_groups, num_replicas // num_nodes
    for layer in range(4):
        node_of_group: dict[int, int] = {}
        for r, e in enumerate(phy2log[layer].tolist()):
            node = r // per_node
            assert node_of_group.setdefault(e // group_size, node) == node
        # every node holds the same number of groups
        assert np.bincount(list(node_of_group.values()), minlength=num_nodes).tolist() == [2] * num_nodes


def test_replicate_greedy_gives_redundant_slots_to_the_hottest():
    phy2log, rank, logcnt = replicate_greedy(torch.tensor([[10.0, 1.0, 4.0]]), 6)
    assert logcnt.tolist() == [[3, 1, 2]]
    assert phy2log[0, :3].tolist() == [0, 1, 2]
    assert sorted(zip(phy2log[0].tolist(), rank[0].tolist())) == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1)]


def test_balanced_packing_fills_each_pack_exactly():
    weight = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0]])
    pack, rank = balanced_packing(weight, 4)
    assert torch.equal(torch.bincount(pack[0], minlength=4), torch.full((4,), 2))
    sums = torch.zeros(4).index_add_(0, pack[0], weight[0])
    assert sums.tolist() == [11.0, 11.0, 11.0, 11.0]
    for p in range(4):
        assert sorted(rank[0][pack[0] == p].tolist()) == [0, 1]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((16, 4, 2, 7), "num_gpus"),
        ((15, 4, 2, 8), "num_replicas"),
        ((8, 4, 2, 8), "num_replicas"),
        ((20, 5, 5, 5), "num_groups"),  # 5 groups divide among 5 nodes (hierarchical) but not the 12 experts
        ((16, 4, 0, 8), "num_nodes"),
    ],
)
def test_bad_arguments_name_the_argument(args, field):
    with pytest.raises(ValueError, match=field):
        rebalance_experts(README_WEIGHT, *args)


@settings(max_examples=25, deadline=None)
@given(
    layers=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 4]),
    nodes=st.sampled_from([1, 2]),
    gpus_per_node=st.sampled_from([1, 2, 4]),
    slots_per_gpu=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_rebalance_is_consistent_for_any_shape(layers, groups, nodes, gpus_per_node, slots_per_gpu, seed):
    num_experts = 8
    num_gpus = nodes * gpus_per_node
    num_replicas = max(num_experts, num_gpus * slots_per_gpu)
    num_replicas += (-num_replicas) % num_gpus
    weight = torch.from_numpy(np.random.default_rng(seed).pareto(1.5, (layers, num_experts)))
    phy2log, log2phy, logcnt = rebalance_experts(weight, num_replicas, groups, nodes, num_gpus)
    _check_consistent(weight, phy2log, log2phy, logcnt, num_replicas, num_gpus)


# --- The cases of vLLM's tests/distributed/test_eplb_algo.py, with DeepSeek's exact answers ----------------------
# vLLM runs DeepSeek's algorithm on these inputs and checks shapes and sums (and, for the README example, the exact
# map). The expected maps below are what DeepSeek's own eplb.py (github.com/deepseek-ai/EPLB, commit d52c72d) returns
# for each case: phy2log, logcnt and log2phy must match them exactly, tie order included.

VLLM_CASES = {
    "readme": (  # DeepSeek's README example (vLLM's test_basic_rebalance)
        README_WEIGHT, 16, (4, 2, 8),
        [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]],
        [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]],
        [[[12, -1], [15, 13], [11, -1], [6, -1], [7, 5], [0, 2], [1, -1], [3, -1], [4, -1], [9, -1], [8, 10], [14, -1]], [[13, -1], [15, 11], [8, -1], [14, -1], [9, -1], [10, 12], [2, 4], [0, -1], [6, 3], [7, -1], [1, -1], [5, -1]]],
    ),
    "single_gpu": (  # one GPU holds every expert once
        [[10, 20, 30, 40]], 4, (1, 1, 1),
        [[3, 2, 1, 0]],
        [[1, 1, 1, 1]],
        [[[3], [2], [1], [0]]],
    ),
    "equal_weights": (  # equal weights, no redundant slot: one replica each
        [[50] * 8], 8, (2, 2, 4),
        [[0, 2, 1, 3, 4, 6, 5, 7]],
        [[1, 1, 1, 1, 1, 1, 1, 1]],
        [[[0], [2], [1], [3], [4], [6], [5], [7]]],
    ),
    "extreme_imbalance": (  # the hot expert takes the redundant slots
        [[1000, 1, 1, 1, 1, 1, 1, 1]], 12, (2, 2, 4),
        [[0, 0, 3, 0, 1, 2, 6, 4, 4, 7, 5, 5]],
        [[3, 1, 1, 1, 2, 2, 1, 1]],
        [[[0, 3, 1], [4, -1, -1], [5, -1, -1], [2, -1, -1], [7, 8, -1], [10, 11, -1], [6, -1, -1], [9, -1, -1]]],
    ),
    "multiple_layers": (  # each layer gets every slot
        [[10, 20, 30, 40, 50, 60], [60, 50, 40, 30, 20, 10], [25] * 6], 8, (2, 2, 4),
        [[1, 0, 2, 2, 4, 5, 3, 5], [1, 0, 2, 0, 4, 5, 3, 3], [1, 0, 2, 0, 4, 3, 5, 3]],
        [[1, 1, 2, 1, 1, 2], [2, 1, 1, 2, 1, 1], [2, 1, 1, 2, 1, 1]],
        [[[1, -1], [0, -1], [2, 3], [6, -1], [4, -1], [7, 5]], [[3, 1], [0, -1], [2, -1], [6, 7], [4, -1], [5, -1]], [[1, 3], [0, -1], [2, -1], [5, 7], [4, -1], [6, -1]]],
    ),
    "groups_not_dividing_nodes": (  # 3 groups on 2 nodes: the global policy
        [[10, 20, 30, 40]], 8, (3, 2, 4),
        [[2, 1, 2, 1, 3, 3, 3, 0]],
        [[1, 2, 2, 3]],
        [[[7, -1, -1], [1, 3, -1], [0, 2, -1], [4, 6, 5]]],
    ),
    "small_hierarchical": (  # hierarchical: groups packed onto nodes first
        [[100, 50, 200, 75, 150, 25, 300, 80]], 12, (4, 2, 4),
        [[6, 6, 7, 0, 6, 1, 2, 3, 4, 2, 4, 5]],
        [[1, 1, 2, 1, 2, 1, 3, 1]],
        [[[3, -1, -1], [5, -1, -1], [6, 9, -1], [7, -1, -1], [10, 8, -1], [11, -1, -1], [0, 1, 4], [2, -1, -1]]],
    ),
    "global_fallback": (  # global fallback with six experts
        [[10, 20, 30, 40, 50, 60]], 8, (3, 2, 4),
        [[3, 0, 2, 4, 5, 4, 5, 1]],
        [[1, 1, 1, 1, 2, 2]],
        [[[1, -1], [7, -1], [2, -1], [0, -1], [3, 5], [4, 6]]],
    ),
    "integer_cpu_tensor": (  # an int64 CPU tensor, converted internally
        [[10, 20, 30, 40]], 6, (2, 1, 2),
        [[3, 3, 0, 1, 2, 2]],
        [[1, 1, 2, 2]],
        [[[2, -1], [3, -1], [4, 5], [0, 1]]],
    ),
    "additional_1": (  # eight groups on four nodes
        [[50, 100, 75, 120, 90, 60, 80, 110, 40, 70, 95, 85, 65, 55, 45, 35]], 24, (8, 4, 8),
        [[3, 14, 15, 3, 2, 2, 9, 6, 8, 7, 7, 6, 12, 10, 11, 13, 10, 11, 5, 1, 4, 0, 1, 4]],
        [[1, 2, 2, 2, 2, 1, 2, 2, 1, 1, 2, 2, 1, 1, 1, 1]],
        [[[21, -1], [22, 19], [4, 5], [0, 3], [23, 20], [18, -1], [7, 11], [9, 10], [8, -1], [6, -1], [16, 13], [17, 14], [12, -1], [15, -1], [1, -1], [2, -1]]],
    ),
    "additional_2": (  # decreasing and increasing weights
        [[200, 150, 100, 50, 25, 12], [12, 25, 50, 100, 150, 200]], 10, (3, 1, 2),
        [[1, 0, 0, 2, 5, 1, 0, 2, 3, 4], [4, 5, 5, 3, 0, 4, 5, 2, 3, 1]],
        [[3, 2, 2, 1, 1, 1], [1, 1, 1, 2, 2, 3]],
        [[[1, 6, 2], [0, 5, -1], [7, 3, -1], [8, -1, -1], [9, -1, -1], [4, -1, -1]], [[4, -1, -1], [9, -1, -1], [7, -1, -1], [8, 3, -1], [0, 5, -1], [1, 6, 2]]],
    ),
}


@pytest.mark.parametrize("case", sorted(VLLM_CASES))
def test_vllm_case_matches_deepseek_exactly(case):
    weight, num_replicas, groups_nodes_gpus, phy2log_expected, logcnt_expected, log2phy_expected = VLLM_CASES[case]
    weight = weight if isinstance(weight, torch.Tensor) else torch.tensor(weight)
    phy2log, log2phy, logcnt = rebalance_experts(weight, num_replicas, *groups_nodes_gpus)
    _check_consistent(weight, phy2log, log2phy, logcnt, num_replicas, groups_nodes_gpus[-1])
    assert phy2log.tolist() == phy2log_expected
    assert logcnt.tolist() == logcnt_expected
    assert log2phy.tolist() == log2phy_expected


def test_vllm_case_groups_that_do_not_divide_among_nodes_fall_back_to_global():
    # 4 experts in 3 groups on 2 nodes: 3 groups cannot be split over 2 nodes, so DeepSeek balances globally
    # and never asks whether 3 divides 4: the global policy is the one-group, one-node hierarchy.
    weight = torch.tensor([[10, 20, 30, 40]])
    phy2log, _, logcnt = rebalance_experts(weight, 8, 3, 2, 4)
    flat, _, flat_cnt = rebalance_experts(weight, 8, 1, 1, 4)
    assert torch.equal(phy2log, flat) and torch.equal(logcnt, flat_cnt)


def test_vllm_case_replicas_not_a_multiple_of_gpus_is_refused():
    with pytest.raises(ValueError, match="num_replicas"):
        rebalance_experts(torch.tensor([[10, 20, 30, 40]]), 7, 2, 2, 4)


def _deepseek_accepts(num_experts, num_replicas, num_groups, num_nodes, num_gpus) -> bool:
    """When DeepSeek's rebalance_experts runs without an assertion (positive counts): its asserts, as facts."""
    if num_replicas % num_gpus or num_replicas < num_experts:
        return False
    if num_groups % num_nodes == 0:  # hierarchical
        return num_experts % num_groups == 0 and num_gpus % num_nodes == 0
    return True


@settings(max_examples=200, deadline=None)
@given(
    num_experts=st.integers(1, 12),
    num_replicas=st.integers(1, 24),
    num_groups=st.integers(1, 6),
    num_nodes=st.integers(1, 4),
    num_gpus=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_accepts_exactly_what_deepseek_accepts(num_experts, num_replicas, num_groups, num_nodes, num_gpus, seed):
    weight = torch.from_numpy(np.random.default_rng(seed).integers(0, 100, (2, num_experts)))
    if _deepseek_accepts(num_experts, num_replicas, num_groups, num_nodes, num_gpus):
        phy2log, log2phy, logcnt = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
        _check_consistent(weight, phy2log, log2phy, logcnt, num_replicas, num_gpus)
    else:
        with pytest.raises(ValueError):
            rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
