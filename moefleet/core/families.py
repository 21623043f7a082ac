"""Model families: read a family's ``config.json`` into a ``ModelSpec`` and name its tensors.

Each family maps a Hugging Face ``model_type`` to (a) the MoE spec its
``transformers`` MoE block computes and (b) the checkpoint names of each MoE
layer's gate, routed experts and shared experts, in the naming that
``save_pretrained`` writes (e.g. Mixtral's
``model.layers.N.block_sparse_moe.experts.M.w1.weight``).

Layer indices: decoder-only models number their layers as ``transformers``
does. Encoder-decoder models (Switch, NLLB-MoE) number encoder layers first,
then decoder layers: decoder layer j is ``num_encoder_layers + j``.

Roles of expert tensors, in the canonical layout the kernels use:
``w1`` [F, H] (gate / fc1), ``w3`` [F, H] (up; gated experts only), ``w2``
[H, F] (down / fc2), ``b1`` [F] (gate / fc1 bias), ``b3`` [F] (up bias; gated
experts with biases), ``b2`` [H].

Checkpoints store experts one of two ways, and a ``TensorRef`` names either:
one tensor per expert (``experts.M.gate_proj.weight``), or all experts of a
layer fused in one ``[E, ...]`` tensor (Llama 4 and gpt-oss
``experts.gate_up_proj [E, H, 2F]``), of which a ref reads one expert's slice
(``expert``), a column range or stride (``cols``: gate and up halves, or gpt-oss's
interleaved gate/up columns) and transposes it into the canonical layout.
Quantized checkpoints (``core/quant.py``) are named the same way: the ref names
the float tensor, and the reader finds its ``*_scale_inv`` or ``*_blocks`` /
``*_scales`` beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import CheckpointError, UnknownFamilyError
from .config import CapacitySpec, MoELayerSpec, ModelSpec

_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


def activation(name: str, field: str) -> str:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise CheckpointError(f"config.json: {field}={name!r} is not a supported activation ({sorted(_ACTIVATIONS)})") from None


def _dtype(cfg: dict) -> str:
    d = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return d if d in ("float32", "bfloat16", "float16") else "float32"


def _need(cfg: dict, *keys: str | tuple[str, ...]):
    """The values of required fields; a tuple names alternative spellings (the first present wins)."""
    out = []
    for k in keys:
        names = k if isinstance(k, tuple) else (k,)
        found = [n for n in names if cfg.get(n) is not None]
        if not found:
            raise CheckpointError(f"config.json: field {' or '.join(repr(n) for n in names)} is missing")
        out.append(cfg[found[0]])
    return out


@dataclass(frozen=True)
class TensorRef:
    """A tensor in the checkpoint, or the part of it that one role reads.

    Applied in this order: ``expert`` picks one entry of dim 0 of a fused
    ``[E, ...]`` tensor (only those bytes are read), ``rows`` a row range
    ``[start, stop)`` of dim 0, ``cols`` a ``(start, stop, step)`` slice of the
    last dim, then ``transpose`` swaps the last two dims.
    """

    name: str
    rows: tuple[int, int] | None = None
    transpose: bool = False
    expert: int | None = None
    cols: tuple[int, int, int] | None = None


class Family:
    """Base class: subclasses set ``name``/``model_types`` and implement the naming."""

    name: str = ""
    model_types: tuple[str, ...] = ()

    def spec(self, cfg: dict) -> ModelSpec:
        raise NotImplementedError

    def gate(self, layer: int, spec: ModelSpec) -> dict[str, TensorRef]:
        """'weight' [E, H], optionally 'bias' [E] and 'correction_bias' [E]."""
        raise NotImplementedError

    def expert(self, layer: int, expert: int, spec: ModelSpec) -> dict[str, TensorRef]:
        raise NotImplementedError

    def shared(self, layer: int, spec: ModelSpec) -> dict[str, TensorRef]:
        """'w1', 'w3' [Fs, H], 'w2' [H, Fs], optionally 'gate' [1, H]; empty without shared experts."""
        return {}

    def block_path(self, layer: int, spec: ModelSpec) -> str:
        """Attribute path of the MoE block module in the ``transformers`` model (``*ForCausalLM`` etc.)."""
        return f"model.layers.{layer}.mlp"

    #: The ``transformers`` MoE block returns ``(hidden, router_output)`` rather than a tensor (Llama 4, gpt-oss).
    block_returns_tuple: bool = False


def _gated(prefix: str, gate: str, up: str, down: str) -> dict[str, TensorRef]:
    return {
        "w1": TensorRef(f"{prefix}.{gate}.weight"),
        "w3": TensorRef(f"{prefix}.{up}.weight"),
        "w2": TensorRef(f"{prefix}.{down}.weight"),
    }


class _Seq2Seq(Family):
    """Encoder-decoder families: MoE blocks named by a template per stack, router ``<block>.router.classifier``."""

    encoder_block = ""
    decoder_block = ""

    def _prefix(self, layer: int, spec: ModelSpec) -> str:
        n_enc = spec.num_encoder_layers
        if layer < n_enc:
            return self.encoder_block.format(i=layer)
        return self.decoder_block.format(i=layer - n_enc)

    def block_path(self, layer, spec):
        return self._prefix(layer, spec)

    def gate(self, layer, spec):
        p = self._prefix(layer, spec)
        refs = {"weight": TensorRef(f"{p}.router.classifier.weight")}
        if spec.layer_spec(layer).gate_bias:
            refs["bias"] = TensorRef(f"{p}.router.classifier.bias")
        return refs


class Mixtral(Family):
    name = "mixtral"
    model_types = ("mixtral",)

    def spec(self, cfg):
        h, f, e, k, n = _need(cfg, "hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok", "num_hidden_layers")
        layer = MoELayerSpec(
            hidden_size=h, intermediate_size=f, num_experts=e, top_k=k, scoring="softmax", norm_topk_prob=True,
            activation=activation(cfg.get("hidden_act", "silu"), "hidden_act"), gate_precision="input",
        )
        return ModelSpec(family=self.name, num_layers=n, moe_layers=tuple(range(n)), layer=layer, dtype=_dtype(cfg))

    def gate(self, layer, spec):
        return {"weight": TensorRef(f"model.layers.{layer}.block_sparse_moe.gate.weight")}

    def expert(self, layer, expert, spec):
        return _gated(f"model.layers.{layer}.block_sparse_moe.experts.{expert}", "w1", "w3", "w2")


class Qwen2Moe(Family):
    """Qwen2-MoE and the families that share its naming (Qwen3-MoE, Qwen3-Next, OLMoE).

    Softmax top-k, optional renormalisation, router logits in the model dtype;
    MoE layers where ``(i + 1) % decoder_sparse_step == 0`` and ``i`` is not in
    ``mlp_only_layers``; an optional shared expert with a sigmoid gate.
    """

    name = "qwen2_moe"
    model_types = ("qwen2_moe",)
    expert_size_key = "moe_intermediate_size"
    norm_topk_default = False
    sparse_steps = True  # decoder_sparse_step / mlp_only_layers apply

    def spec(self, cfg):
        h, f, e, k, n = _need(
            cfg, "hidden_size", self.expert_size_key, ("num_experts", "num_local_experts"), "num_experts_per_tok", "num_hidden_layers"
        )
        if self.sparse_steps:
            step = cfg.get("decoder_sparse_step", 1) or 1
            mlp_only = set(cfg.get("mlp_only_layers") or [])
            moe = tuple(i for i in range(n) if i not in mlp_only and e > 0 and (i + 1) % step == 0)
        else:
            moe = tuple(range(n))
        shared = cfg.get("shared_expert_intermediate_size") or 0
        layer = MoELayerSpec(
            hidden_size=h, intermediate_size=f, num_experts=e, top_k=k, scoring="softmax",
            norm_topk_prob=bool(cfg.get("norm_topk_prob", self.norm_topk_default)), gate_precision="input",
            activation=activation(cfg.get("hidden_act", "silu"), "hidden_act"),
            num_shared_experts=1 if shared else 0, shared_intermediate_size=shared, shared_expert_gate=bool(shared),
        )
        dense = tuple(i for i in range(n) if i not in moe)
        return ModelSpec(family=self.name, num_layers=n, moe_layers=moe, dense_layers=dense, layer=layer, dtype=_dtype(cfg))

    def gate(self, layer, spec):
        return {"weight": TensorRef(f"model.layers.{layer}.mlp.gate.weight")}

    def expert(self, layer, expert, spec):
        return _gated(f"model.layers.{layer}.mlp.experts.{expert}", "gate_proj", "up_proj", "down_proj")

    def shared(self, layer, spec):
        if not spec.layer_spec(layer).num_shared_experts:
            return {}
        refs = _gated(f"model.layers.{layer}.mlp.shared_expert", "gate_proj", "up_proj", "down_proj")
        refs["gate"] = TensorRef(f"model.layers.{layer}.mlp.shared_expert_gate.weight")
        return refs


class Qwen3Moe(Qwen2Moe):
    """Qwen3-MoE: Qwen2-MoE's block without the shared expert (``decoder_sparse_step``, ``mlp_only_layers``, ``norm_topk_prob``)."""

    name = "qwen3_moe"
    model_types = ("qwen3_moe",)


class Qwen3Next(Qwen2Moe):
    """Qwen3-Next: a shared expert with its sigmoid gate; renormalises by default."""

    name = "qwen3_next"
    model_types = ("qwen3_next",)
    norm_topk_default = True


class Olmoe(Qwen2Moe):
    """OLMoE: every layer MoE, experts ``intermediate_size`` wide, no shared expert."""

    name = "olmoe"
    model_types = ("olmoe",)
    expert_size_key = "intermediate_size"
    sparse_steps = False


class DeepseekV2(Family):
    name = "deepseek_v2"
    model_types = ("deepseek_v2",)

    def _routing(self, cfg) -> dict:
        method = cfg.get("topk_method", "greedy")
        if method == "greedy":
            return {"scoring": "softmax"}
        if method == "group_limited_greedy":
            g, tg = _need(cfg, "n_group", "topk_group")
            return {"scoring": "softmax", "n_group": g, "topk_group": tg, "group_score": "max"}
        raise CheckpointError(f"config.json: topk_method={method!r} is not supported by {self.name}")

    def spec(self, cfg):
        h, f, e, k, n = _need(cfg, "hidden_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "num_hidden_layers")
        first_dense = cfg.get("first_k_dense_replace", 0) or 0
        n_shared = cfg.get("n_shared_experts") or 0
        layer = MoELayerSpec(
            hidden_size=h, intermediate_size=f, num_experts=e, top_k=k,
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            activation=activation(cfg.get("hidden_act", "silu"), "hidden_act"),
            num_shared_experts=n_shared, shared_intermediate_size=f * n_shared,
            **self._routing(cfg),
        )
        return ModelSpec(
            family=self.name, num_layers=n, moe_layers=tuple(range(first_dense, n)),
            dense_layers=tuple(range(min(first_dense, n))), layer=layer, dtype=_dtype(cfg),
        )

    def gate(self, layer, spec):
        refs = {"weight": TensorRef(f"model.layers.{layer}.mlp.gate.weight")}
        if spec.layer_spec(layer).score_correction_bias:
            refs["correction_bias"] = TensorRef(f"model.layers.{layer}.mlp.gate.e_score_correction_bias")
        return refs

    def expert(self, layer, expert, spec):
        return _gated(f"model.layers.{layer}.mlp.experts.{expert}", "gate_proj", "up_proj", "down_proj")

    def shared(self, layer, spec):
        if not spec.layer_spec(layer).num_shared_experts:
            return {}
        return _gated(f"model.layers.{layer}.mlp.shared_experts", "gate_proj", "up_proj", "down_proj")


class DeepseekV3(DeepseekV2):
    """DeepSeek-V3 / R1; Kimi-K2 publishes the same architecture under ``model_type: kimi_k2``."""

    name = "deepseek_v3"
    model_types = ("deepseek_v3", "kimi_k2")

    def _routing(self, cfg) -> dict:
        g, tg = cfg.get("n_group", 1) or 1, cfg.get("topk_group", 1) or 1
        return {
            "scoring": "sigmoid", "score_correction_bias": True, "n_group": g, "topk_group": tg,
            "group_score": "top2_sum", "norm_topk_prob": bool(cfg.get("norm_topk_prob", True)), "norm_eps": 1e-20,
        }


class DeepseekV32(DeepseekV3):
    """DeepSeek-V3.2: DeepSeek-V3's MoE block; dense layers from ``mlp_layer_types`` when given."""

    name = "deepseek_v32"
    model_types = ("deepseek_v32",)

    def spec(self, cfg):
        spec = super().spec(cfg)
        types = cfg.get("mlp_layer_types")
        if not types:
            return spec
        if len(types) != spec.num_layers or set(types) - {"dense", "sparse"}:
            raise CheckpointError(
                f"config.json: mlp_layer_types must list 'dense' or 'sparse' for each of the {spec.num_layers} layers, got {types!r}"
            )
        moe = tuple(i for i, t in enumerate(types) if t == "sparse")
        dense = tuple(i for i, t in enumerate(types) if t == "dense")
        return ModelSpec(**{**spec.model_dump(), "moe_layers": moe, "dense_layers": dense})  # validated again


class Glm4Moe(DeepseekV3):
    """GLM-4.5 / 4.6 (``glm4_moe``): DeepSeek-V3's routing and naming (sigmoid, groups, correction bias,
    shared experts, ``first_k_dense_replace``)."""

    name = "glm4_moe"
    model_types = ("glm4_moe",)


class Llama4(Family):
    """Llama 4 text (``llama4_text``; ``llama4`` checkpoints with a ``text_config``, as Meta publishes them).

    Top-k over the router logits, each chosen expert's *input* scaled by
    ``sigmoid(logit)``, outputs summed unweighted; one shared expert as wide as
    a routed one; MoE layers from ``moe_layers`` (or every
    ``interleave_moe_layer_step``-th layer). Experts are fused per layer:
    ``experts.gate_up_proj [E, H, 2F]`` (gate columns first) and
    ``experts.down_proj [E, F, H]``.
    """

    name = "llama4_text"
    model_types = ("llama4_text",)
    block_returns_tuple = True

    def _text(self, cfg: dict) -> dict:
        if cfg.get("model_type") == "llama4":
            text = cfg.get("text_config")
            if not isinstance(text, dict):
                raise CheckpointError("config.json: model_type='llama4' needs a text_config")
            return text
        return cfg

    def spec(self, cfg):
        text = self._text(cfg)
        h, f, e, k, n = _need(text, "hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok", "num_hidden_layers")
        moe = text.get("moe_layers")
        if moe is None:
            step = text.get("interleave_moe_layer_step", 1) or 1
            moe = list(range(step - 1, n, step))
        layer = MoELayerSpec(
            hidden_size=h, intermediate_size=f, num_experts=e, top_k=k, scoring="sigmoid", gate_precision="input",
            routed_weight_on="input", activation=activation(text.get("hidden_act", "silu"), "hidden_act"),
            num_shared_experts=1, shared_intermediate_size=f,
        )
        moe = tuple(sorted(moe))
        return ModelSpec(
            family=self.name, num_layers=n, moe_layers=moe, dense_layers=tuple(i for i in range(n) if i not in moe),
            layer=layer, dtype=_dtype(text) if "torch_dtype" in text or "dtype" in text else _dtype(cfg),
        )

    _multimodal = False

    def _prefix(self, layer: int, spec: ModelSpec) -> str:
        return f"{'language_model.' if self._multimodal else ''}model.layers.{layer}.feed_forward"

    def gate(self, layer, spec):
        return {"weight": TensorRef(f"{self._prefix(layer, spec)}.router.weight")}

    def expert(self, layer, expert, spec):
        f = spec.layer_spec(layer).intermediate_size
        p = f"{self._prefix(layer, spec)}.experts"
        return {
            "w1": TensorRef(f"{p}.gate_up_proj", expert=expert, cols=(0, f, 1), transpose=True),
            "w3": TensorRef(f"{p}.gate_up_proj", expert=expert, cols=(f, 2 * f, 1), transpose=True),
            "w2": TensorRef(f"{p}.down_proj", expert=expert, transpose=True),
        }

    def shared(self, layer, spec):
        return _gated(f"{self._prefix(layer, spec)}.shared_expert", "gate_proj", "up_proj", "down_proj")

    def block_path(self, layer, spec):
        return f"{'language_model.model' if self._multimodal else 'model'}.layers.{layer}.feed_forward"


class GptOss(Family):
    """gpt-oss: router with a bias, softmax over the top-k logits, experts with biases and a clamped SwiGLU.

    Softmax over the K chosen logits equals the full softmax renormalised over
    the K chosen (``exp(l_i) / sum_K exp(l_j)``), which is how it is served.
    Experts are fused per layer: ``experts.gate_up_proj [E, H, 2F]`` with gate
    and up *interleaved* along the last dim (gate at even, up at odd columns),
    ``gate_up_proj_bias [E, 2F]`` likewise, ``down_proj [E, F, H]``,
    ``down_proj_bias [E, H]``; MXFP4 checkpoints store the two matrices as
    ``*_blocks`` / ``*_scales`` (``core/quant.py``).
    """

    name = "gpt_oss"
    model_types = ("gpt_oss",)
    block_returns_tuple = True

    def spec(self, cfg):
        h, f, e, k, n = _need(
            cfg, "hidden_size", "intermediate_size", "num_local_experts", ("num_experts_per_tok", "experts_per_token"), "num_hidden_layers"
        )
        layer = MoELayerSpec(
            hidden_size=h, intermediate_size=f, num_experts=e, top_k=k, scoring="softmax", norm_topk_prob=True,
            gate_bias=True, gate_precision="input", expert_bias=True, activation="clamped_swiglu",
            swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)), swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
        )
        return ModelSpec(family=self.name, num_layers=n, moe_layers=tuple(range(n)), layer=layer, dtype=_dtype(cfg))

    def gate(self, layer, spec):
        p = f"model.layers.{layer}.mlp.router"
        return {"weight": TensorRef(f"{p}.weight"), "bias": TensorRef(f"{p}.bias")}

    def expert(self, layer, expert, spec):
        f = spec.layer_spec(layer).intermediate_size
        p = f"model.layers.{layer}.mlp.experts"
        return {
            "w1": TensorRef(f"{p}.gate_up_proj", expert=expert, cols=(0, 2 * f, 2), transpose=True),
            "w3": TensorRef(f"{p}.gate_up_proj", expert=expert, cols=(1, 2 * f, 2), transpose=True),
            "w2": TensorRef(f"{p}.down_proj", expert=expert, transpose=True),
            "b1": TensorRef(f"{p}.gate_up_proj_bias", expert=expert, cols=(0, 2 * f, 2)),
            "b3": TensorRef(f"{p}.gate_up_proj_bias", expert=expert, cols=(1, 2 * f, 2)),
            "b2": TensorRef(f"{p}.down_proj_bias", expert=expert),
        }


class Dbrx(Family):
    name = "dbrx"
    model_types = ("dbrx",)

    def spec(self, cfg):
        h, n = _need(cfg, "d_model", "n_layers")
        ffn = cfg.get("ffn_config") or {}
        f, e, k = _need(ffn, "ffn_hidden_size", "moe_num_experts", "moe_top_k")
        p = ffn.get("moe_normalize_expert_weights", 1.0)
        act = (ffn.get("ffn_act_fn") or {"name": "silu"}).get("name", "silu")
        layer = MoELayerSpec(
            hidden_size=h, intermediate_size=f, num_experts=e, top_k=k, scoring="softmax",
            norm_topk_prob=p is not None, norm_topk_p=float(p or 1.0), gate_precision="input",
            activation=activation(act, "ffn_config.ffn_act_fn.name"),
        )
        return ModelSpec(family=self.name, num_layers=n, moe_layers=tuple(range(n)), layer=layer, dtype=_dtype(cfg))

    def gate(self, layer, spec):
        return {"weight": TensorRef(f"transformer.blocks.{layer}.ffn.router.layer.weight")}

    def block_path(self, layer, spec):
        return f"transformer.blocks.{layer}.ffn"

    def expert(self, layer, expert, spec):
        f = spec.layer_spec(layer).intermediate_size
        rows = (expert * f, (expert + 1) * f)
        p = f"transformer.blocks.{layer}.ffn.experts.mlp"
        return {
            "w1": TensorRef(f"{p}.w1", rows=rows),
            "w3": TensorRef(f"{p}.v1", rows=rows),
            "w2": TensorRef(f"{p}.w2", rows=rows, transpose=True),
        }


class SwitchTransformers(_Seq2Seq):
    name = "switch_transformers"
    model_types = ("switch_transformers",)

    def spec(self, cfg):
        h, f, e, cap, n_enc = _need(cfg, "d_model", "d_ff", "num_experts", "expert_capacity", "num_layers")
        n_dec = cfg.get("num_decoder_layers") or n_enc

        def sparse(n, step):
            return [i for i in range(n) if step > 0 and (i % step == 1 or step == 1)]

        moe = sparse(n_enc, cfg.get("encoder_sparse_step", 1)) + [n_enc + j for j in sparse(n_dec, cfg.get("decoder_sparse_step", 1))]
        layer = MoELayerSpec(
            hidden_size=h, intermediate_size=f, num_experts=e, top_k=1, scoring="softmax",
            gate_bias=bool(cfg.get("router_bias", False)), capacity=CapacitySpec(tokens=cap),
            expert_kind="mlp", activation=activation(cfg.get("dense_act_fn", "relu"), "dense_act_fn"),
        )
        n = n_enc + n_dec
        dense = tuple(i for i in range(n) if i not in moe)
        return ModelSpec(
            family=self.name, num_layers=n, moe_layers=tuple(moe), dense_layers=dense, layer=layer,
            num_encoder_layers=n_enc, dtype=_dtype(cfg),
        )

    encoder_block = "encoder.block.{i}.layer.1.mlp"
    decoder_block = "decoder.block.{i}.layer.2.mlp"

    def expert(self, layer, expert, spec):
        p = f"{self._prefix(layer, spec)}.experts.expert_{expert}"
        return {"w1": TensorRef(f"{p}.wi.weight"), "w2": TensorRef(f"{p}.wo.weight")}


class NllbMoe(_Seq2Seq):
    name = "nllb_moe"
    model_types = ("nllb-moe", "nllb_moe")

    def spec(self, cfg):
        h, e, n_enc, n_dec = _need(cfg, "d_model", "num_experts", "encoder_layers", "decoder_layers")
        f_enc, f_dec = _need(cfg, "encoder_ffn_dim", "decoder_ffn_dim")
        policy = cfg.get("second_expert_policy", "all")
        if policy != "all":
            raise CheckpointError(f"config.json: second_expert_policy={policy!r} is random routing; only 'all' is served")
        dropout = float(cfg.get("moe_token_dropout", 0.0) or 0.0)
        if not 0 <= dropout < 1:
            raise CheckpointError(f"config.json: moe_token_dropout={dropout} must be in [0, 1)")
        fraction = cfg.get("moe_eval_capacity_token_fraction", 1.0)
        capacity = CapacitySpec(
            token_fraction=fraction if fraction and fraction > 0 else None,
            tokens=None if fraction and fraction > 0 else cfg.get("expert_capacity"),
            priority="probability" if cfg.get("batch_prioritized_routing", False) else "sequence",
            renormalize_after_drop=not cfg.get("normalize_router_prob_before_dropping", False),
        )

        def sparse(n, step):
            return [i for i in range(n) if step > 0 and (i + 1) % step == 0]

        enc = sparse(n_enc, cfg.get("encoder_sparse_step", 4))
        dec = [n_enc + j for j in sparse(n_dec, cfg.get("decoder_sparse_step", 4))]

        def layer(f):
            return MoELayerSpec(
                hidden_size=h, intermediate_size=f, num_experts=e, top_k=2, scoring="softmax",
                gate_bias=bool(cfg.get("router_bias", False)), norm_topk_prob=True, capacity=capacity,
                routed_scaling_factor=1.0 - dropout, expert_kind="mlp", expert_bias=True,
                activation=activation(cfg.get("activation_function", "relu"), "activation_function"),
            )

        overrides = {i: layer(f_dec) for i in dec} if f_dec != f_enc and enc else {}
        base = layer(f_enc if enc else f_dec)
        n = n_enc + n_dec
        moe = tuple(enc + dec)
        return ModelSpec(
            family=self.name, num_layers=n, moe_layers=moe, dense_layers=tuple(i for i in range(n) if i not in moe),
            layer=base, layer_overrides=overrides, num_encoder_layers=n_enc, dtype=_dtype(cfg),
        )

    encoder_block = "model.encoder.layers.{i}.ffn"
    decoder_block = "model.decoder.layers.{i}.ffn"

    def expert(self, layer, expert, spec):
        p = f"{self._prefix(layer, spec)}.experts.expert_{expert}"
        return {
            "w1": TensorRef(f"{p}.fc1.weight"), "b1": TensorRef(f"{p}.fc1.bias"),
            "w2": TensorRef(f"{p}.fc2.weight"), "b2": TensorRef(f"{p}.fc2.bias"),
        }


class Llama4Multimodal(Llama4):
    """``llama4`` checkpoints (Llama-4-Scout/Maverick as published): the text model under ``language_model.``."""

    name = "llama4"
    model_types = ("llama4",)
    _multimodal = True


FAMILIES: tuple[Family, ...] = (
    Mixtral(), Qwen2Moe(), DeepseekV2(), DeepseekV3(), Dbrx(), SwitchTransformers(), NllbMoe(),
    Qwen3Moe(), Qwen3Next(), Olmoe(), Glm4Moe(), Llama4(), Llama4Multimodal(), GptOss(), DeepseekV32(),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def family_for(cfg: dict) -> Family:
    """The family of a ``config.json`` dict, by its ``model_type``."""
    model_type = cfg.get("model_type")
    if model_type not in _BY_TYPE:
        raise UnknownFamilyError(
            f"config.json: model_type={model_type!r} is not a supported MoE family (supported: {sorted(_BY_TYPE)})"
        )
    return _BY_TYPE[model_type]


__all__ = ["FAMILIES", "Family", "TensorRef", "family_for", "activation"]
