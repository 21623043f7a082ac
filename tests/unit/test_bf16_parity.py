"""Served in bf16, each family equals ``transformers``' own MoE block run in bf16 on the same input, within a stated tolerance.

The model is cast to bf16 and saved (a bf16 checkpoint, as models are
published); we load it and compute in bf16; ``transformers`` runs its block in
bf16 on the same bf16 hidden states. The router's gate runs in the precision
the family's reference uses (``MoELayerSpec.gate_precision``), so the same
experts are chosen for every token.

Tolerances are max |ours - reference| <= tol * max |reference| per layer, in
units of bf16's 8-bit mantissa (2**-8 = one rounding step at the output's
scale). Measured over seeds 0-2 on these tiny models (64 tokens per layer),
the largest relative errors were: mixtral 0, qwen2_moe 0.0057, deepseek_v2
0.0047, deepseek_v3 0.0060, qwen3_moe 0.0072, qwen3_next 0.0069, olmoe 0.0073,
glm4_moe 0.0064, deepseek_v32 0.0051, llama4_text 0.0137, gpt_oss 0.0133.
The two looser families round where we keep fp32: Llama 4 rounds the sigmoid
score to bf16 before scaling the expert input; gpt-oss takes its softmax over
the top-k logits in bf16. Everywhere, our combine weights and the weighted sum
stay in fp32 where ``transformers`` rounds them to bf16.
"""

from __future__ import annotations

import pytest
import torch

from moefleet import MoEModel
from tests import hf_models

BF16_TOLERANCE = {
    "mixtral": 2**-7,
    "qwen2_moe": 2**-6,
    "deepseek_v2": 2**-6,
    "deepseek_v3": 2**-6,
    "qwen3_moe": 2**-6,
    "qwen3_next": 2**-6,
    "olmoe": 2**-6,
    "glm4_moe": 2**-6,
    "deepseek_v32": 2**-6,
    "llama4_text": 2**-5,
    "gpt_oss": 2**-5,
}


@pytest.mark.parametrize("family", sorted(BF16_TOLERANCE))
def test_bf16_layer_is_within_tolerance_of_transformers_bf16_block(family, tmp_path):
    model, block = hf_models.build(family, seed=7)
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ours = MoEModel.from_pretrained(tmp_path, backend="torch")
    assert ours.spec.dtype == "bfloat16"
    g = torch.Generator().manual_seed(11)
    tol = BF16_TOLERANCE[family]
    for layer in ours.moe_layers:
        forward, routing = block(layer)
        hidden = torch.randn(1, 64, ours.spec.layer.hidden_size, generator=g).bfloat16()
        with torch.no_grad():
            expected = forward(hidden)[0]
            want_ids = routing(hidden[0])
        got, chosen = ours.layer(layer)(hidden[0], return_routing=True)
        assert got.dtype == expected.dtype == torch.bfloat16
        assert [set(int(x) for x in row) for row in chosen.topk_ids] == want_ids, f"layer {layer}: expert ids differ"
        scale = expected.float().abs().max().item()
        err = (got.float() - expected.float()).abs().max().item()
        assert err <= tol * scale, f"layer {layer}: max abs error {err:.3g} > {tol} x {scale:.3g}"


def test_gate_in_the_model_dtype_where_the_reference_computes_it_there(tmp_path):
    """Qwen3-MoE's reference computes router logits in bf16: so do we (fp32 logits would choose differently on near-ties)."""
    model, _ = hf_models.build("qwen3_moe")
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    layer = MoEModel.from_pretrained(tmp_path).layer(1)
    assert layer.gate.dtype == torch.bfloat16
    hidden = torch.randn(8, layer.spec.hidden_size).bfloat16()
    want = torch.nn.functional.linear(hidden, layer.gate.weight).float()
    assert torch.equal(layer.gate.logits(hidden), want)
    deepseek, _ = hf_models.build("deepseek_v3")
    deepseek.to(torch.bfloat16).save_pretrained(tmp_path / "ds")
    assert MoEModel.from_pretrained(tmp_path / "ds").layer(1).gate.dtype == torch.float32
