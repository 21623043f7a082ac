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
[H, F] (down / fc2), ``b1`` [F], ``b2`` [H].
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


def _need(cfg: dict, *keys: str):
    for k in keys:
        if k not in cfg or cfg[k] is None:
            raise CheckpointError(f"config.json: field {k!r} is missing")
    return [cfg[k] for k in keys]


@dataclass(frozen=True)
class TensorRef:
    """A tensor in the checkpoint: its name, optionally a row range of dim 0, optionally transposed."""

    name: str
    rows: tuple[int, int] | None = None
    transpose: bool = False


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
            activation=activation(cfg.get("hidden_act", "silu"), "hidden_act"),
        )
        return ModelSpec(family=self.name, num_layers=n, moe_layers=tuple(range(n)), layer=layer, dtype=_dtype(cfg))

    def gate(self, layer, spec):
        return {"weight": TensorRef(f"model.layers.{layer}.block_sparse_moe.gate.weight")}

    def expert(self, layer, expert, spec):
        return _gated(f"model.layers.{layer}.block_sparse_moe.experts.{expert}", "w1", "w3", "w2")


class Qwen2Moe(Family):
    name = "qwen2_moe"
    model_types = ("qwen2_moe",)

    def spec(self, cfg):
        h, f, e, k, n = _need(cfg, "hidden_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "num_hidden_layers")
        step = cfg.get("decoder_sparse_step", 1) or 1
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        moe = tuple(i for i in range(n) if i not in mlp_only and e > 0 and (i + 1) % step == 0)
        shared = cfg.get("shared_expert_intermediate_size") or 0
        layer = MoELayerSpec(
            hidden_size=h, intermediate_size=f, num_experts=e, top_k=k, scoring="softmax",
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
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
    name = "deepseek_v3"
    model_types = ("deepseek_v3",)

    def _routing(self, cfg) -> dict:
        g, tg = cfg.get("n_group", 1) or 1, cfg.get("topk_group", 1) or 1
        return {
            "scoring": "sigmoid", "score_correction_bias": True, "n_group": g, "topk_group": tg,
            "group_score": "top2_sum", "norm_topk_prob": bool(cfg.get("norm_topk_prob", True)), "norm_eps": 1e-20,
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
            norm_topk_prob=p is not None, norm_topk_p=float(p or 1.0),
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


FAMILIES: tuple[Family, ...] = (Mixtral(), Qwen2Moe(), DeepseekV2(), DeepseekV3(), Dbrx(), SwitchTransformers(), NllbMoe())
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
