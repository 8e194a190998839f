"""The one config tree: `RayMoEConfig` and its children (DESIGN §6).

Frozen pydantic models with `extra="forbid"`: a typo is an error, not a dropped key. The same tree
arrives from YAML, CLI flags, Helm values (`serveConfigV2.applications[].args`) and `LLM(**kwargs)`;
each consumer receives only its subtree. Facts learned at run time (KV blocks after sizing, the EOS
id) live in separate runtime objects, never written back here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from raymoe.heavy.config import ContextConfig, HeavyConfig, ReasoningConfig, ToolValidationConfig


class _Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Node):
    path: str | None = Field(None, description="Hugging Face checkpoint folder (config.json + safetensors).")
    preset: str | None = Field(None, description="Built-in preset to create when no path is given (e.g. 'tiny').")
    served_model_name: str | None = Field(None, description="Model id in the OpenAI API; default: folder name.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype for non-quantized weights; 'auto' = the checkpoint's torch_dtype.")
    int4_mode: Literal["packed", "dequant"] = Field(
        "packed", description="INT4 routed experts: keep packed (int4 matmul kernel) or dequantize at load.")
    seed: int = Field(0, ge=0, description="Seed used when a preset checkpoint is created.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.path and self.preset:
            raise ValueError(f"model.path ({self.path!r}) and model.preset ({self.preset!r}) are exclusive")
        return self


class EngineConfig(_Node):
    max_num_seqs: int = Field(64, ge=1, le=4096, description="Most sequences in one batch.")
    max_num_batched_tokens: int = Field(2048, ge=1, description="Most tokens (prefill+decode) in one step.")
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV-cache block.")
    kv_cache_memory: int = Field(256 << 20, ge=1, description="Bytes for the paged latent KV cache.")
    enable_prefix_caching: bool = Field(True, description="Reuse full KV blocks of a repeated prompt prefix.")
    max_model_len: int | None = Field(None, ge=1, description="Context limit; default: max_position_embeddings.")
    enable_chunked_prefill: bool = Field(True, description="Split long prompts over several steps.")


class ParallelConfig(_Node):
    num_expert_shards: int = Field(0, ge=0, le=4096, description="Expert-shard actors; 0 = experts in-process.")
    transport: Literal["local", "ray", "collective"] = Field(
        "local", description="How dispatch/combine moves tokens to expert shards.")
    num_redundant_experts: int = Field(0, ge=0, description="Extra replicas of hot experts (EPLB).")
    expert_group: str = Field("default", description="Name segment of shard actors: raymoe-expert-<group>-<i>.")
    expert_resource: str | None = Field(
        "expert", description="Custom Ray resource shards ask for when the cluster defines it.")
    shard_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per shard actor.")
    shard_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per shard actor.")
    max_restarts: int = Field(3, ge=-1, description="Ray max_restarts of each shard actor (-1 = infinite).")
    recovery_timeout_s: float = Field(60.0, gt=0, description="How long a step waits for a dead shard to return.")
    address: str | None = Field(None, description="Ray address to join (default: RAY_ADDRESS or a local Ray).")
    per_expert_metrics: bool = Field(
        False, description="Export tokens per (MoE layer, expert) to Prometheus: layers x experts series "
        "(61 x 384 for K2), so off by default; per-shard load and imbalance are always exported.")

    @model_validator(mode="after")
    def _transport_needs_shards(self) -> ParallelConfig:
        if self.transport != "local" and self.num_expert_shards == 0:
            raise ValueError(f"transport={self.transport!r} needs num_expert_shards >= 1 (got 0)")
        if self.transport == "local" and self.num_expert_shards > 0:
            raise ValueError(f"num_expert_shards={self.num_expert_shards} needs transport 'ray' or 'collective'")
        return self


class KernelsConfig(_Node):
    backend: Literal["auto", "torch", "triton"] = Field(
        "auto", description="Hot-path kernels. 'auto': Triton on CUDA; on CPU the C kernels (decode attention, "
        "RMSNorm, rotary embedding, MoE router, fp32 routed experts, greedy argmax; built on first use where a C "
        "compiler is present), torch references otherwise. 'torch': torch references only. 'triton': Triton "
        "everywhere (on CPU through its interpreter).")


class AutoscalingConfig(_Node):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 allows scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start (default: min_replicas).")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Requests in flight per replica Serve aims for.")
    upscale_delay_s: float = Field(10.0, ge=0, description="Sustained-load time before adding a replica.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Idle time before removing a replica.")
    metrics_interval_s: float = Field(2.0, gt=0, description="How often replicas report load.")
    look_back_period_s: float = Field(10.0, gt=0, description="Window averaged for scaling decisions.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must be within "
                             f"[{self.min_replicas}, {self.max_replicas}]")
        return self


class DeploymentConfig(_Node):
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica.")
    max_ongoing_requests: int = Field(64, ge=1, description="Concurrent requests per replica before queueing.")
    max_queued_requests: int = Field(256, ge=-1, description="Queued requests before 503 (-1: unbounded).")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per replica.")
    backpressure_status_code: Literal[429, 503] = Field(
        503, description="HTTP status when max_queued_requests is exceeded (Serve allows 503 or 429).")
    retry_after_s: float = Field(1.0, ge=0, le=3600, description="Retry-After seconds sent with 429/503 answers.")
    health_check_period_s: float = Field(10.0, gt=0, description="How often Serve calls the replica's check_health.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="check_health slower than this fails the replica.")
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="Time a stopping replica gets to finish its requests before it is killed.")


class LimitsConfig(_Node):
    max_body_bytes: int = Field(4 << 20, ge=1024, description="Largest request body (413 above).")
    max_prompt_tokens: int | None = Field(None, ge=1, description="Largest prompt (default: the context limit).")
    max_tokens: int = Field(32768, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(1024, ge=1, description="max_tokens when a request gives none.")
    max_n: int = Field(8, ge=1, description="Largest n (choices per request).")

    @model_validator(mode="after")
    def _default_within_max(self) -> LimitsConfig:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) must be <= max_tokens ({self.max_tokens})")
        return self


class ServeConfig(_Node):
    host: str = Field("127.0.0.1", description="HTTP bind address of the Serve proxy.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy.")
    app_name: str = Field("raymoe", description="Serve application name.")
    route_prefix: str = Field("/", description="HTTP route prefix of the application.")
    api_keys: list[str] = Field(default_factory=list, description="Accepted bearer keys (empty: no auth).")
    api_keys_env: str = Field("RAYMOE_API_KEYS", description="Env var with comma-separated extra keys.")
    ingress: DeploymentConfig = Field(default_factory=DeploymentConfig)
    attention: DeploymentConfig = Field(default_factory=DeploymentConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    default_temperature: float = Field(1.0, ge=0, description="Temperature when a request gives none (K2: 1.0).")
    public_paths: list[str] = Field(
        default_factory=lambda: ["/health"], description="Routes answered without an API key (e.g. probes).")
    max_resubmits: int = Field(
        3, ge=0, le=100, description="Times the ingress re-submits a request whose AttentionTier replica died.")
    heavy: HeavyConfig = Field(default_factory=HeavyConfig, description="Heavy Mode (parallel trajectories).")
    reasoning: ReasoningConfig = Field(
        default_factory=ReasoningConfig, description="Thinking-token budgets (reasoning_effort, thinking_budget).")
    tool_validation: ToolValidationConfig = Field(
        default_factory=ToolValidationConfig, description="Checks of generated tool calls against the request.")
    context: ContextConfig = Field(
        default_factory=ContextConfig, description="What to do with a chat prompt over the prompt limit.")


class RayMoEConfig(_Node):
    """Root of the config tree."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    kernels: KernelsConfig = Field(default_factory=KernelsConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RayMoEConfig:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read config {path}: {e}") from e
        return cls.model_validate(data)
