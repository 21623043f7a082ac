"""Every family's MoE layer equals the ``transformers`` MoE block it reads, on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from moefleet import MoEModel
from moefleet.core.families import family_for
from tests import hf_models

CASES = [
    ("mixtral", {}),
    ("mixtral", {"num_local_experts": 8, "num_experts_per_tok": 4}),
    ("qwen2_moe", {}),
    ("qwen2_moe", {"norm_topk_prob": True, "decoder_sparse_step": 2, "mlp_only_layers": []}),
    ("deepseek_v2", {}),
    ("deepseek_v2", {"topk_method": "greedy", "n_shared_experts": 1, "routed_scaling_factor": 1.0}),
    ("deepseek_v3", {}),
    ("deepseek_v3", {"n_group": 8, "topk_group": 3, "num_experts_per_tok": 6, "n_shared_experts": 3, "first_k_dense_replace": 2}),
    ("deepseek_v3", {"n_group": 1, "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0}),
    ("dbrx", {}),
    ("dbrx", {"ffn_config": {"moe_normalize_expert_weights": 2.0, "moe_top_k": 2}}),
    ("switch_transformers", {}),
    ("switch_transformers", {"expert_capacity": 64, "router_bias": True, "num_layers": 4, "num_sparse_encoder_layers": 2}),
    ("nllb_moe", {}),
    ("nllb_moe", {"moe_eval_capacity_token_fraction": 0.3, "router_bias": True}),
    ("nllb_moe", {"moe_eval_capacity_token_fraction": 0.25, "batch_prioritized_routing": True, "moe_token_dropout": 0.0}),
    # the families people deploy today (built with initializer_range 0.2: outputs of order 1)
    ("qwen3_moe", {}),  # no renormalisation, top-3, a dense first layer (mlp_only_layers)
    ("qwen3_moe", {"norm_topk_prob": True, "decoder_sparse_step": 2, "mlp_only_layers": [], "num_hidden_layers": 4}),
    ("qwen3_moe", {"num_experts_per_tok": 1, "mlp_only_layers": [1]}),
    ("qwen3_next", {}),  # renormalised top-2, shared expert with its sigmoid gate
    ("qwen3_next", {"norm_topk_prob": False, "num_experts_per_tok": 5, "num_hidden_layers": 3, "mlp_only_layers": [1]}),
    ("olmoe", {}),
    ("olmoe", {"norm_topk_prob": True, "num_experts_per_tok": 5}),
    ("glm4_moe", {}),  # sigmoid, 4 groups of which 2, correction bias, scaling 2.5, shared expert, a dense first layer
    ("glm4_moe", {"n_group": 1, "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0,
                  "n_shared_experts": 2, "first_k_dense_replace": 0, "num_experts_per_tok": 1}),
    ("llama4_text", {}),  # top-1, every layer MoE
    ("llama4_text", {"num_experts_per_tok": 3, "num_local_experts": 8, "interleave_moe_layer_step": 2, "num_hidden_layers": 4}),
    ("llama4", {"interleave_moe_layer_step": 2}),  # as Meta publishes it: the text model under language_model
    ("gpt_oss", {}),  # router bias, expert biases, clamped SwiGLU, interleaved gate/up
    ("gpt_oss", {"num_experts_per_tok": 3, "swiglu_limit": 0.5, "swiglu_alpha": 1.0}),  # the clamps bite
    ("gpt_oss", {"num_experts_per_tok": 1}),
    ("deepseek_v32", {}),
    ("deepseek_v32", {"mlp_layer_types": ["sparse", "dense", "sparse", "sparse"], "num_hidden_layers": 4, "n_group": 8,
                      "topk_group": 3, "num_experts_per_tok": 6, "norm_topk_prob": False, "routed_scaling_factor": 1.0}),
]


def _id(case):
    family, over = case
    return family + ("-" + "-".join(f"{k}={v}" for k, v in over.items()) if over else "")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_layer_matches_transformers_block(case, tmp_path):
    family, over = case
    model, block = hf_models.build(family, seed=len(_id(case)), **over)
    model.save_pretrained(tmp_path)
    ours = MoEModel.from_pretrained(tmp_path, backend="torch")
    assert ours.spec.family == family
    assert ours.moe_layers, "the family reader found no MoE layer"
    g = torch.Generator().manual_seed(1)
    h = ours.spec.layer.hidden_size
    for layer in ours.moe_layers:
        forward, routing = block(layer)
        hidden = torch.randn(1, 37, h, generator=g)
        with torch.no_grad():
            expected = forward(hidden)[0]
            want_ids = routing(hidden[0])
        got, chosen = ours.layer(layer)(hidden[0], return_routing=True)
        assert got.shape == expected.shape
        err = (got - expected).abs().max().item()
        assert err <= 1e-5, f"layer {layer}: max abs error {err}"
        got_ids = [set(int(x) for x in row if x >= 0) for row in chosen.topk_ids]
        assert got_ids == want_ids, f"layer {layer}: expert ids differ"


def test_dense_layers_are_not_moe_layers(tmp_path):
    model, _ = hf_models.build("deepseek_v3", first_k_dense_replace=2, num_hidden_layers=4)
    model.save_pretrained(tmp_path)
    ours = MoEModel.from_pretrained(tmp_path)
    assert ours.moe_layers == (2, 3)
    assert ours.spec.dense_layers == (0, 1)
    with pytest.raises(KeyError, match="layer 1 is not a MoE layer"):
        ours.layer(1)


def test_encoder_decoder_layers_are_numbered_encoder_first(tmp_path):
    model, _ = hf_models.build("nllb_moe", encoder_layers=2, decoder_layers=3, encoder_sparse_step=2, decoder_sparse_step=1)
    model.save_pretrained(tmp_path)
    ours = MoEModel.from_pretrained(tmp_path)
    assert ours.spec.num_layers == 5
    assert ours.moe_layers == (1, 2, 3, 4)


def test_capacity_drops_are_visible_in_routing(tmp_path):
    model, _ = hf_models.build("switch_transformers", expert_capacity=2)
    model.save_pretrained(tmp_path)
    ours = MoEModel.from_pretrained(tmp_path)
    layer = ours.moe_layers[0]
    hidden = torch.randn(40, ours.spec.layer.hidden_size)
    out, routing = ours.layer(layer)(hidden, return_routing=True)
    dropped = (routing.topk_ids[:, 0] < 0).nonzero().flatten()
    assert len(dropped) >= 40 - 2 * ours.spec.layer.num_experts
    # a dropped token gets nothing from the routed experts
    assert torch.all(out[dropped] == 0)


def test_moe_layers_follow_each_family_config(tmp_path):
    cases = {
        ("qwen3_moe", (("decoder_sparse_step", 2), ("num_hidden_layers", 4), ("mlp_only_layers", (3,)))): (1,),
        ("llama4_text", (("interleave_moe_layer_step", 2), ("num_hidden_layers", 4))): (1, 3),
        ("deepseek_v32", (("mlp_layer_types", ("sparse", "dense", "sparse")),)): (0, 2),
        ("glm4_moe", (("first_k_dense_replace", 2), ("num_hidden_layers", 4))): (2, 3),
    }
    for (family, over), want in cases.items():
        over = {k: list(v) if isinstance(v, tuple) else v for k, v in over}
        model, _ = hf_models.build(family, **over)
        path = tmp_path / family
        model.save_pretrained(path)
        spec = MoEModel.from_pretrained(path).spec
        assert spec.moe_layers == want, family
        assert set(spec.dense_layers) == set(range(spec.num_layers)) - set(want), family


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "dbrx", "nllb_moe", "gpt_oss", "llama4_text"])
def test_triton_layer_equals_torch_layer(family, tmp_path):
    """The Triton path (interpreted on CPU) computes the same layer as the torch path."""
    model, _ = hf_models.build(family)
    model.save_pretrained(tmp_path)
    torch_model = MoEModel.from_pretrained(tmp_path, backend="torch")
    triton_model = MoEModel.from_pretrained(tmp_path, backend="triton")
    layer = torch_model.moe_layers[-1]
    hidden = torch.randn(19, torch_model.spec.layer.hidden_size, generator=torch.Generator().manual_seed(3))
    a, ra = torch_model.layer(layer)(hidden, return_routing=True)
    b, rb = triton_model.layer(layer)(hidden, return_routing=True)
    assert torch.equal(ra.topk_ids.sort(-1).values, rb.topk_ids.sort(-1).values)
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama4_text", "gpt_oss", "qwen3_next"])
def test_worker_serves_the_family_as_the_layer_does(family, tmp_path):
    """The ExpertGroup worker (no Ray) returns each token's routed sum: with Llama 4's input weighting, gpt-oss's biases."""
    import numpy as np

    from moefleet.expert_workers.group import ExpertGroupCore
    from moefleet.kernels.permute import permute, row_weights

    model, _ = hf_models.build(family)
    model.save_pretrained(tmp_path)
    ours = MoEModel.from_pretrained(tmp_path, backend="torch")
    layer = ours.moe_layers[-1]
    lay = ours.layer(layer)
    e = lay.spec.num_experts
    worker = ExpertGroupCore("w", str(tmp_path), [(layer, x) for x in range(e)], backend="torch")
    hidden = torch.randn(21, lay.spec.hidden_size, generator=torch.Generator().manual_seed(2))
    out, routing = lay(hidden, return_routing=True)
    perm = permute(routing.topk_ids, e)
    rows = perm.token_index.numpy()
    counts = perm.counts().numpy()
    experts = [int(x) for x in np.flatnonzero(counts)]
    uniq, inverse = np.unique(rows, return_inverse=True)
    got = worker.forward(layer, hidden.numpy(), rows, row_weights(routing.topk_weights, perm).numpy(), experts,
                         [int(counts[x]) for x in experts], inverse, len(uniq))
    routed = out - (lay.shared(hidden) if lay.shared is not None else 0)
    assert (torch.from_numpy(got) - routed[torch.from_numpy(uniq)]).abs().max().item() <= 1e-5


class _InProcessClient:
    """``FleetClient.forward``'s interface over the in-process layers (the fleet's transport is tested in tests/integration)."""

    def __init__(self, model: MoEModel):
        self.model = model

    def forward(self, layer, hidden):
        return self.model.layer(layer)(hidden)


@pytest.mark.parametrize("family", ["llama4_text", "llama4", "gpt_oss", "glm4_moe"])
def test_attach_serves_blocks_that_return_tuples(family, tmp_path):
    """Llama 4 and gpt-oss blocks return (hidden, router output): the stand-in block keeps their signature."""
    import copy

    from moefleet.router_service.attach import attach

    model, _ = hf_models.build(family)
    model.save_pretrained(tmp_path)
    ids = torch.tensor([[5, 17, 42, 7, 3, 11]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        served = copy.deepcopy(model)
        layers = attach(served, _InProcessClient(MoEModel.from_pretrained(tmp_path, backend="torch")))
        got = served(input_ids=ids).logits
    spec = MoEModel.from_pretrained(tmp_path).spec
    assert layers == list(spec.moe_layers)
    fam = family_for(served.config.to_dict())
    assert all(type(served.get_submodule(fam.block_path(i, spec))).__name__ == "RemoteMoEBlock" for i in layers)
    assert (got - want).abs().max().item() <= 1e-4


def test_kimi_k2_is_read_as_deepseek_v3(tmp_path):
    """Kimi-K2 publishes DeepSeek-V3's architecture under model_type 'kimi_k2'."""
    import json

    model, block = hf_models.build("deepseek_v3", n_group=1, topk_group=1, first_k_dense_replace=1)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "kimi_k2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = MoEModel.from_pretrained(tmp_path)
    assert ours.spec.family == "deepseek_v3"
    hidden = torch.randn(1, 9, ours.spec.layer.hidden_size)
    forward, _ = block(1)
    with torch.no_grad():
        assert (ours.layer(1)(hidden[0]) - forward(hidden)[0]).abs().max().item() <= 1e-5
