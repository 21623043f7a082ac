"""The ExpertGroup worker without Ray: slot loading, unloading, quarantine, and exact results throughout."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from moefleet import MoEModel
from moefleet.core.calls import WorkerCall, WorkerFailure, WorkerReply
from moefleet.core.placement import held_experts
from moefleet.expert_workers.group import ExpertGroupCore, ExpertNotLoadedError
from moefleet.expert_workers.slots import LayerSlots
from moefleet.kernels.permute import permute
from tests import hf_models


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral-worker")
    model, _ = hf_models.build("mixtral", num_local_experts=8, num_experts_per_tok=2)
    model.save_pretrained(path)
    return path


def _call(worker, model, layer, hidden, experts_allowed):
    """Route with the model, keep assignments to ``experts_allowed``, call the worker; return (partial, expected)."""
    lay = model.layer(layer)
    _, routing = lay(hidden, return_routing=True)
    ids = routing.topk_ids.clone()
    ids[~torch.isin(ids, torch.tensor(experts_allowed))] = -1
    perm = permute(ids, model.spec.layer.num_experts)
    rows = perm.token_index.numpy()
    counts = perm.counts().numpy()
    experts = [int(e) for e in np.flatnonzero(counts)]
    uniq, inverse = np.unique(rows, return_inverse=True)
    weights = routing.topk_weights.reshape(-1)[perm.slot_index].numpy().astype(np.float32)
    got = worker.forward(layer, hidden.numpy(), rows, weights, experts, [int(counts[e]) for e in experts], inverse, len(uniq))
    # expected: the in-process layer's routed output restricted to those experts
    w = routing.topk_weights * (ids >= 0)
    y = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e >= 0:
                ex = lay.experts
                g, u = torch.nn.functional.linear(hidden[t], ex.w13[e]).chunk(2)
                y[t] += w[t, k] * torch.nn.functional.linear(torch.nn.functional.silu(g) * u, ex.w2[e])
    return torch.from_numpy(got), y[torch.from_numpy(uniq)]


def test_worker_results_are_exact_across_loads_and_unloads(checkpoint):
    model = MoEModel.from_pretrained(checkpoint, backend="torch")
    worker = ExpertGroupCore("w", str(checkpoint), [(0, 1), (0, 5)], backend="torch")
    hidden = torch.randn(40, model.spec.layer.hidden_size, generator=torch.Generator().manual_seed(0))
    got, want = _call(worker, model, 0, hidden, [1, 5])
    assert (got - want).abs().max() <= 1e-5
    worker.unload([(0, 1)])
    worker.load([(0, 7), (0, 2), (0, 6)])  # slots reused and grown, out of expert order
    assert worker.experts() == [(0, 2), (0, 5), (0, 6), (0, 7)]
    got, want = _call(worker, model, 0, hidden, [2, 5, 6, 7])
    assert (got - want).abs().max() <= 1e-5
    with pytest.raises(ExpertNotLoadedError, match=r"experts \[1\]"):
        _call(worker, model, 0, hidden, [1])


def test_load_copies_one_expert_into_a_free_slot_and_unload_copies_nothing():
    slots = LayerSlots(gated=True, activation="silu", device=torch.device("cpu"), dtype=torch.float32)

    def expert(v):
        return {"w1": torch.full((3, 4), v), "w3": torch.full((3, 4), -v), "w2": torch.full((4, 3), v)}

    for e in range(4):
        slots.put(e, expert(float(e)))
    stack = slots.stack
    assert slots.capacity == 4
    slots.drop(2)
    slots.release(None)  # no forward running: the slot is free at once
    slots.put(9, expert(9.0))
    assert slots.stack is stack, "a load into a free slot does not re-stack"
    assert slots.slot_of[9] == 2 and float(stack.w13[2, 0, 0]) == 9.0 and float(stack.w13[2, 3, 0]) == -9.0
    slots.put(10, expert(10.0))  # full: grows by doubling, keeping every expert
    assert slots.capacity == 8
    assert float(slots.stack.w2[slots.slot_of[1], 0, 0]) == 1.0


def test_freed_slot_is_quarantined_while_an_older_forward_may_read_it():
    slots = LayerSlots(gated=False, activation="relu", device=torch.device("cpu"), dtype=torch.float32)
    for e in range(4):
        slots.put(e, {"w1": torch.ones(3, 4) * e, "w2": torch.ones(4, 3)})
    old_view = slots.view()  # a forward started here (generation 0)
    slots.drop(1)
    slots.release(old_view.generation)  # that forward still runs
    slots.put(5, {"w1": torch.ones(3, 4) * 5, "w2": torch.ones(4, 3)})
    assert slots.slot_of[5] != old_view.slot_of[1], "the old forward's slot was not overwritten"
    assert float(old_view.stack.w13[old_view.slot_of[1], 0, 0]) == 1.0
    slots.release(None)  # that forward finished
    assert old_view.slot_of[1] in slots.free


def test_a_forward_taking_its_view_during_an_unload_and_load_keeps_its_weights(checkpoint):
    """The scheduler interleaves an unload of expert e and a load of another expert between a forward
    reading its view and registering as running: the freed slot must not be reused under it."""
    import threading

    model = MoEModel.from_pretrained(checkpoint)
    worker = ExpertGroupCore("w", str(checkpoint), [(0, e) for e in range(4)], backend="torch")
    hidden = torch.randn(12, model.spec.layer.hidden_size, generator=torch.Generator().manual_seed(3))
    slot_before = worker._slots[0].slot_of[1]
    done = threading.Event()

    def unload_then_load():
        worker.unload([(0, 1)])
        worker.load([(0, 6)])  # wants a free slot: the one expert 1 left, unless a forward may still read it
        done.set()

    class Interleaved(dict):
        fired = False

        def get(self, key, default=None):
            view = super().get(key, default)
            if not Interleaved.fired:
                Interleaved.fired = True
                threading.Thread(target=unload_then_load, daemon=True).start()
                done.wait(0.5)  # with the race open the load completes here; closed, it waits for this forward
            return view

    worker._views = Interleaved(worker._views)
    for name in ("_experts_stepwise", "_experts_fused"):  # the load lands while the forward is in flight, however slow
        compute = getattr(worker, name)  # the thread (a loaded machine): else the forward could finish first and free
        setattr(worker, name, lambda *a, _c=compute: (done.wait(10), _c(*a))[1])  # the slot for a legitimate reuse
    got, want = _call(worker, model, 0, hidden, [0, 1, 2, 3])
    assert done.wait(10)
    assert (got - want).abs().max().item() <= 1e-5, "the forward read weights another load wrote into its slot"
    assert worker._slots[0].slot_of[6] != slot_before
    assert sorted(worker.experts()) == [(0, 0), (0, 2), (0, 3), (0, 6)]


def test_commands_from_an_older_leader_are_refused(checkpoint):
    from moefleet.expert_workers.group import StaleCommandError

    worker = ExpertGroupCore("w", str(checkpoint), [(0, 0)], backend="torch")
    worker.load([(0, 1)], token=200)
    with pytest.raises(StaleCommandError, match="token 100"):
        worker.unload([(0, 0)], token=100)
    with pytest.raises(StaleCommandError):
        worker.load([(0, 2)], token=199)
    assert worker.experts() == [(0, 0), (0, 1)]
    worker.unload([(0, 0)], token=201)  # a newer leader is obeyed
    assert worker.experts() == [(0, 1)]


def test_one_token_serves_a_whole_step_and_a_command_without_one_is_refused_where_required(checkpoint):
    """A rebalance loads and then unloads under one token: the replay is obeyed (a ``<=`` check would refuse
    every unload of every rebalance). A worker that requires a fence refuses a command that carries none."""
    from moefleet.expert_workers.group import StaleCommandError

    worker = ExpertGroupCore("w", str(checkpoint), [(0, 0)], backend="torch", require_fence=True)
    worker.load([(0, 1)], token=300)
    worker.unload([(0, 0)], token=300)  # the same step's unload
    worker.load([(0, 2)], token=300)
    assert worker.experts() == [(0, 1), (0, 2)]
    with pytest.raises(StaleCommandError, match="without a fencing token"):
        worker.unload([(0, 1)])
    with pytest.raises(StaleCommandError, match="without a fencing token"):
        worker.load([(0, 3)])
    assert worker.experts() == [(0, 1), (0, 2)]


def test_a_load_past_the_memory_budget_is_refused_and_changes_nothing(checkpoint):
    from moefleet.expert_workers.slots import MemoryBudgetError

    probe = ExpertGroupCore("p", str(checkpoint), [(0, 0)], backend="torch")
    slot = probe._slots[0].slot_bytes({})  # bytes of one slot
    worker = ExpertGroupCore("w", str(checkpoint), [(0, e) for e in range(4)], backend="torch", memory_budget_bytes=4 * slot)
    assert worker.stats()["reserved_bytes"] == 4 * slot
    with pytest.raises(MemoryBudgetError, match="no room"):  # a fifth expert passes the budget
        worker.load([(0, 4)])
    assert worker.experts() == [(0, 0), (0, 1), (0, 2), (0, 3)] and worker.stats()["reserved_bytes"] == 4 * slot
    roomy = ExpertGroupCore("r", str(checkpoint), [(0, e) for e in range(4)], backend="torch", memory_budget_bytes=10 * slot)
    roomy.load([(0, 4)])  # grows to 6 slots, not 8: 4 + 6 fit in 10 while the copy runs
    assert roomy.stats()["reserved_bytes"] == 6 * slot


def test_worker_and_planner_count_memory_the_same_way(checkpoint):
    """What the planner places on a device (experts x the bytes the controller counts per replica, within the
    budget less its headroom) the worker takes, whatever its slot stacks reserve: a full stack that cannot double
    beside itself still grows by the slot wanted."""
    from moefleet.controller.main import held_expert_bytes
    from moefleet.core.config import WorkerConfig
    from moefleet.core.model import MoECheckpoint

    ckpt = MoECheckpoint(str(checkpoint))
    per_expert = held_expert_bytes(ckpt, list(ckpt.spec.moe_layers), WorkerConfig())
    budget = 6 * per_expert  # the planner (10 % headroom) places up to 5 experts here
    worker = ExpertGroupCore("w", str(checkpoint), [(0, e) for e in range(4)], backend="torch", memory_budget_bytes=budget)
    assert worker.stats()["memory_bytes"] == 4 * per_expert
    worker.load([(0, 4)])  # the stack of 4 is full and 4 + 8 slots do not fit in 6: it grows by one
    assert worker.experts() == [(0, e) for e in range(5)]
    assert worker.stats()["memory_bytes"] == 5 * per_expert <= budget * 0.9


def test_slot_stacks_shrink_when_emptied_and_results_stay_exact(checkpoint):
    model = MoEModel.from_pretrained(checkpoint, backend="torch")
    worker = ExpertGroupCore("w", str(checkpoint), [(0, e) for e in range(8)], backend="torch")
    slot = worker._slots[0].slot_bytes({})
    assert worker.stats()["reserved_bytes"] == 8 * slot
    hidden = torch.randn(40, model.spec.layer.hidden_size, generator=torch.Generator().manual_seed(5))
    worker.unload([(0, e) for e in (0, 1, 2, 4, 5, 7)])  # 2 of 8 slots left in use: compacted
    assert worker.experts() == [(0, 3), (0, 6)] and worker.stats()["reserved_bytes"] == 4 * slot
    got, want = _call(worker, model, 0, hidden, [3, 6])
    assert (got - want).abs().max() <= 1e-5
    worker.unload([(0, 3), (0, 6)])  # emptied: freed
    assert worker.experts() == [] and worker.stats()["reserved_bytes"] == 0
    with pytest.raises(ExpertNotLoadedError):
        _call(worker, model, 0, hidden, [3])
    worker.load([(0, 1), (0, 6)])
    got, want = _call(worker, model, 0, hidden, [1, 6])
    assert (got - want).abs().max() <= 1e-5


def _rows_of(model, layer, hidden):
    """A worker batch holding every assignment of ``hidden``: rows grouped by expert, as the router sends them."""
    _, routing = model.layer(layer)(hidden, return_routing=True)
    perm = permute(routing.topk_ids, model.spec.layer.num_experts)
    rows = perm.token_index.numpy()
    counts = perm.counts().numpy()
    experts = [int(e) for e in np.flatnonzero(counts)]
    uniq, inverse = np.unique(rows, return_inverse=True)
    weights = routing.topk_weights.reshape(-1)[perm.slot_index].numpy().astype(np.float32)
    return (layer, hidden.numpy(), rows, weights, experts, [int(counts[e]) for e in experts], inverse, len(uniq))


def test_triton_worker_runs_the_fused_kernel_with_slots_out_of_expert_order(checkpoint, monkeypatch):
    """The CUDA branch (Triton backend; here under Triton's interpreter): rows in the top-k form, gathered in the
    kernel, combined in a fixed order. Its numbers match the torch worker's, bit for bit from run to run."""
    from moefleet.kernels import fused_moe

    calls = []
    real = fused_moe.fused_experts
    monkeypatch.setattr(fused_moe, "fused_experts", lambda *a, **k: calls.append(k["token_index"]) or real(*a, **k))
    model = MoEModel.from_pretrained(checkpoint, backend="torch")
    keys = [(0, e) for e in (6, 2, 7, 0, 4, 1, 5, 3)]  # slot i holds expert keys[i]: slots != expert ids
    fused = ExpertGroupCore("wf", str(checkpoint), keys, backend="triton")
    torch_worker = ExpertGroupCore("wt", str(checkpoint), keys, backend="torch")
    assert fused.fused(0, fused._views[0]) and not torch_worker.fused(0, torch_worker._views[0])
    hidden = torch.randn(9, model.spec.layer.hidden_size, generator=torch.Generator().manual_seed(4))
    args = _rows_of(model, 0, hidden)
    reply = fused.serve(_shared_call(*args), args[1])
    got, times = reply.partial, reply.times
    assert len(calls) == 1 and calls[0].tolist() == sorted(set(args[2].tolist()))  # each unique token read once
    want = torch_worker.forward(*args)
    assert np.abs(got - want).max() <= 1e-5
    assert np.array_equal(fused.forward(*args), got)  # deterministic: no atomics in the combine
    assert set(times) == {"worker_gather", "expert_ffn", "worker_combine", "start", "end"}


def _shared_call(layer, hidden, rows, weights, experts, counts, inverse, num_unique, **kw):
    """The WorkerCall of ``_rows_of``'s batch in shared form: rows index the whole batch."""
    uniq = np.unique(rows)
    kw.setdefault("dtype", "float32")
    return WorkerCall(layer, rows, weights, tuple(experts), tuple(counts), inverse, num_unique, token_index=uniq, **kw)


def _rows_call(layer, hidden, rows, weights, experts, counts, inverse, num_unique):
    """The same batch in rows form: the call carries only its unique tokens' hidden states, read in order."""
    uniq = np.unique(rows)
    return WorkerCall(layer, inverse, weights, tuple(experts), tuple(counts), inverse, num_unique, token_index=None,
                      x=np.ascontiguousarray(hidden[uniq]), dtype="float32", transport="rows")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_worker_sent_only_its_rows_computes_what_it_computes_from_the_shared_batch(checkpoint, backend):
    """Rows form (a worker on another node) and shared form (one batch for a node's workers) give the same partial."""
    model = MoEModel.from_pretrained(checkpoint, backend="torch")
    keys = [(0, e) for e in range(model.spec.layer.num_experts)]
    worker = ExpertGroupCore("w", str(checkpoint), keys, backend=backend)
    hidden = torch.randn(11, model.spec.layer.hidden_size, generator=torch.Generator().manual_seed(8))
    args = _rows_of(model, 0, hidden)
    shared = worker.serve(_shared_call(*args), args[1])
    rows = worker.serve(_rows_call(*args))
    assert isinstance(shared, WorkerReply) and isinstance(rows, WorkerReply)
    assert rows.partial.shape == (args[7], model.spec.layer.hidden_size)
    assert np.abs(rows.partial - shared.partial).max() <= 1e-6


def test_refusals_come_back_as_failures_not_exceptions(checkpoint):
    model = MoEModel.from_pretrained(checkpoint, backend="torch")
    worker = ExpertGroupCore("w", str(checkpoint), [(0, 0)], backend="torch")
    args = _rows_of(model, 0, torch.randn(6, model.spec.layer.hidden_size, generator=torch.Generator().manual_seed(2)))
    missing = worker.serve(_shared_call(*args), args[1])
    assert isinstance(missing, WorkerFailure) and missing.kind == "not_loaded" and "does not hold layer 0" in missing.message
    late = worker.serve(_shared_call(*args, deadline=time.time() - 1), args[1])
    assert isinstance(late, WorkerFailure) and late.kind == "expired"
    no_input = worker.serve(_shared_call(0, None, np.zeros(1, np.int64), np.ones(1, np.float32), [0], [1], np.zeros(1, np.int64), 1))
    assert isinstance(no_input, WorkerFailure) and no_input.kind == "bad_call" and "no hidden states" in no_input.message
    out_of_range = _shared_call(0, None, np.array([99]), np.ones(1, np.float32), [0], [1], np.zeros(1, np.int64), 1)
    bad = worker.serve(out_of_range, args[1])
    assert isinstance(bad, WorkerFailure) and bad.kind in ("bad_call", "error")
    assert worker.stats()["queue_depth"] == 0  # every refusal left the books as it found them


def test_a_bf16_worker_returns_its_partial_in_bf16(tmp_path):
    """Partials travel in the compute dtype (half the bytes of fp32 in bf16); the router sums them in fp32."""
    model, _ = hf_models.build("mixtral")
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    m = MoEModel.from_pretrained(tmp_path, backend="torch", dtype=torch.float32)  # only to route the rows
    keys = [(0, e) for e in range(m.spec.layer.num_experts)]
    worker = ExpertGroupCore("w", str(tmp_path), keys, backend="torch")
    assert worker.dtype == torch.bfloat16
    hidden = torch.randn(7, m.spec.layer.hidden_size, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    args = list(_rows_of(m, 0, hidden.float()))
    args[1] = hidden.view(torch.int16).numpy()
    reply = worker.serve(_shared_call(*args, dtype="bfloat16"), args[1])
    assert reply.dtype == "bfloat16" and reply.partial.dtype == np.int16  # bf16 as its bits
    want = worker.forward(*args)
    assert np.array_equal(reply.partial, want)


def test_input_weighted_layers_keep_the_stepwise_path_on_triton(tmp_path):
    model, _ = hf_models.build("llama4")
    model.save_pretrained(tmp_path)
    m = MoEModel.from_pretrained(tmp_path, backend="torch")
    layer = m.moe_layers[0]
    spec = m.spec.layer_spec(layer)
    assert spec.routed_weight_on == "input"
    keys = [(layer, e) for e in range(spec.num_experts)]
    w = ExpertGroupCore("w", str(tmp_path), keys, backend="triton")
    assert not w.fused(layer, w._views[layer])
    args = _rows_of(m, layer, torch.randn(5, spec.hidden_size, generator=torch.Generator().manual_seed(1)))
    want = ExpertGroupCore("t", str(tmp_path), keys, backend="torch").forward(*args)
    assert np.abs(w.forward(*args) - want).max() <= 1e-4


def _leaves(value) -> int:
    if isinstance(value, dict):
        return sum(_leaves(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_leaves(v) for v in value)
    return 1


def test_heartbeat_payload_does_not_grow_with_the_experts_served(checkpoint):
    """At DeepSeek-V3 scale (58 layers x 256 experts) per-expert totals in every 0.25 s heartbeat would be a large
    payload per worker: the heartbeat carries totals and per-layer windowed sums, and lists only the experts held."""
    import json

    model = MoEModel.from_pretrained(checkpoint, backend="torch")
    hidden = torch.randn(64, model.spec.layer.hidden_size, generator=torch.Generator().manual_seed(6))
    busy = ExpertGroupCore("busy", str(checkpoint), [(0, e) for e in range(8)], backend="torch")
    _call(busy, model, 0, hidden, list(range(8)))  # served every expert of the layer
    busy.unload([(0, e) for e in range(1, 8)])
    quiet = ExpertGroupCore("quiet", str(checkpoint), [(0, 0)], backend="torch")
    _call(quiet, model, 0, hidden, [0])
    a, b = busy.heartbeat_info(), quiet.heartbeat_info()
    assert _leaves(a) == _leaves(b) and a["expert_runs"] == b["expert_runs"] == {"0": [[0, 1]]}
    assert held_experts(a) == [(0, 0)]
    assert a["tokens_total"] == 64 * model.spec.layer.top_k  # every routed row, as one number
    assert len(busy.stats()["tokens_served"]) == 8  # a direct stats() call still has the per-expert totals
    json.dumps(a)
