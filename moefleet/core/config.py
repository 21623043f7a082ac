"""Configuration models for MoE layers and models.

One pydantic model per concept; every field is documented, and validation
errors name the field at fault. Shapes use the project's dimension names:
T tokens, H hidden, F expert intermediate, E routed experts, K top-k.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .emulation import EMULATED_MODELS, parse_emulate

Scoring = Literal["softmax", "sigmoid"]
Activation = Literal["silu", "gelu", "gelu_tanh", "relu", "clamped_swiglu"]
ExpertKind = Literal["gated", "mlp"]
GroupScore = Literal["max", "top2_sum"]
Priority = Literal["sequence", "probability"]
GatePrecision = Literal["float32", "input"]
WeightOn = Literal["output", "input"]
QuantMethod = Literal["fp8", "mxfp4"]


class CapacitySpec(BaseModel):
    """Per-expert capacity for top-1 / top-2 capacity routing (Switch, GShard).

    Assignments are queued per expert: all first choices before any second
    choice, and within one choice in ``priority`` order. An assignment whose
    position in its expert's queue is ``>= capacity`` overflows and is dropped:
    it contributes zero to the token's output. Exactly one of ``tokens``,
    ``token_fraction`` and ``factor`` sets the capacity of a call with T tokens.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens: int | None = Field(default=None, ge=0, description="Fixed capacity in tokens per expert per call (Switch's expert_capacity).")
    token_fraction: float | None = Field(
        default=None, gt=0, description="capacity = ceil(token_fraction * T) (NLLB-MoE's moe_eval_capacity_token_fraction)."
    )
    factor: float | None = Field(default=None, gt=0, description="capacity = ceil(factor * T * K / E) (GShard capacity factor).")
    priority: Priority = Field(
        default="sequence",
        description="Queue order within one choice: token order ('sequence') or highest top-1 probability first ('probability').",
    )
    renormalize_after_drop: bool = Field(
        default=False,
        description="Renormalise the kept top-k weights after dropping overflowed assignments (NLLB-MoE); otherwise before.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "CapacitySpec":
        set_fields = [n for n in ("tokens", "token_fraction", "factor") if getattr(self, n) is not None]
        if len(set_fields) != 1:
            raise ValueError(f"capacity: set exactly one of tokens, token_fraction, factor (got {set_fields or 'none'})")
        return self

    def capacity(self, num_tokens: int, top_k: int, num_experts: int) -> int:
        import math

        if self.tokens is not None:
            return self.tokens
        if self.token_fraction is not None:
            return math.ceil(self.token_fraction * num_tokens)
        assert self.factor is not None
        return math.ceil(self.factor * num_tokens * top_k / num_experts)


class MoELayerSpec(BaseModel):
    """Everything that defines the computation of one MoE block.

    ``output = sum_k w[t,k] * expert_{id[t,k]}(x[t]) + shared(x[t])`` where ids and
    weights come from the router described by the routing fields.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_size: int = Field(gt=0, description="H: width of the hidden states.")
    intermediate_size: int = Field(gt=0, description="F: intermediate width of one routed expert.")
    num_experts: int = Field(gt=0, description="E: number of routed experts.")
    top_k: int = Field(gt=0, description="K: experts chosen per token.")

    # Router.
    scoring: Scoring = Field(default="softmax", description="Router score function over the E logits.")
    gate_precision: GatePrecision = Field(
        default="float32",
        description="Dtype of the router logits: 'float32' (hidden and gate weight upcast, DeepSeek, GLM) or 'input' (the "
        "compute dtype, then upcast for scoring: Mixtral, Qwen, OLMoE, Llama 4, gpt-oss).",
    )
    gate_bias: bool = Field(default=False, description="The router's linear layer has a bias (Switch/NLLB router_bias).")
    score_correction_bias: bool = Field(
        default=False,
        description="Add a per-expert bias to the scores when choosing experts, not to the weights (DeepSeek-V3 e_score_correction_bias).",
    )
    norm_topk_prob: bool = Field(default=False, description="Renormalise the K chosen weights to unit p-norm.")
    norm_topk_p: float = Field(default=1.0, gt=0, description="The p of that norm (DBRX moe_normalize_expert_weights); 1 is a plain sum.")
    norm_eps: float = Field(default=0.0, ge=0, description="Added to the norm before dividing (DeepSeek-V3 uses 1e-20).")
    n_group: int = Field(default=1, gt=0, description="Expert groups for group-limited routing (DeepSeek).")
    topk_group: int = Field(default=1, gt=0, description="Groups a token may route into.")
    group_score: GroupScore = Field(
        default="max", description="How a group is scored: its best expert ('max', DeepSeek-V2) or sum of its best two ('top2_sum', DeepSeek-V3)."
    )
    routed_scaling_factor: float = Field(default=1.0, gt=0, description="Multiplies the routed weights after normalisation.")
    routed_weight_on: WeightOn = Field(
        default="output",
        description="Where a routed weight applies: to the expert's output ('output') or to its input, outputs summed "
        "unweighted ('input', Llama 4).",
    )
    capacity: CapacitySpec | None = Field(default=None, description="Capacity routing (Switch top-1, GShard top-2); None for dropless.")

    # Experts.
    expert_kind: ExpertKind = Field(
        default="gated", description="'gated': down(act(gate(x)) * up(x)); 'mlp': fc2(act(fc1(x)+b1))+b2."
    )
    activation: Activation = Field(
        default="silu",
        description="Expert activation function; 'clamped_swiglu' (gated only, gpt-oss) is "
        "(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit).",
    )
    swiglu_alpha: float = Field(default=1.702, gt=0, description="alpha of 'clamped_swiglu' (gpt-oss swiglu_alpha).")
    swiglu_limit: float = Field(default=7.0, gt=0, description="limit of 'clamped_swiglu' (gpt-oss swiglu_limit).")
    expert_bias: bool = Field(
        default=False, description="Experts' linear layers have biases (NLLB-MoE fc1/fc2; gpt-oss gate_up/down)."
    )

    # Shared experts.
    num_shared_experts: int = Field(default=0, ge=0, description="Shared experts applied to every token.")
    shared_intermediate_size: int = Field(
        default=0, ge=0, description="Intermediate width of the shared experts together (they are one gated MLP)."
    )
    shared_expert_gate: bool = Field(
        default=False, description="Scale the shared output by sigmoid(x . w) (Qwen2-MoE shared_expert_gate)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> "MoELayerSpec":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: {self.top_k} exceeds num_experts {self.num_experts}")
        if self.num_experts % self.n_group:
            raise ValueError(f"n_group: {self.n_group} does not divide num_experts {self.num_experts}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group: {self.topk_group} exceeds n_group {self.n_group}")
        if self.n_group > 1 and self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(f"top_k: {self.top_k} exceeds the experts in topk_group={self.topk_group} groups")
        if self.group_score == "top2_sum" and self.n_group > 1 and self.num_experts // self.n_group < 2:
            raise ValueError("group_score: 'top2_sum' needs at least 2 experts per group")
        if self.num_shared_experts and not self.shared_intermediate_size:
            raise ValueError("shared_intermediate_size: must be > 0 when num_shared_experts > 0")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("shared_expert_gate: set without shared experts")
        if self.activation == "clamped_swiglu" and self.expert_kind != "gated":
            raise ValueError("activation: 'clamped_swiglu' needs expert_kind='gated'")
        if self.routed_weight_on == "input" and self.capacity is not None:
            raise ValueError("routed_weight_on: 'input' is not served with capacity routing")
        if self.capacity is not None and self.top_k > 2:
            raise ValueError(f"capacity: capacity routing supports top_k 1 or 2, got {self.top_k}")
        return self

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        return self.expert_matrix_params + self.expert_bias_params

    @property
    def expert_matrix_params(self) -> int:
        """Parameters of one routed expert's weight matrices (what a quantized checkpoint packs)."""
        return (3 if self.expert_kind == "gated" else 2) * self.hidden_size * self.intermediate_size

    @property
    def expert_bias_params(self) -> int:
        """Parameters of one routed expert's biases (kept unquantized)."""
        if not self.expert_bias:
            return 0
        return (2 if self.expert_kind == "gated" else 1) * self.intermediate_size + self.hidden_size


class QuantSpec(BaseModel):
    """How a checkpoint's expert weights are quantized (its ``config.json`` ``quantization_config``).

    - ``fp8``: float8 e4m3 weights with fp32 block scales ``*.weight_scale_inv`` of shape
      ``[ceil(out / block_out), ceil(in / block_in)]`` (DeepSeek-V3/R1, Kimi-K2, Qwen3 FP8 releases);
      ``w = w_fp8 * scale_inv`` per block. Tensors without a ``*_scale_inv`` beside them (the router)
      are stored unquantized.
    - ``mxfp4``: OCP MX fp4 (e2m1) values, two per byte (low nibble first), in blocks of 32 along the
      input dim with one e8m0 exponent byte each (gpt-oss ``*_blocks [.., out, in / 32, 16]`` and
      ``*_scales [.., out, in / 32]``); ``w = fp4 * 2 ** (scale - 127)``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: QuantMethod = Field(description="quantization_config.quant_method.")
    weight_block_size: tuple[int, int] | None = Field(
        default=None, description="fp8: (block_out, block_in) of one weight scale; None for one scale per tensor."
    )
    activation_scheme: Literal["dynamic"] = Field(
        default="dynamic", description="fp8: activations are scaled per token group at run time ('dynamic')."
    )

    @property
    def label(self) -> str:
        if self.method == "fp8":
            block = "per-tensor" if self.weight_block_size is None else "x".join(map(str, self.weight_block_size)) + " blocks"
            return f"fp8 e4m3, {block}"
        return "mxfp4 (e2m1, 32-wide e8m0 blocks)"


class ModelSpec(BaseModel):
    """A model as MoE Fleet sees it: which layers are MoE, and their spec."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str = Field(description="Model family name in the registry (e.g. 'mixtral').")
    num_layers: int = Field(gt=0, description="All layers of the model, dense and MoE (encoder then decoder for seq2seq).")
    moe_layers: tuple[int, ...] = Field(description="Indices of the MoE layers, ascending.")
    dense_layers: tuple[int, ...] = Field(default=(), description="Indices of layers with a dense MLP.")
    layer: MoELayerSpec = Field(description="The spec of every MoE layer not in layer_overrides.")
    layer_overrides: dict[int, MoELayerSpec] = Field(
        default_factory=dict, description="Per-layer specs where layers differ (e.g. NLLB-MoE decoder FFN width)."
    )
    num_encoder_layers: int = Field(
        default=0, ge=0, description="Encoder layers of an encoder-decoder model (numbered first); 0 for decoder-only."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Checkpoint weight dtype.")
    quantization: QuantSpec | None = Field(
        default=None, description="How the experts are stored quantized; None for plain float weights."
    )

    @model_validator(mode="after")
    def _layers(self) -> "ModelSpec":
        if not self.moe_layers:
            raise ValueError("moe_layers: the model has no MoE layer")
        if list(self.moe_layers) != sorted(set(self.moe_layers)):
            raise ValueError(f"moe_layers: must be ascending and unique, got {list(self.moe_layers)}")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"moe_layers: {bad} outside 0..{self.num_layers - 1}")
        if set(self.moe_layers) & set(self.dense_layers):
            raise ValueError("dense_layers: overlaps moe_layers")
        extra = sorted(set(self.layer_overrides) - set(self.moe_layers))
        if extra:
            raise ValueError(f"layer_overrides: {extra} are not MoE layers")
        return self

    def layer_spec(self, layer: int) -> MoELayerSpec:
        """The spec of MoE layer ``layer``; raises KeyError naming the layer if it is not one."""
        if layer not in self.moe_layers:
            raise KeyError(f"layer {layer} is not a MoE layer (MoE layers: {list(self.moe_layers)})")
        return self.layer_overrides.get(layer, self.layer)


class RouterConfig(BaseModel):
    """The router service: where it listens, how it batches, what it refuses."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(default="127.0.0.1", description="Address the gRPC server binds; loopback unless a cluster needs more.")
    port: int = Field(default=0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    batch_window_ms: float = Field(
        default=2.0, ge=0, description="Concurrent requests for one layer arriving within this window are served as one batch (0: off)."
    )
    dispatch_when_idle: bool = Field(
        default=True,
        description="A request for a layer with nothing waiting or running is dispatched at once; the window batches only what arrives while the layer is busy.",
    )
    max_batch_tokens: int = Field(default=8192, gt=0, description="Most tokens in one micro-batch.")
    max_request_tokens: int = Field(default=65536, gt=0, description="Most tokens in one request (more is RESOURCE_EXHAUSTED).")
    max_message_bytes: int = Field(default=256 << 20, gt=0, description="Largest gRPC message accepted or sent.")
    max_queued_requests: int = Field(default=512, gt=0, description="Requests waiting or in flight before new ones get RESOURCE_EXHAUSTED.")
    max_inflight_tokens: int = Field(
        default=262144, gt=0, description="Tokens of admitted, unanswered requests; a request that would pass it gets RESOURCE_EXHAUSTED."
    )
    max_inflight_bytes: int = Field(
        default=1 << 30, gt=0,
        description="Bytes of admitted, unanswered request messages; a request that would pass it gets RESOURCE_EXHAUSTED.",
    )
    max_concurrent_rpcs: int = Field(
        default=1024, gt=0,
        description="RPCs the gRPC server runs at once (a stream counts once); past it gRPC answers RESOURCE_EXHAUSTED "
        "before reading the message. Bounds the memory of requests received but not yet admitted.",
    )
    stream_window: int = Field(
        default=32, gt=0,
        description="Items of one ForwardStream served or waiting to be sent at once; the stream reads no further request "
        "until one is sent (back-pressure through HTTP/2 flow control).",
    )
    nonfinite: Literal["reject", "allow"] = Field(
        default="reject", description="Hidden states with NaN/Inf: 'reject' (INVALID_ARGUMENT) or 'allow' (computed as given)."
    )
    telemetry_interval_s: float = Field(default=1.0, gt=0, description="How often token counts per expert are flushed to Redis.")
    load_window_s: float = Field(default=1.0, gt=0, description="Width of one load window in Redis.")
    worker_retries: int = Field(default=2, ge=0, description="Re-dispatches of a layer call after a worker fails or holds a stale placement.")
    compiled_graphs: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Carry layer calls on a Ray Compiled Graph over the workers on the router's node: 'auto' over workers "
        "that compute on GPUs (a graph's channel reader keeps a core of each of its workers busy, which a CPU worker "
        "needs for its experts), 'on' over every worker of the node, 'off' plain actor calls only.",
    )
    metrics_port: int | None = Field(
        default=0, ge=0, le=65535, description="Prometheus endpoint on host:metrics_port (0: a free port; None: off)."
    )
    tls_cert: str | None = Field(default=None, description="PEM certificate chain of the gRPC port; with tls_key, the port speaks TLS.")
    tls_key: str | None = Field(default=None, description="PEM private key of tls_cert.")
    tls_client_ca: str | None = Field(
        default=None, description="PEM CA bundle: clients must present a certificate it signed (mutual TLS)."
    )
    auth_token_file: str | None = Field(
        default=None,
        description="File holding the bearer token every RPC but health checks must carry; default $MOEFLEET_AUTH_TOKEN.",
    )
    require_auth: bool | None = Field(
        default=None,
        description="Refuse to start without a token. None: required unless host is a loopback address (local mode).",
    )

    @model_validator(mode="after")
    def _limits_and_tls(self) -> "RouterConfig":
        if self.max_request_tokens > self.max_inflight_tokens:
            raise ValueError(
                f"max_request_tokens: {self.max_request_tokens} exceeds max_inflight_tokens {self.max_inflight_tokens}"
            )
        if self.max_message_bytes > self.max_inflight_bytes:
            raise ValueError(f"max_message_bytes: {self.max_message_bytes} exceeds max_inflight_bytes {self.max_inflight_bytes}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert: tls_cert and tls_key are set together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca: mutual TLS needs tls_cert and tls_key")
        return self


class WorkerConfig(BaseModel):
    """Resources and compute settings of one ExpertGroup worker."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_cpus: float = Field(default=1.0, ge=0, description="CPUs Ray reserves for the worker (also its torch threads, at least 1).")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs Ray reserves; 1 on a GPU node.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources the worker needs (node type).")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(default=None, description="Compute dtype; default the checkpoint's.")
    backend: Literal["auto", "torch", "triton"] = Field(default="auto", description="Expert kernels: Triton on CUDA, torch on CPU.")
    max_concurrency: int = Field(default=8, gt=0, description="Calls the actor runs at once (forwards, loads, stats).")


class FleetConfig(BaseModel):
    """A whole fleet: model, workers, router, shared state."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint: str | None = Field(default=None, description="Checkpoint directory; None for the built-in default model.")
    num_workers: int = Field(default=2, gt=0, description="ExpertGroup workers to start.")
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    num_routers: int = Field(default=1, gt=0, description="Router replicas (each its own gRPC port).")
    redis_url: str | None = Field(default=None, description="Redis URL; None starts a local redis-server on loopback.")
    namespace: str = Field(default="moefleet", description="Ray namespace and Redis key prefix of this fleet.")
    static: bool = Field(
        default=False, description="No controller: the starting placement stays, and a dead worker is not repaired."
    )
    min_replicas: int | Literal["auto"] = Field(
        default="auto",
        description="Replicas every expert keeps when memory allows (2: a worker's death loses no request); 'auto': 2 "
        "where the devices' memory holds two copies of every expert beside the planner's headroom, else 1.",
    )

    @field_validator("min_replicas")
    @classmethod
    def _min_replicas(cls, v):
        if v != "auto" and int(v) < 1:
            raise ValueError(f"min_replicas: must be 'auto' or an integer >= 1, got {v!r}")
        return v
    emulate: str | None = Field(
        default=None,
        description="Emulated devices instead of num_workers local ones, e.g. 'h100:16,l4:16' (TYPE:COUNT of the "
        "simulator's device catalogue): each a real worker computing on this machine's CPU, owning no cores, that "
        "takes the modelled device's time per call (times emulate_slowdown) and has its memory.",
    )
    emulate_slowdown: float = Field(
        default=1.0, gt=0, le=1e6,
        description="Emulated devices take this many times their modelled device time (time dilation: large enough "
        "that modelled time dominates this machine's overheads; figures then read in device time divided by it).",
    )
    emulate_model: str | None = Field(
        default=None,
        description="Expert shape emulated devices are timed and sized for: None, the checkpoint's own; or a public "
        f"model's ({', '.join(EMULATED_MODELS)}), so a tiny checkpoint runs with a real model's device times and memory.",
    )

    @field_validator("emulate")
    @classmethod
    def _emulate(cls, v):
        if v is not None:
            parse_emulate(v, "emulate")
        return v

    @field_validator("emulate_model")
    @classmethod
    def _emulate_model(cls, v):
        if v is not None and v not in EMULATED_MODELS:
            raise ValueError(f"emulate_model: unknown model {v!r} (known: {', '.join(EMULATED_MODELS)})")
        return v

    pin_cores: bool = Field(
        default=True,
        description="Local mode on a CPU machine: each worker owns a disjoint set of cores (affinity and torch threads).",
    )
    controller: dict = Field(
        default_factory=dict, description="Overrides of the local controller's settings (ControllerConfig fields)."
    )
    start_timeout_s: float = Field(default=120.0, gt=0, description="Longest wait for the workers to start.")
    http_port: int | None = Field(
        default_factory=lambda: default_http_port(),
        ge=0, le=65535,
        description="Local mode: port of the fleet's telemetry endpoint on 127.0.0.1 (/metrics, the dashboard, /api/state); "
        "default 8470 or $MOEFLEET_HTTP_PORT; 0 picks a free port; None serves none.",
    )
    telemetry: dict = Field(
        default_factory=dict, description="Overrides of the telemetry endpoint's settings (TelemetryConfig fields)."
    )


DEFAULT_HTTP_PORT = 8470
"""Port of a local fleet's telemetry endpoint unless configured otherwise."""


def default_http_port() -> int:
    """``$MOEFLEET_HTTP_PORT`` when set (e.g. 0 in test suites, so parallel fleets never collide), else 8470."""
    raw = os.environ.get("MOEFLEET_HTTP_PORT", "")
    if not raw:
        return DEFAULT_HTTP_PORT
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"MOEFLEET_HTTP_PORT: not a port number: {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"MOEFLEET_HTTP_PORT: {port} is not in 0..65535")
    return port

