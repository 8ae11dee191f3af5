"""Sampling fields shared by every generate endpoint, and their conversion to engine parameters.

Defaults are resolved in one order, written down here: the request's value, then the server's
setting, then the API default.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from alignd.decoding.config import DecodingConfig
from alignd.errors import ContextLengthError, InvalidRequestError
from alignd.models.engine import GenerationParams
from alignd.settings import Settings

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate; default: the server's setting.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="Choices per prompt (bounded by the server's max_n).")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    decoding: DecodingConfig | None = Field(
        None, description="Aligned decoding: method (sft, transfer_q, args, cd, best_of_n) and its parameters."
    )

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, stop):
        if stop is None:
            return None
        items = [stop] if isinstance(stop, str) else stop
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        if any(len(s) > MAX_STOP_LENGTH for s in items):
            raise ValueError(f"stop sequences are limited to {MAX_STOP_LENGTH} characters")
        return items

    @model_validator(mode="after")
    def _n_needs_sampling(self):
        if self.n > 1 and self.temperature == 0.0:
            raise ValueError("n > 1 needs temperature > 0: greedy decoding would return n identical choices")
        return self

    def generation_params(
        self,
        *,
        prompt_tokens: int,
        max_model_len: int,
        settings: Settings,
        logprobs: int | None = None,
        logprobs_field: str = "logprobs",
    ) -> GenerationParams:
        """Engine parameters for a prompt of ``prompt_tokens`` tokens, checked against the context."""
        if self.n > settings.max_n:
            raise InvalidRequestError(f"n={self.n} is above this server's limit of {settings.max_n}", param="n")
        if logprobs is not None and logprobs > settings.max_top_logprobs:
            raise InvalidRequestError(
                f"{logprobs_field}={logprobs} is above this server's limit of {settings.max_top_logprobs} top "
                "log-probabilities per token (ALIGND_MAX_TOP_LOGPROBS): ask for fewer",
                param=logprobs_field,
            )
        if settings.max_prompt_tokens is not None and prompt_tokens > settings.max_prompt_tokens:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens, above this server's limit of {settings.max_prompt_tokens}: "
                "shorten the prompt",
                param="messages",
            )
        if self.max_tokens is not None and self.max_tokens > settings.max_output_tokens:
            raise InvalidRequestError(
                f"max_tokens={self.max_tokens} is above this server's limit of {settings.max_output_tokens}",
                param="max_tokens",
            )
        room = max_model_len - prompt_tokens
        if room <= 0:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens but this model's context is {max_model_len} tokens: "
                "shorten the prompt",
                param="messages",
            )
        if self.max_tokens is None:
            max_tokens = min(settings.default_max_tokens, settings.max_output_tokens, room)
        elif self.max_tokens > room:
            raise ContextLengthError(
                f"max_tokens={self.max_tokens} does not fit: this model's context is {max_model_len} tokens and "
                f"the prompt takes {prompt_tokens}, so at most {room} new tokens can be generated; "
                f"lower max_tokens to {room} or less",
                param="max_tokens",
            )
        else:
            max_tokens = self.max_tokens
        return GenerationParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            n=self.n,
            stop=tuple(self.stop or ()),
            seed=self.seed,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )
