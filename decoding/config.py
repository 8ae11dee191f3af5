"""The request's ``decoding`` object: which method, and its parameters (validated, bounded).

Bounds on everything that drives cost come from the server's settings (``ALIGND_MAX_TOP_K`` ...);
a value beyond them is a 400 that names the field and the limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alignd.decoding import registry
from alignd.errors import InvalidRequestError
from alignd.settings import Settings


def _method_enum(schema: dict[str, Any]) -> None:
    """The schema's enum of ``method``, read from the registry when the schema is made (so /openapi.json
    lists every registered method, the built-in ones and those added later)."""
    schema["enum"] = list(registry.methods())


def _value_enum(schema: dict[str, Any]) -> None:
    schema["enum"] = list(registry.value_sources())


DEFAULT_VALUE_SOURCE = "rollouts"

T = TypeVar("T")


def resolved_field(value: T | None) -> T:
    """A field of a resolved config that :meth:`DecodingConfig.resolved` fills from the settings (None in the
    request as sent; set once resolved), as its type without None: a typing statement, ``value`` unchanged."""
    return cast(T, value)


def _registered(name: str, known: Mapping[str, object], what: str) -> str:
    if name not in known:
        raise ValueError(f"unknown {what} '{name}'; this server has: {', '.join(known)} (GET /v1/methods)")
    return name


class DecodingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = Field(
        "sft",
        description="The decoding method: GET /v1/methods lists them with their parameters.",
        json_schema_extra=_method_enum,
    )
    alpha: float | None = Field(None, gt=0.0, description="KL strength: large = close to SFT, small = reward-seeking.")
    top_k: int | None = Field(
        None,
        ge=0,
        description="Candidate tokens per step (the SFT model's most likely); 0: "
        "every token of the vocabulary (decoding.value='implicit' only).",
    )
    num_rollouts: int | None = Field(None, ge=1, description="Rollouts per candidate (transfer_q, cd).")
    rollout_len: int | None = Field(None, ge=0, description="Tokens per rollout (transfer_q, cd).")
    rollout_temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy rollouts.")
    value: str = Field(
        DEFAULT_VALUE_SOURCE,
        description="transfer_q: how Q(s, z) is estimated (GET /v1/methods lists the value sources). 'rollouts': "
        "the baseline's rollouts per candidate (ALGORITHMS.md); 'implicit': the exact Q of a DPO or IRFT baseline; "
        "'head': the server's learned value head, scored inside the engine's own decode step (one engine request "
        "per answer, near the cost of plain decoding; GET /v1/value_head says which reward and baseline it was "
        "trained for). Left out: 'implicit' where it serves the request as it stands (the baseline's own reward, "
        "direct transfer, no rollout fields; ALIGND_DECODING_VALUE=auto), else 'rollouts'.",
        json_schema_extra=_value_enum,
    )
    transfer: Literal["direct", "indirect"] = Field(
        "direct", description="direct: the baseline is aligned to the target reward; indirect: to baseline_reward."
    )
    beta: float | None = Field(None, gt=0.0, description="KL coefficient the baseline was aligned with (indirect).")
    reward: str | None = Field(None, description="Target reward name (default: the server's target reward).")
    baseline: str | None = Field(
        None,
        description="The baseline to transfer from (transfer_q) or to sample (baseline): a name of GET "
        "/v1/baselines; default 'default'.",
    )
    baseline_reward: str | None = Field(
        None,
        description="Baseline reward name for indirect transfer; default: the baseline's own implicit "
        "reward, '<baseline>_implicit'.",
    )
    block_size: int = Field(
        1, ge=1, description="Decide by value every block_size tokens; the SFT model writes the rest."
    )
    confidence_threshold: float | None = Field(
        None, gt=0.0, le=1.0, description="Skip the value step where the SFT top-1 probability is at least this."
    )
    cd_mode: Literal["token", "block"] = Field(
        "token", description="cd: token-wise, or block-wise (K blocks of M tokens)."
    )
    num_blocks: int | None = Field(None, ge=1, description="cd block-wise: K sampled blocks per decision.")
    block_len: int | None = Field(None, ge=1, description="cd block-wise: M tokens per block.")
    num_samples: int | None = Field(None, ge=1, description="best_of_n: N whole answers.")
    sample_temperature: float | None = Field(
        None, gt=0.0, le=2.0, description="Sampling temperature of blocks and of best_of_n."
    )
    prune: bool | None = Field(
        None,
        description="Greedy only, bounded rewards: skip rollouts of candidates that cannot win (same answer, "
        "less work). Default: on, except with diagnostics (whose KL is then exact).",
    )
    diagnostics: bool = Field(False, description="Per-step candidates, values and choices; response reward and KL.")

    @model_validator(mode="after")
    def _rollouts_need_sampling(self) -> DecodingConfig:
        if (self.num_rollouts or 1) > 1 and self.rollout_temperature == 0.0:
            raise ValueError("num_rollouts > 1 needs rollout_temperature > 0: greedy rollouts would all be identical")
        return self

    @field_validator("method")
    @classmethod
    def _registered_method(cls, method: str) -> str:
        return _registered(method, registry.methods(), "decoding method")

    @field_validator("value")
    @classmethod
    def _registered_value_source(cls, value: str) -> str:
        return _registered(value, registry.value_sources(), "value source")

    @model_validator(mode="after")
    def _value_source_applies(self) -> DecodingConfig:
        if self.value != DEFAULT_VALUE_SOURCE and not self.spec.takes_value_source:
            raise ValueError(
                f"decoding.value='{self.value}' is a transfer_q estimator, not one of method={self.method}"
            )
        if self.value_source is not None:
            self.value_source.check_config(self)
        return self

    @property
    def spec(self) -> registry.MethodSpec:
        """The method's registered spec."""
        return registry.methods()[self.method]

    @property
    def value_source(self) -> registry.ValueSourceSpec | None:
        """The value source's spec, for a method that takes one (None otherwise)."""
        return registry.value_sources()[self.value] if self.spec.takes_value_source else None

    @property
    def family(self) -> registry.Family:
        """The admission family this request is costed as."""
        source = self.value_source
        return source.family if source is not None else self.spec.family

    @property
    def metric_label(self) -> str:
        """The ``method`` label of this request's metrics: a value source may be its own series
        (TQ* by the value head is ``transfer_q_head``)."""
        source = self.value_source
        return (source.metric_label if source is not None else None) or self.method

    @property
    def values_in_engine(self) -> bool:
        """The values are computed inside the engine's decode step: no per-step values nor KL to report."""
        source = self.value_source
        return source is not None and source.in_engine

    @property
    def indirect(self) -> bool:
        """TQ* with indirect transfer (the baseline aligned to another reward than the target)."""
        return self.value_source is not None and self.transfer == "indirect"

    def resolved(self, settings: Settings) -> DecodingConfig:
        """Defaults filled from the settings, then every cost-driving field checked against its limit."""
        values = self.model_dump()
        indirect = self.indirect
        # Indirect transfer weights rollouts by self-normalised importance weights: with one rollout
        # the weight cancels (w r / w = r) and it would silently be direct transfer.
        default_rollouts = max(settings.decoding_num_rollouts, 2) if indirect else settings.decoding_num_rollouts
        defaults = {
            "alpha": settings.decoding_alpha,
            "top_k": settings.decoding_top_k,
            "num_rollouts": default_rollouts,
            "rollout_len": settings.decoding_rollout_len,
            "rollout_temperature": 0.0 if (self.num_rollouts or default_rollouts) == 1 else 1.0,
            "beta": settings.implicit_beta,
            "reward": settings.target_reward,
            "baseline": "default",
            "baseline_reward": settings.baseline_reward,
            "num_blocks": settings.decoding_num_blocks,
            "block_len": settings.decoding_block_len,
            "num_samples": settings.decoding_num_samples,
            "sample_temperature": settings.decoding_sample_temperature,
            "prune": not self.diagnostics,
        }
        for key, default in defaults.items():
            if values[key] is None:
                values[key] = default
        try:
            out = DecodingConfig.model_validate(values)
        except ValidationError as exc:  # a default combined with the request's values (e.g. greedy rollouts)
            message = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise InvalidRequestError(f"decoding: {message}", param="decoding") from None
        limits = parameter_limits(settings)
        if out.top_k == 0:
            if out.value_source is None or not out.value_source.whole_vocabulary:
                sources = [s.name for s in registry.value_sources().values() if s.whole_vocabulary]
                raise InvalidRequestError(
                    f"decoding.top_k=0 (every token of the vocabulary) is only valid with decoding.value in "
                    f"{sources}; this method and value source take 1 to {limits['top_k']}",
                    param="decoding.top_k",
                )
            del limits["top_k"]  # the whole vocabulary: exempt from ALIGND_MAX_TOP_K
        for key, limit in limits.items():
            if getattr(out, key) > limit:
                raise InvalidRequestError(
                    f"decoding.{key}={getattr(out, key)} is above this server's limit of {limit}",
                    param=f"decoding.{key}",
                )
        if out.indirect and resolved_field(out.num_rollouts) < 2:
            raise InvalidRequestError(
                "indirect transfer needs decoding.num_rollouts >= 2: its importance weights are normalised over "
                "the rollouts, so with one rollout they cancel and the answer is direct transfer's",
                param="decoding.num_rollouts",
            )
        return out


def parameter_limits(settings: Settings) -> dict[str, int]:
    """The server's upper bound on each cost-driving field of ``decoding`` (a request above it is a 400)."""
    return {
        "top_k": settings.max_top_k,
        "num_rollouts": settings.max_num_rollouts,
        "rollout_len": settings.max_rollout_len,
        "num_blocks": settings.max_num_rollouts,
        "block_len": settings.max_rollout_len,
        "num_samples": settings.max_best_of_n,
        "block_size": settings.max_rollout_len,
    }
