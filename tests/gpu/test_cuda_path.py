"""What only a GPU shows: the CUDA path makes no host synchronisation, replays in a CUDA graph, repeats bit for bit.

Not collected by ``make test`` (``testpaths`` names tests/unit and
tests/integration): run on a CUDA machine, with the kernels compiled
(``TRITON_INTERPRET=0``), by ``scripts/gpu_kernels.sh tests``. Without CUDA
every test here is skipped with that reason.
"""

from types import SimpleNamespace

import pytest
import torch

from moefleet.kernels.experts import ExpertStack
from moefleet.kernels.layer import GateWeights, MoELayer
from moefleet.kernels.fused_moe import fused_experts, fused_experts_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def layer_spec(hidden, inter, experts, top_k, scoring="softmax"):
    """The routing attributes MoELayer reads (duck-typed MoELayerSpec: no pydantic needed here)."""
    return SimpleNamespace(
        hidden_size=hidden, intermediate_size=inter, num_experts=experts, top_k=top_k, scoring=scoring,
        score_correction_bias=scoring == "sigmoid", norm_topk_prob=True, norm_topk_p=1.0, norm_eps=0.0,
        n_group=1, topk_group=1, group_score="max", routed_scaling_factor=1.0, capacity=None,
    )  # fmt: skip


def make_layer(hidden=256, inter=384, experts=16, top_k=4, dtype=torch.bfloat16, scoring="softmax"):
    g = torch.Generator(device="cuda").manual_seed(0)
    stack = ExpertStack(
        w13=(torch.randn(experts, 2 * inter, hidden, generator=g, device="cuda") * hidden**-0.5).to(dtype),
        w2=(torch.randn(experts, hidden, inter, generator=g, device="cuda") * inter**-0.5).to(dtype),
        gated=True, activation="silu",
    )  # fmt: skip
    gate = GateWeights(
        weight=torch.randn(experts, hidden, generator=g, device="cuda"),
        correction_bias=torch.randn(experts, generator=g, device="cuda") * 0.1 if scoring == "sigmoid" else None,
    )
    return MoELayer(layer_spec(hidden, inter, experts, top_k, scoring), gate, stack, backend="triton")


def tokens(n, hidden=256, dtype=torch.bfloat16, seed=1):
    return torch.randn(n, hidden, generator=torch.Generator(device="cuda").manual_seed(seed), device="cuda").to(dtype)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("num_tokens", [1, 8, 300])
def test_layer_call_makes_no_host_synchronisation(scoring, num_tokens):
    layer = make_layer(scoring=scoring)
    x = tokens(num_tokens)
    layer(x)  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        out = layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == x.shape and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("num_tokens", [1, 4, 64])
def test_decode_step_is_captured_in_a_cuda_graph_and_replays_new_inputs(num_tokens):
    layer = make_layer()
    static_x = tokens(num_tokens)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile and warm the allocator off the capture
            layer(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    for seed in (2, 3):
        fresh = tokens(num_tokens, seed=seed)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, layer(fresh))  # the same kernels on the same inputs: the same bits


def test_routed_experts_repeat_bit_for_bit_at_a_large_batch():
    # Thousands of tokens over few experts: many programs per expert, where an
    # atomic combine would reorder its additions from run to run.
    layer = make_layer(hidden=512, inter=512, experts=8, top_k=2)
    x = tokens(4096, hidden=512)
    routing = layer.route(x)
    st = layer.experts
    runs = [
        fused_experts(x, routing.topk_ids, routing.topk_weights, st.w13, st.w2, gated=True, activation="silu")
        for _ in range(3)
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[1], runs[2])
    want = fused_experts_reference(
        x.float(), routing.topk_ids, routing.topk_weights, st.w13.float(), st.w2.float(), gated=True, activation="silu"
    )
    torch.testing.assert_close(runs[0].float(), want, atol=3e-2, rtol=3e-2)


def test_fused_path_matches_reference_on_a_deepseek_like_routing():
    # Many experts, top-8, some experts empty: the tile map and the gather at a realistic ratio.
    layer = make_layer(hidden=512, inter=256, experts=64, top_k=8)
    x = tokens(37, hidden=512)
    routing = layer.route(x)
    st = layer.experts
    got = layer(x)
    want = fused_experts_reference(
        x.float(), routing.topk_ids, routing.topk_weights, st.w13.float(), st.w2.float(), gated=True, activation="silu"
    )
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
