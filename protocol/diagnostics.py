"""Aligned decoding's diagnostics (``decoding.diagnostics: true``): what each choice's ``alignment``
holds.

A common summary (method, target reward, KL from the SFT model, cost) and the decisions taken, one
step type per method family, told apart by ``kind``:

    value_guided   transfer_q, args, cd (token-wise): one token per decision, from the SFT model's
                   top-k candidates re-weighted by exp(Q / alpha)
    block          cd with cd_mode=block: the best of num_blocks sampled blocks
    best_of_n      best_of_n: the best of num_samples whole answers
    baseline       baseline: the whole answer sampled from the baseline itself

Plain decoding (method ``sft``) with diagnostics has no steps; its KL from the SFT model is 0.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Diagnostic(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepCost(_Diagnostic):
    """What one decision cost."""

    rollouts: int = Field(0, description="Continuations sampled (rollouts, blocks or whole answers).")
    rollout_tokens: int = Field(0, description="Tokens in those continuations.")
    reward_calls: int = Field(0, description="Texts scored by a reward.")
    pruned: int = Field(0, description="Candidates that could not win whatever their value, so got no rollouts.")


class DecodingCost(_Diagnostic):
    """What the whole answer cost, summed over its decisions."""

    decisions: int = Field(description="Decisions taken (steps).")
    gated: int = Field(0, description="Decisions where the SFT model was confident enough to skip the value step.")
    rollouts: int = 0
    rollout_tokens: int = 0
    reward_calls: int = 0


class TokenCandidate(_Diagnostic):
    """One of the SFT model's top-k tokens at a value-guided decision."""

    token_id: int
    token: str
    sft_logprob: float = Field(description="The SFT model's own log-probability (full vocabulary, no penalty).")
    value: float | None = Field(
        description="Q(s, z): the candidate's estimated value under the target reward "
        "(null with decoding.value='head': the head's values stay inside the engine)."
    )
    penalty: float = Field(
        0.0,
        description="presence_penalty if the token already occurs in the answer, plus frequency_penalty "
        "times its count there; subtracted from sft_logprob before the rule.",
    )
    logprob: float | None = Field(
        description="log pi(z | s) of the re-weighted distribution over the candidates "
        "(null with decoding.value='head')."
    )
    baseline_logprob: float | None = Field(
        None,
        description="The baseline's own log-probability, where the values come from it (decoding.value="
        "'implicit': value = beta * (baseline_logprob - sft_logprob)); null otherwise.",
    )


class BlockCandidate(_Diagnostic):
    text: str
    token_ids: list[int]
    value: float = Field(description="Target reward of the answer so far with this block appended.")


class SampleCandidate(_Diagnostic):
    text: str
    value: float = Field(description="Target reward of this whole answer.")


class _Step(_Diagnostic):
    position: int = Field(description="Index of the decision's first token in the answer.")
    chosen: list[int] = Field(description="Token ids the decision appended.")
    chosen_text: str
    kl: float | None = Field(
        description="KL from the SFT model of this decision (exact, or the best-of-n bound; "
        "null with decoding.value='head', whose distribution stays inside the engine)."
    )
    gated: bool = False
    cost: StepCost = Field(default_factory=StepCost)


class ValueGuidedStep(_Step):
    kind: Literal["value_guided"] = "value_guided"
    candidates: list[TokenCandidate] = []


class BlockStep(_Step):
    kind: Literal["block"] = "block"
    candidates: list[BlockCandidate] = []


class BestOfNStep(_Step):
    kind: Literal["best_of_n"] = "best_of_n"
    candidates: list[SampleCandidate] = []


class BaselineStep(_Step):
    """The answer sampled from the baseline: ``kl`` is log pi_baseline(y|x) - log pi_sft(y|x) of this
    answer, a one-sample estimate of KL(pi_baseline || pi_sft) (beta times it is the baseline's implicit
    reward of the answer)."""

    kind: Literal["baseline"] = "baseline"
    baseline: str = Field(description="The baseline's name (GET /v1/baselines).")


Step = Annotated[ValueGuidedStep | BlockStep | BestOfNStep | BaselineStep, Field(discriminator="kind")]


class AlignmentSummary(_Diagnostic):
    """One choice's aligned-decoding diagnostics."""

    method: Literal["sft", "baseline", "transfer_q", "args", "cd", "best_of_n"]
    baseline: str | None = Field(
        None,
        description="The baseline TQ* transferred from, or sampled by the "
        "baseline method (GET /v1/baselines); null for the other methods.",
    )
    baseline_kind: Literal["adapter", "model", "prompted", "remote"] | None = Field(
        None,
        description="What that baseline is: a trained adapter, a model folder, the prompted baseline, or a "
        "model on a remote vLLM server.",
    )
    baseline_reward: str | None = Field(None, description="r_BL of indirect transfer (its reward's name).")
    reward_name: str = Field(description="The target reward the answer is scored with.")
    reward: float = Field(description="Target reward of the final text.")
    kl: float | None = Field(
        description="KL from the SFT model, summed over the decisions (null with decoding.value='head')."
    )
    value: str | None = Field(
        None,
        description="transfer_q: where Q came from (GET /v1/methods lists the value sources): baseline "
        "rollouts, the engine's value head, or the baseline's implicit Q.",
    )
    cost: DecodingCost
    steps: list[Step] = []
