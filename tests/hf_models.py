"""Tiny random ``transformers`` models per family, built from their config classes (nothing downloaded).

Each builder returns the model and a function ``block(layer) -> (forward, routing)``:
``forward(hidden[1, T, H]) -> [1, T, H]`` is the family's own MoE block, and
``routing(hidden[T, H]) -> list of sets`` the expert ids its router chose per token.
"""

from __future__ import annotations

import torch
import transformers as T


def _sets(ids: torch.Tensor) -> list[set[int]]:
    return [set(int(x) for x in row if x >= 0) for row in ids]


def _topk_router(router):
    def routing(h):
        _, _, idx = router(h)
        return _sets(idx)

    return routing


def mixtral(**over):
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2)
    cfg.update(over)
    model = T.MixtralForCausalLM(T.MixtralConfig(**cfg))

    def block(i):
        mlp = model.model.layers[i].mlp
        return mlp, _topk_router(mlp.gate)

    return model, block


def qwen2_moe(**over):
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
               shared_expert_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[0])
    cfg.update(over)
    model = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**cfg))

    def block(i):
        mlp = model.model.layers[i].mlp
        return mlp, _topk_router(mlp.gate)

    return model, block


def deepseek_v2(**over):
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3,
               n_shared_experts=2, first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
               routed_scaling_factor=1.5, kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=8,
               qk_nope_head_dim=8)
    cfg.update(over)
    model = T.DeepseekV2ForCausalLM(T.DeepseekV2Config(**cfg))

    def block(i):
        mlp = model.model.layers[i].mlp
        return mlp, _topk_router(mlp.gate)

    return model, block


def deepseek_v3(**over):
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4,
               n_shared_experts=2, first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
               kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8)
    cfg.update(over)
    model = T.DeepseekV3ForCausalLM(T.DeepseekV3Config(**cfg))
    with torch.no_grad():  # a non-zero correction bias, so choosing and weighting differ
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)

    def block(i):
        mlp = model.model.layers[i].mlp
        return mlp, _topk_router(mlp.gate)

    return model, block


def dbrx(**over):
    ffn = dict(ffn_hidden_size=16, moe_num_experts=6, moe_top_k=3)
    ffn.update(over.pop("ffn_config", {}))
    cfg = dict(vocab_size=97, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
               attn_config={"kv_n_heads": 2, "rope_theta": 10000.0}, ffn_config=ffn)
    cfg.update(over)
    model = T.DbrxForCausalLM(T.DbrxConfig(**cfg))

    def block(i):
        ffn_mod = model.transformer.blocks[i].ffn

        def routing(h):
            _, idx = ffn_mod.route_tokens_to_experts(ffn_mod.router(h))
            return _sets(idx)

        return ffn_mod, routing

    return model, block


def switch(**over):
    cfg = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=16, num_layers=2, num_decoder_layers=2, num_heads=4,
               num_experts=4, expert_capacity=3, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1)
    cfg.update(over)
    config = T.SwitchTransformersConfig(**cfg)
    model = T.SwitchTransformersForConditionalGeneration(config)
    n_enc = config.num_layers

    def block(i):
        mlp = (model.encoder.block[i].layer[1] if i < n_enc else model.decoder.block[i - n_enc].layer[2]).mlp

        def routing(h):
            mask, _, _ = mlp.router(h[None])
            mask = mask[0]
            return [set(int(e) for e in torch.nonzero(row).flatten()) for row in mask]

        return mlp, routing

    return model, block


def nllb_moe(**over):
    cfg = dict(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=16, decoder_ffn_dim=16, num_experts=4,
               encoder_sparse_step=1, decoder_sparse_step=2, expert_capacity=4)
    cfg.update(over)
    config = T.NllbMoeConfig(**cfg)
    model = T.NllbMoeForConditionalGeneration(config)
    n_enc = config.encoder_layers

    def block(i):
        ffn = (model.model.encoder.layers[i] if i < n_enc else model.model.decoder.layers[i - n_enc]).ffn

        def forward(hidden):
            return nllb_reference(ffn, hidden)

        def routing(h):
            _, probs, _ = ffn.router(h)
            return [set(int(e) for e in torch.nonzero(row > 0).flatten()) for row in probs]

        return forward, routing

    return model, block


def nllb_reference(ffn, hidden: torch.Tensor) -> torch.Tensor:
    """NLLB-MoE's sparse MLP, composed from transformers' own router and expert modules.

    transformers 5.x ``NllbMoeExperts.forward`` one-hot encodes the router's
    top-1 mask, which is already one-hot, so it runs experts 0 and 1 whatever
    the router chose. This composes the same modules with the semantics of the
    fairseq model and of transformers 4.x: every token goes to each expert its
    router kept, weighted by the router's (renormalised) probability, scaled by
    ``1 - moe_token_dropout`` in eval.
    """
    b, s, h = hidden.shape
    x = hidden.reshape(-1, h)
    _, probs, _ = ffn.router(x)
    out = torch.zeros_like(x)
    for e in range(ffn.experts.num_experts):
        expert = ffn.experts[f"expert_{e}"]
        rows = torch.nonzero(probs[:, e] > 0).flatten()
        if rows.numel() == 0:
            continue
        y = expert(x[rows]) * probs[rows, e, None]
        if ffn.experts.moe_token_dropout > 0:
            y = y * (1 - ffn.experts.moe_token_dropout)
        out.index_add_(0, rows, y)
    return out.reshape(b, s, h)


def _randomize(model, names: tuple[str, ...], std: float) -> None:
    """Give parameters whose name ends with one of ``names`` random values (biases and correction biases init to zero)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(names):
                p.normal_(0, std)
        for name, b in model.named_buffers():
            if name.endswith(names):
                b.normal_(0, std)


# The families below are built with initializer_range 0.2, so that their MoE
# outputs are of order 1 and an absolute error bound of 1e-5 means what it says.
_INIT = 0.2


def qwen3_moe(**over):
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=3,
               norm_topk_prob=False, mlp_only_layers=[0], initializer_range=_INIT)
    cfg.update(over)
    model = T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**cfg))

    def block(i):
        mlp = model.model.layers[i].mlp
        return mlp, _topk_router(mlp.gate)

    return model, block


def qwen3_next(**over):
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
               shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=8, num_experts=8, num_experts_per_tok=2, initializer_range=_INIT)
    cfg.update(over)
    cfg.setdefault("layer_types", ["full_attention"] * cfg["num_hidden_layers"])
    model = T.Qwen3NextForCausalLM(T.Qwen3NextConfig(**cfg))

    def block(i):
        mlp = model.model.layers[i].mlp
        return mlp, _topk_router(mlp.gate)

    return model, block


def olmoe(**over):
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, initializer_range=_INIT)
    cfg.update(over)
    model = T.OlmoeForCausalLM(T.OlmoeConfig(**cfg))

    def block(i):
        mlp = model.model.layers[i].mlp
        return mlp, _topk_router(mlp.gate)

    return model, block


def glm4_moe(**over):
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=16, num_experts_per_tok=4,
               n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
               initializer_range=_INIT)
    cfg.update(over)
    model = T.Glm4MoeForCausalLM(T.Glm4MoeConfig(**cfg))
    _randomize(model, ("e_score_correction_bias",), 0.05)

    def block(i):
        mlp = model.model.layers[i].mlp
        return mlp, _topk_router(mlp.gate)

    return model, block


def _llama4_block(layers):
    def block(i):
        ff = layers[i].feed_forward

        def forward(hidden):
            return ff(hidden)[0].reshape(hidden.shape)

        def routing(h):
            return _sets(torch.topk(ff.router(h)[1], ff.top_k, dim=-1).indices)

        return forward, routing

    return block


def _llama4_text_cfg(over):
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=16, intermediate_size_mlp=40, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
               initializer_range=_INIT)
    cfg.update(over)
    return cfg


def llama4_text(**over):
    model = T.Llama4ForCausalLM(T.Llama4TextConfig(**_llama4_text_cfg(over)))
    return model, _llama4_block(model.model.layers)


def llama4(**over):
    """Llama 4 as Meta publishes it: ``Llama4ForConditionalGeneration`` (text under ``language_model``)."""
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=16, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    model = T.Llama4ForConditionalGeneration(T.Llama4Config(text_config=_llama4_text_cfg(over), vision_config=vision))
    return model, _llama4_block(model.language_model.model.layers)


def gpt_oss(**over):
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, initializer_range=_INIT)
    cfg.update(over)
    model = T.GptOssForCausalLM(T.GptOssConfig(**cfg))
    _randomize(model, ("router.bias", "gate_up_proj_bias", "down_proj_bias"), _INIT)

    def block(i):
        mlp = model.model.layers[i].mlp

        def forward(hidden):
            return mlp(hidden)[0]

        return forward, _topk_router(mlp.router)

    return model, block


def deepseek_v32(**over):
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4,
               n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
               kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
               index_n_heads=2, index_head_dim=16, index_topk=8, initializer_range=_INIT)
    cfg.update(over)
    model = T.DeepseekV32ForCausalLM(T.DeepseekV32Config(**cfg))
    _randomize(model, ("e_score_correction_bias",), 0.05)

    def block(i):
        mlp = model.model.layers[i].mlp
        return mlp, _topk_router(mlp.gate)

    return model, block


BUILDERS = {
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "deepseek_v2": deepseek_v2,
    "deepseek_v3": deepseek_v3,
    "dbrx": dbrx,
    "switch_transformers": switch,
    "nllb_moe": nllb_moe,
    "qwen3_moe": qwen3_moe,
    "qwen3_next": qwen3_next,
    "olmoe": olmoe,
    "glm4_moe": glm4_moe,
    "llama4_text": llama4_text,
    "llama4": llama4,
    "gpt_oss": gpt_oss,
    "deepseek_v32": deepseek_v32,
}


def build(family: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    model, block = BUILDERS[family](**over)
    return model.eval(), block
