"""The request fields of ``POST /generate``, spelled out for editors and type checkers.

``Alignd.generate`` and its sync/async, whole/streamed twins take ``**params: Unpack[GenerateParams]``:
one list of fields for all four methods, which an editor shows as keyword arguments. The types say
what the server accepts; its bounds (``temperature`` in [0, 2], ``top_k`` up to the server's limit,
...) are checked by the server, whose 400 names the field.

Written by hand rather than imported from the server, so that the client stands alone: it depends on
:mod:`alignd.protocol` only. ``tests/test_client_types.py`` checks that these fields match the
server's request models.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

from alignd.protocol import ChatMessage


class TextContentPartParam(TypedDict):
    type: Literal["text"]
    text: str


class ChatMessageParam(TypedDict):
    """A chat message as a plain dict, e.g. ``{"role": "user", "content": "Hi!"}``."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPartParam]
    name: NotRequired[str]


class DecodingParams(TypedDict, total=False):
    """The ``decoding`` object: the aligned-decoding method and its parameters.

    Every field is optional; the server fills what is left out from its settings.
    """

    method: Literal["sft", "baseline", "transfer_q", "args", "cd", "best_of_n"]
    """sft (plain decoding, the default), transfer_q, args, cd (controlled decoding) or best_of_n."""
    alpha: float
    """KL strength, > 0: large stays close to the SFT model, small seeks reward."""
    top_k: int
    """Candidate tokens per step; 0 = the whole vocabulary (value='implicit' only)."""
    num_rollouts: int
    """Rollouts per candidate (transfer_q, cd)."""
    rollout_len: int
    """Tokens per rollout (transfer_q, cd)."""
    rollout_temperature: float
    """Temperature of the rollouts, in [0, 2]; 0 = greedy rollouts."""
    value: Literal["rollouts", "head", "implicit"]
    """transfer_q: Q from the baseline's rollouts, from the server's learned value head, scored inside the engine's
    decode step at about the cost of plain decoding (GET /v1/value_head), or the exact Q of a DPO or IRFT baseline,
    beta * (log pi_BL - log pi_SFT) (GET /v1/baselines says which baselines have it). Left out: 'implicit' where it
    serves the request as it stands (the baseline's own reward, direct transfer, no rollout fields), else
    'rollouts'."""
    transfer: Literal["direct", "indirect"]
    """transfer_q: direct (the baseline is aligned to the target reward) or indirect (to baseline_reward)."""
    beta: float
    """KL coefficient the baseline was aligned with (indirect transfer)."""
    reward: str
    """Target reward name (default: the server's target reward; GET /v1/rewards lists them)."""
    baseline: str
    """The baseline to transfer from (transfer_q) or to sample (baseline): a name of GET /v1/baselines."""
    baseline_reward: str
    """Baseline reward name, for indirect transfer."""
    block_size: int
    """Decide by value every block_size tokens; the SFT model writes the rest."""
    confidence_threshold: float
    """Skip the value step where the SFT model's top-1 probability is at least this, in (0, 1]."""
    cd_mode: Literal["token", "block"]
    """cd: token-wise, or block-wise (num_blocks sampled blocks of block_len tokens)."""
    num_blocks: int
    """cd block-wise: sampled blocks per decision."""
    block_len: int
    """cd block-wise: tokens per block."""
    num_samples: int
    """best_of_n: whole answers sampled."""
    sample_temperature: float
    """Sampling temperature of blocks and of best_of_n, in (0, 2]."""
    prune: bool
    """Skip rollouts of candidates that cannot win (greedy, bounded rewards). Default: on, except with diagnostics."""
    diagnostics: bool
    """Report per-step candidates, values and choices, and the answer's reward and KL, as each choice's
    ``alignment`` (an :class:`alignd.protocol.AlignmentSummary`)."""


class GenerateParams(TypedDict, total=False):
    """The request fields of ``POST /generate`` (``stream`` aside: that is ``generate_stream``).

    Give exactly one of ``prompt`` and ``messages``. Fields left out, or given as None, are not sent,
    so the server's defaults apply.
    """

    prompt: str
    """Raw prompt text, without a chat template."""
    messages: list[ChatMessageParam | ChatMessage]
    """A chat, rendered with the model's chat template: dicts or :class:`alignd.protocol.ChatMessage`."""
    model: str
    """Optional; must name the served model if given."""
    max_tokens: int
    """Tokens to generate; default: the server's setting."""
    temperature: float
    """Sampling temperature in [0, 2]; 0 means greedy. Default 1."""
    top_p: float
    """Nucleus sampling mass in (0, 1]. Default 1."""
    n: int
    """Choices to generate (bounded by the server's max_n); n > 1 needs temperature > 0."""
    stop: str | list[str]
    """Up to 4 stop sequences."""
    seed: int
    """Seed for reproducible sampling."""
    presence_penalty: float
    """In [-2, 2]: penalises tokens already in the answer."""
    frequency_penalty: float
    """In [-2, 2]: penalises tokens by how often they occur in the answer."""
    logprobs: int
    """Report each generated token's log-probability with this many alternatives (0 to 20)."""
    decoding: DecodingParams
    """Aligned decoding: method and parameters (default: plain SFT decoding)."""
