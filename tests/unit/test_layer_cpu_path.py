"""The in-process layer's CPU (torch) path gives the same bits as before the fused CUDA path existed.

The reference below is the layer's CPU computation as it was written before
the Triton path learned to gather, combine and add the shared experts itself:
a stable argsort of the slots by expert, a gather, a loop over experts, a
weighted ``index_add_`` in fp32, the shared experts added in fp32, a cast.
It is spelled out in plain torch here, so that no kernel module change can
move both sides at once.
"""

import pytest
import torch
import torch.nn.functional as F

from moefleet.core.config import CapacitySpec, MoELayerSpec
from moefleet.kernels.experts import ExpertStack, SharedExperts
from moefleet.kernels.layer import GateWeights, MoELayer
from moefleet.kernels.routing import route

ACT = {"silu": F.silu, "gelu": F.gelu}


def old_cpu_layer(layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
    spec, st = layer.spec, layer.experts
    routing = route(layer.gate.logits(hidden), spec, layer.gate.correction_bias)
    ids, weights = routing.topk_ids, routing.topk_weights
    k = ids.shape[1]
    flat = ids.reshape(-1)
    keyed = torch.where(flat >= 0, flat, torch.full_like(flat, spec.num_experts))
    order = torch.argsort(keyed, stable=True)
    counts = torch.bincount(keyed, minlength=spec.num_experts + 1)[: spec.num_experts]
    bounds = [0, *torch.cumsum(counts, 0).tolist()]
    slot = order[: bounds[-1]]
    x = hidden.index_select(0, slot // k)
    y = torch.empty(x.shape[0], st.w2.shape[1], dtype=x.dtype)
    for e in range(spec.num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        g = x[lo:hi] @ st.w13[e].T
        if st.b13 is not None:
            g = g + st.b13[e].to(g.dtype)
        if st.gated:
            gate, up = g.chunk(2, dim=-1)
            h = ACT[st.activation](gate) * up
        else:
            h = ACT[st.activation](g)
        ye = h @ st.w2[e].T
        if st.b2 is not None:
            ye = ye + st.b2[e].to(ye.dtype)
        y[lo:hi] = ye
    out = torch.zeros(hidden.shape[0], y.shape[-1], dtype=torch.float32)
    out.index_add_(0, slot // k, y.float() * weights.reshape(-1).index_select(0, slot).float()[:, None])
    if layer.shared is not None:
        out = out + layer.shared(hidden).float()
    return out.to(hidden.dtype)


def make_layer(gated: bool, shared: bool, capacity, dtype: torch.dtype, seed: int = 0) -> MoELayer:
    g = torch.Generator().manual_seed(seed)
    hidden, inter, experts, top_k = 48, 40, 6, 2
    spec = MoELayerSpec(
        hidden_size=hidden, intermediate_size=inter, num_experts=experts, top_k=top_k, norm_topk_prob=True,
        capacity=capacity, expert_kind="gated" if gated else "mlp", activation="silu" if gated else "gelu",
        expert_bias=not gated, num_shared_experts=1 if shared else 0, shared_intermediate_size=32 if shared else 0,
    )  # fmt: skip
    rows = inter * (2 if gated else 1)
    stack = ExpertStack(
        w13=(torch.randn(experts, rows, hidden, generator=g) * hidden**-0.5).to(dtype),
        w2=(torch.randn(experts, hidden, inter, generator=g) * inter**-0.5).to(dtype),
        gated=gated, activation=spec.activation,
        b13=None if gated else (torch.randn(experts, rows, generator=g) * 0.1).to(dtype),
        b2=None if gated else (torch.randn(experts, hidden, generator=g) * 0.1).to(dtype),
    )  # fmt: skip
    sh = None
    if shared:
        sh = SharedExperts(
            w13=(torch.randn(64, hidden, generator=g) * hidden**-0.5).to(dtype),
            w2=(torch.randn(hidden, 32, generator=g) * 32**-0.5).to(dtype),
            activation="silu",
        )
    gate = GateWeights(weight=torch.randn(experts, hidden, generator=g))
    return MoELayer(spec, gate, stack, sh, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("gated", "shared", "capacity"),
    [(True, False, None), (True, True, None), (False, False, CapacitySpec(tokens=5)), (True, True, CapacitySpec(factor=0.6))],
    ids=["gated", "gated+shared", "mlp+capacity", "gated+shared+capacity"],
)
def test_cpu_layer_output_is_bitwise_the_same_as_before(gated, shared, capacity, dtype):
    layer = make_layer(gated, shared, capacity, dtype)
    hidden = torch.randn(37, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    routing = route(layer.gate.logits(hidden), layer.spec, None)
    if capacity is not None:
        assert (routing.topk_ids < 0).any(), "the capacity should drop some slots"
    assert torch.equal(layer(hidden), old_cpu_layer(layer, hidden))
