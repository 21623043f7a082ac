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
        ((16, 5, 2, 8), "num_groups"),
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
