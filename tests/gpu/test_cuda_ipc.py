"""CUDA IPC between two processes of one node: the memory is shared, not copied, and the expert step runs on it.

Two processes on one GPU (``torch.multiprocessing`` spawn and a pipe stand in
for the router and a worker actor: Ray is not needed for what CUDA IPC does).
Run by ``scripts/gpu_kernels.sh tests``; skipped without CUDA.
"""

import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from moefleet.core.cuda_ipc import export_tensor, open_tensor
from moefleet.kernels.fused_moe import fused_experts
from moefleet.kernels.triton_moe import fused_topk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KW = {"gated": True, "activation": "silu"}


def recv(conn, timeout_s: float = 120.0):
    """The worker's answer, or a failure (never a hang) if none comes."""
    if not conn.poll(timeout_s):
        pytest.fail(f"the worker process sent nothing in {timeout_s:.0f} s")
    return conn.recv()


def _worker(conn):
    """The worker side: open what the router sends, act on it, answer with handles."""
    torch.cuda.init()
    conn.send("ready")
    held = None
    while True:
        msg = conn.recv()
        if msg is None:
            return
        kind, payload = msg
        if kind == "add_one":  # in place: the router must see it in its own tensor
            x = open_tensor(payload)
            x.add_(1)
            torch.cuda.synchronize()
            del x
            conn.send("done")
        elif kind == "experts":  # the expert step on the router's hidden states; reply with a handle
            x, ids, weights, w13, w2 = (open_tensor(h) for h in payload)
            held = fused_experts(x, ids, weights, w13, w2, out_dtype=torch.float32, **KW)
            torch.cuda.synchronize()
            conn.send(export_tensor(held))
        elif kind == "export_and_drop":  # export, drop every local reference, churn the allocator
            out = torch.arange(payload, device="cuda", dtype=torch.float32) * 3
            handle = export_tensor(out)
            torch.cuda.synchronize()
            del out
            torch.cuda.empty_cache()
            churn = [torch.full((payload,), -7.0, device="cuda") for _ in range(4)]
            torch.cuda.synchronize()
            conn.send(handle)
            del churn


@pytest.fixture(scope="module")
def worker():
    # A spawned child imports this module again through sys.path, where pytest put the checkout first; on a
    # machine that reaches the kernels through a shim package (scripts/gpu_kernels.sh), the child must find
    # `moefleet` where this process found it.
    import moefleet

    found = str(Path(moefleet.__file__).resolve().parent.parent)
    sys.path.insert(0, found)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(child,), daemon=True)
    proc.start()
    assert parent.poll(120) and parent.recv() == "ready", "the worker process did not start"
    yield parent
    parent.send(None)
    proc.join(timeout=30)
    sys.path.remove(found)


def test_handle_is_small_and_the_worker_writes_the_routers_memory_in_place(worker):
    x = torch.arange(16 << 20, device="cuda", dtype=torch.float32)  # 64 MB
    handle = export_tensor(x)
    assert len(pickle.dumps(handle)) < 2048
    worker.send(("add_one", handle))
    assert recv(worker) == "done"
    torch.cuda.synchronize()
    assert torch.equal(x, torch.arange(16 << 20, device="cuda", dtype=torch.float32) + 1)


def test_expert_step_on_shared_hidden_states_returns_the_same_bits_as_in_process(worker):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden, inter, experts, top_k, tokens = 512, 384, 16, 4, 200
    x = torch.randn(tokens, hidden, generator=g, device="cuda").bfloat16()
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g, device="cuda") * hidden**-0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, generator=g, device="cuda") * inter**-0.5).bfloat16()
    ids, weights = fused_topk(torch.randn(tokens, experts, generator=g, device="cuda"), top_k, renormalize=True)
    want = fused_experts(x, ids, weights, w13, w2, out_dtype=torch.float32, **KW)
    worker.send(("experts", [export_tensor(t) for t in (x, ids, weights, w13, w2)]))
    got = open_tensor(recv(worker))
    assert got.device == x.device and got.shape == (tokens, hidden)
    assert torch.equal(got, want)


def test_exported_memory_outlives_the_producers_own_reference(worker):
    worker.send(("export_and_drop", 1 << 20))
    got = open_tensor(recv(worker))
    assert torch.equal(got, torch.arange(1 << 20, device="cuda", dtype=torch.float32) * 3)
