"""Responses of the native endpoints: ``POST /generate`` (its request model lives with the server),
the baselines and value-head listings, ``GET /health``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from alignd.protocol.common import UsageInfo
from alignd.protocol.diagnostics import AlignmentSummary


class TokenLogprobOut(BaseModel):
    token_id: int
    token: str
    logprob: float


class GeneratedTokenOut(TokenLogprobOut):
    top: list[TokenLogprobOut] = []


class GenerateChoice(BaseModel):
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[GeneratedTokenOut] | None = None
    alignment: AlignmentSummary | None = Field(
        None, description="Aligned decoding diagnostics (decoding.diagnostics=true)."
    )


class GenerateResponse(BaseModel):
    id: str
    model: str
    choices: list[GenerateChoice]
    usage: UsageInfo


class GenerateStreamEvent(BaseModel):
    """One server-sent event of a streaming /generate: new text of one choice, or the final usage."""

    id: str
    index: int | None = None
    text: str = ""
    token_ids: list[int] = []
    finish_reason: str | None = None
    logprobs: list[GeneratedTokenOut] | None = None
    alignment: AlignmentSummary | None = None
    usage: UsageInfo | None = None


class ImplicitQCard(BaseModel):
    """A baseline's implicit Q: ``beta * (log pi_BL(z|s) - log pi_SFT(z|s))``."""

    beta: float
    reward: str = Field(description="The reward the values belong to (the one it was trained for).")
    trained_by: str = Field(description="dpo or irft.")


class BaselineCard(BaseModel):
    """A baseline a request may pick with ``decoding.baseline``."""

    name: str
    kind: str = Field(
        description="adapter (LoRA of the served model), model (a folder on its own engine), prompted, "
        "or remote (a model on a remote vLLM server; source is its URL and model name)."
    )
    source: str = Field(description="The adapter or model folder, or the system prompt.")
    same_as: str | None = Field(None, description="Set when this name is another baseline's alias ('default').")
    implicit_reward: str = Field(
        description="Its implicit reward's name in GET /v1/rewards (r_BL of indirect transfer)."
    )
    beta: float | None = None
    provenance: dict[str, Any] = Field(default_factory=dict, description="An adapter's manifest: how it was made.")
    implicit_q: ImplicitQCard | None = Field(
        None,
        description="Its exact token-level Q (decoding.value='implicit'), where it is a DPO or IRFT policy of "
        "the served model; null otherwise (implicit_q_unavailable says why).",
    )
    implicit_q_unavailable: str | None = None


class BaselineList(BaseModel):
    object: str = "list"
    data: list[BaselineCard]


class MethodParameter(BaseModel):
    """A field of the request's ``decoding`` object that a method (or a value source) reads."""

    name: str
    description: str | None = None
    default: Any = Field(None, description="This server's default (null: unset, or from the request's other fields).")
    limit: int | None = Field(None, description="This server's upper bound (a request above it is a 400).")
    json_schema: dict[str, Any] = Field(default_factory=dict, description="The field's JSON schema (type, range).")


class ValueSourceCard(BaseModel):
    """A way ``transfer_q`` estimates Q(s, z): ``decoding.value``."""

    name: str
    summary: str
    family: Literal["plain", "aligned"] = Field(description="Admission family: plain = one engine request an answer.")
    in_engine: bool = Field(
        description="Values computed inside the engine's decode step (the diagnostics list the "
        "candidates, not their values, and no KL)."
    )
    available: bool
    unavailable_reason: str | None = Field(None, description="Why this server cannot serve it, and what to set.")
    parameters: list[MethodParameter]


class MethodCard(BaseModel):
    """A decoding method: ``decoding.method``."""

    name: str
    summary: str
    family: Literal["plain", "aligned"] = Field(description="Admission family (with a value source: the source's).")
    needs_reward: bool
    needs_baseline: bool
    value_sources: list[str] | None = Field(None, description="The values of decoding.value it takes (null: none).")
    parameters: list[MethodParameter]


class MethodList(BaseModel):
    object: str = "list"
    data: list[MethodCard]
    value_sources: list[ValueSourceCard]


class ValueHeadCard(BaseModel):
    """The learned value head of ``decoding.value='head'`` (TQ* inside the engine's decode step)."""

    available: bool = Field(description="False when the server has no value head (ALIGND_VALUE_HEAD=none).")
    path: str | None = None
    reward: str | None = Field(None, description="The target reward it was trained for: the only one it serves.")
    baseline: str | None = Field(
        None,
        description="The baseline of this server whose rollout values it distils "
        "(found by its weights digest or system prompt), or the head's own record of it "
        "followed by '(<kind>, not served here)'.",
    )
    provenance: dict[str, Any] = Field(
        default_factory=dict, description="Its manifest: data, metrics, the exact command."
    )


class EngineHealthCard(BaseModel):
    """One engine behind the server: the served SFT model, a baseline's or a reward's."""

    status: Literal["up", "down"]
    kind: str = Field(
        description="vllm (in this process), hf (transformers, in this process) or remote (a vllm serve deployment)."
    )
    detail: str | None = Field(None, description="Why it is down.")
    location: str | None = Field(None, description="A remote engine's base URL.")
    since: float | None = Field(None, description="Unix time of its last change between up and down (remote engines).")


class HealthResponse(BaseModel):
    """``GET /health``: 200 while the SFT engine serves ('ok', or 'degraded' when an engine that only some
    requests need is down: those requests get 503 engine_unavailable), 503 when the SFT engine is down."""

    status: Literal["ok", "degraded", "unavailable"]
    model: str
    engine: str
    engines: dict[str, EngineHealthCard] = Field(
        description="By role: 'sft', 'baseline/<name>' and 'reward/<name>' for the engines of their own."
    )
