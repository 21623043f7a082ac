"""Expert-parallel load balancing in DeepSeek EPLB's conventions (plan from scratch).

This is the baseline the planner is measured against ("greedy replicate, then
pack"), written here from its published description; the function names,
shapes and meanings follow DeepSeek's ``eplb.py`` so results can be compared.

Glossary (DeepSeek's words)
---------------------------
logical expert
    One routed expert of one layer, ``0 <= e < E``.
physical expert (slot)
    One replica of a logical expert on one GPU, ``0 <= r < R``. Slots are
    contiguous per GPU: slot ``r`` lives on GPU ``r // (R // num_gpus)``, and on
    node ``r // (R // num_nodes)``.
redundant experts
    ``R - E`` extra slots, given to the hottest experts.

Worked example: 256 logical experts + 32 redundant = 288 physical experts on 32
GPUs gives 9 slots per GPU; with 8 nodes, 36 slots per node.

Two policies:

* hierarchical (``num_groups % num_nodes == 0``): expert groups (``E //
  num_groups`` consecutive experts each, as in group-limited routing) are first
  packed onto nodes so every node gets the same number of groups; each node
  then replicates its own experts and packs the replicas onto its GPUs. All
  replicas of a group stay on one node. Needs ``E % num_groups == 0`` and
  ``num_gpus % num_nodes == 0``.
* global (otherwise): one node, one group: replicate over all experts, pack
  onto all GPUs. Groups and nodes play no part, so neither needs to divide
  anything (4 experts in 3 groups on 2 nodes is planned globally).

Inputs accepted are exactly DeepSeek's: positive counts with ``num_replicas``
a multiple of ``num_gpus`` and at least ``E``, plus the hierarchical
divisibility above when ``num_groups % num_nodes == 0``. Loads must be finite
and ``>= 0`` (token counts); anything else is refused with an error naming the
argument.

Both assume every replica of an expert takes an equal share of its load
(``weight / logcnt``), and may put two replicas of one expert on one GPU.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["balanced_packing", "rebalance_experts", "replicate_greedy"]


def _as_2d_float(weight: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        arr = weight.detach().to("cpu", torch.float64).numpy()
    else:
        arr = np.asarray(weight, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D tensor [rows, items], got shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name}: loads must be finite and >= 0")
    return arr


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``N`` weighted items into ``num_packs`` packs of exactly ``N // num_packs`` items each.

    Longest-processing-time first: items in decreasing weight (ties: lower
    index first) go to the lightest pack that still has room (ties: lower pack).

    Args:
        weight: ``[X, N]`` weight of each item, one packing problem per row.
        num_packs: number of packs; must divide ``N``.

    Returns:
        pack_index: ``[X, N]`` int64, the pack of each item.
        rank_in_pack: ``[X, N]`` int64, the item's position inside its pack
        (0 .. N // num_packs - 1), in the order items were packed.
    """
    w = _as_2d_float(weight, "weight")
    rows, n = w.shape
    if num_packs <= 0 or n % num_packs != 0:
        raise ValueError(f"num_packs: must be a positive divisor of the item count {n}, got {num_packs}")
    per_pack = n // num_packs
    if per_pack == 1:
        pack_index = np.broadcast_to(np.arange(n, dtype=np.int64), (rows, n)).copy()
        return torch.from_numpy(pack_index), torch.zeros((rows, n), dtype=torch.int64)

    pack_index = np.full((rows, n), -1, dtype=np.int64)
    rank_in_pack = np.full((rows, n), -1, dtype=np.int64)
    for i in range(rows):
        order = np.argsort(-w[i], kind="stable")
        pack_weight = np.zeros(num_packs)
        pack_items = np.zeros(num_packs, dtype=np.int64)
        for item in order:
            masked = np.where(pack_items < per_pack, pack_weight, np.inf)
            pack = int(np.argmin(masked))
            pack_index[i, item] = pack
            rank_in_pack[i, item] = pack_items[pack]
            pack_weight[pack] += w[i, item]
            pack_items[pack] += 1
    return torch.from_numpy(pack_index), torch.from_numpy(rank_in_pack)


def replicate_greedy(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replicate ``N`` logical experts into ``num_phy`` physical ones, minimising the hottest replica.

    Physical expert ``i < N`` is logical expert ``i``; each further one is a
    copy of the expert with the highest load per replica (``weight /
    logcnt``; ties: lower index), which then gets one more replica.

    Args:
        weight: ``[X, N]`` load of each logical expert.
        num_phy: number of physical experts, ``>= N``.

    Returns:
        phy2log: ``[X, num_phy]`` int64, logical expert of each physical one.
        rank: ``[X, num_phy]`` int64, replica rank of each physical expert
        (0 for the first copy of its logical expert, 1 for the next, ...).
        logcnt: ``[X, N]`` int64, number of replicas of each logical expert.
    """
    w = _as_2d_float(weight, "weight")
    rows, n = w.shape
    if num_phy < n:
        raise ValueError(f"num_phy: must be >= the number of logical experts {n}, got {num_phy}")
    phy2log = np.empty((rows, num_phy), dtype=np.int64)
    phy2log[:, :n] = np.arange(n)
    rank = np.zeros((rows, num_phy), dtype=np.int64)
    logcnt = np.ones((rows, n), dtype=np.int64)
    row_ids = np.arange(rows)
    for i in range(n, num_phy):
        hottest = np.argmax(w / logcnt, axis=1)
        phy2log[:, i] = hottest
        rank[:, i] = logcnt[row_ids, hottest]
        logcnt[row_ids, hottest] += 1
    return torch.from_numpy(phy2log), torch.from_numpy(rank), torch.from_numpy(logcnt)


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of a permutation ``[X, N]``."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _rebalance_hierarchical(
    w: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns ``phy2log [L, R]``, ``phyrank [L, R]``, ``logcnt [L, E]`` (numpy int64)."""
    num_layers, num_log = w.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_log // num_nodes
    phy_per_node = num_phy // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_gpu = num_phy // num_gpus

    # 1. Groups to nodes, the same number of groups on each node.
    group_load = w.reshape(num_layers, num_groups, group_size).sum(-1)  # [L, num_groups]
    group_node, group_rank = (t.numpy() for t in balanced_packing(torch.from_numpy(group_load), num_nodes))
    # "mlog": logical experts renumbered node-major (node, group slot, expert in group).
    group_base = (group_node * groups_per_node + group_rank) * group_size  # [L, num_groups]
    log2mlog = (group_base[:, :, None] + np.arange(group_size)).reshape(num_layers, num_log)
    mlog2log = _inverse(log2mlog)

    # 2. Replicate inside each node: one problem per (layer, node).
    mlog_load = np.take_along_axis(w, mlog2log, axis=1).reshape(num_layers * num_nodes, log_per_node)
    phy2mlog, phyrank, mlogcnt = (t.numpy() for t in replicate_greedy(torch.from_numpy(mlog_load), phy_per_node))

    # 3. Pack each node's replicas onto its GPUs, equal slot count per GPU.
    phy_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, axis=1)  # [L*nodes, phy_per_node]
    gpu_of, rank_on_gpu = (t.numpy() for t in balanced_packing(torch.from_numpy(phy_load), gpus_per_node))
    phy2pphy = gpu_of * phy_per_gpu + rank_on_gpu  # position of each replica inside its node
    pphy2phy = _inverse(phy2pphy)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)  # node-local mlog ids
    pphy2mlog = (pphy2mlog.reshape(num_layers, num_nodes, phy_per_node)
                 + (np.arange(num_nodes) * log_per_node)[None, :, None]).reshape(num_layers, num_phy)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(num_layers, num_phy)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, num_log), log2mlog, axis=1)
    return phy2log, pphyrank, logcnt


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan replicas and their GPUs for every layer, from scratch.

    Args:
        weight: ``[L, E]`` load of each logical expert (e.g. decayed token counts).
        num_replicas: ``R``, physical experts per layer; a multiple of ``num_gpus``, ``>= E``.
        num_groups: expert groups; hierarchical when ``num_groups % num_nodes
            == 0`` (then ``E % num_groups == 0`` is required), else global.
        num_nodes: nodes; must divide ``num_gpus`` under the hierarchical policy.
        num_gpus: GPUs; slot ``r`` lives on GPU ``r // (R // num_gpus)``.

    Returns:
        phy2log: ``[L, R]`` int64, the logical expert in each slot.
        log2phy: ``[L, E, X]`` int64, the slots of each logical expert, in
            replica-rank order, padded with -1 (``X`` = the most replicas any
            expert has).
        logcnt: ``[L, E]`` int64, number of replicas of each logical expert.
    """
    w = _as_2d_float(weight, "weight")
    num_layers, num_log = w.shape
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups),
                        ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if int(value) != value or value <= 0:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    num_replicas, num_groups, num_nodes, num_gpus = (int(v) for v in (num_replicas, num_groups, num_nodes, num_gpus))
    hierarchical = num_groups % num_nodes == 0
    if hierarchical:  # groups and nodes matter only when the groups divide among the nodes
        if num_log % num_groups:
            raise ValueError(
                f"num_groups: {num_groups} does not divide the {num_log} experts "
                f"(needed because {num_groups} groups divide among {num_nodes} nodes: hierarchical policy)"
            )
        if num_gpus % num_nodes:
            raise ValueError(f"num_gpus: {num_gpus} is not a multiple of num_nodes {num_nodes}")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas: {num_replicas} is not a multiple of num_gpus {num_gpus}")
    if num_replicas < num_log:
        raise ValueError(f"num_replicas: {num_replicas} is fewer than the {num_log} logical experts")

    if hierarchical:
        phy2log, phyrank, logcnt = _rebalance_hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = _rebalance_hierarchical(w, num_replicas, 1, 1, num_gpus)

    max_cnt = int(logcnt.max())
    log2phy = np.full((num_layers, num_log * max_cnt), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * max_cnt + phyrank,
                      np.broadcast_to(np.arange(num_replicas, dtype=np.int64), phy2log.shape), axis=1)
    return (torch.from_numpy(np.ascontiguousarray(phy2log)),
            torch.from_numpy(log2phy.reshape(num_layers, num_log, max_cnt)),
            torch.from_numpy(np.ascontiguousarray(logcnt)))
