"""The Transfer Q* re-weighting rule, in one place, for every engine path.

Over the top-k candidate tokens ``z`` of the SFT model at state ``s``:

    pi(z | s)  ∝  pi_sft(z | s) * exp(Q(s, z) / alpha)

Large ``alpha`` gives back the SFT model (restricted to its top-k); small ``alpha`` seeks value.
ARGS is the same rule with ``Q`` = the reward of the partial sequence and ``alpha = 1 / w``; CD is the
same rule with ``Q`` estimated by rollouts of the SFT model itself.

:class:`TransferQLogitsProcessor` applies the rule inside ``transformers``' ``model.generate``; the
server's decoders (over vLLM or the HF engine) call :func:`reweight` directly.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Reweighted:
    """The decoding distribution over the candidates of one step."""

    token_ids: list[int]
    sft_logprobs: list[float]  # the SFT model's own, unpenalised
    values: list[float]
    logprobs: list[float]  # log pi(z | s), normalised over the candidates
    penalties: list[float] | None = None  # subtracted from sft_logprobs before the rule (None = none)

    @property
    def kl_from_sft(self) -> float:
        """KL(pi || pi_sft), exact: pi is zero outside the candidate set, and pi_sft(z) is the SFT
        model's own (full-vocabulary, unpenalised) probability of each candidate."""
        return sum(
            math.exp(lp) * (lp - s) for lp, s in zip(self.logprobs, self.sft_logprobs, strict=False) if lp > -math.inf
        )

    def greedy_index(self) -> int:
        # Ties go to the SFT model's preferred (earlier) candidate, so alpha -> inf reproduces SFT greedy.
        best = max(self.logprobs)
        return next(i for i, lp in enumerate(self.logprobs) if lp == best)

    def sample_index(self, generator: torch.Generator | None, temperature: float = 1.0) -> int:
        logits = torch.tensor(self.logprobs, dtype=torch.float64) / max(temperature, 1e-6)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))


def reweight(
    token_ids: Sequence[int],
    sft_logprobs: Sequence[float],
    values: Sequence[float],
    alpha: float,
    penalties: Sequence[float] | None = None,
) -> Reweighted:
    """``log pi(z) = log pi_sft(z) - penalty(z) + Q(z)/alpha - logsumexp`` over the candidates.

    ``penalties`` are OpenAI's presence and frequency penalties of each candidate (see
    :func:`repetition_penalties`): like vLLM's, they lower a token's logit, so they shift the SFT model's
    preference before the value is added; the KL is still measured from the unpenalised SFT model."""
    if math.isnan(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be > 0 (got {alpha}); use a large alpha to stay close to the SFT model")
    if not (len(token_ids) == len(sft_logprobs) == len(values)) or not token_ids:
        raise ValueError("token_ids, sft_logprobs and values must be non-empty and of equal length")
    if penalties is not None and len(penalties) != len(token_ids):
        raise ValueError("penalties must have one value per candidate")
    scale = 0.0 if alpha == math.inf else 1.0 / alpha
    scores = torch.tensor(sft_logprobs, dtype=torch.float64) + scale * torch.tensor(values, dtype=torch.float64)
    if penalties is not None:
        scores = scores - torch.tensor(penalties, dtype=torch.float64)
    logprobs = torch.log_softmax(scores, dim=-1)
    return Reweighted(
        list(token_ids),
        list(sft_logprobs),
        list(values),
        logprobs.tolist(),
        None if penalties is None else list(penalties),
    )


def repetition_penalties(
    candidates: Sequence[int], answer: Sequence[int], presence_penalty: float, frequency_penalty: float
) -> list[float] | None:
    """OpenAI's penalties of each candidate token given the answer so far: ``presence_penalty`` if it
    already occurs in the answer, plus ``frequency_penalty`` times its count there (None when both are
    0). The answer is counted here, not by the engine: each decision is a fresh engine request whose
    prompt is the whole prefix, and vLLM counts only a request's own output tokens."""
    if not presence_penalty and not frequency_penalty:
        return None
    counts = Counter(answer)
    return [presence_penalty * (counts[z] > 0) + frequency_penalty * counts[z] for z in candidates]


def nucleus(sft_logprobs: Sequence[float], top_p: float) -> int:
    """How many of the candidates (most likely first) ``top_p`` keeps: the smallest prefix whose SFT
    probability mass reaches ``top_p`` (at least one)."""
    if top_p >= 1.0:
        return len(sft_logprobs)
    mass = 0.0
    for i, lp in enumerate(sft_logprobs):
        mass += math.exp(lp)
        if mass >= top_p:
            return i + 1
    return len(sft_logprobs)


class TransferQLogitsProcessor:
    """A ``transformers`` logits processor applying the TQ* rule: keeps the SFT model's top-k tokens and
    adds ``Q(s, z) / alpha`` to their log-probabilities.

    ``value_fn(input_ids, candidate_ids) -> list[float]`` gives Q for the candidates of one row (for
    example rollouts of a baseline model scored by a reward). Pass it in a ``LogitsProcessorList``:

        >>> from transformers import LogitsProcessorList
        >>> proc = TransferQLogitsProcessor(lambda ids, cands: [0.0] * len(cands), top_k=10, alpha=1.0)
        >>> out = model.generate(input_ids, logits_processor=LogitsProcessorList([proc]),
        ...                      do_sample=False)  # doctest: +SKIP

    The input scores are not modified; a new tensor is returned.
    """

    def __init__(
        self, value_fn: Callable[[list[int], list[int]], Sequence[float]], top_k: int = 10, alpha: float = 1.0
    ):
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}; a large alpha stays close to the SFT model")
        self.value_fn = value_fn
        self.top_k = top_k
        self.alpha = alpha

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        top_values, top_ids = logprobs.topk(min(self.top_k, logprobs.shape[-1]), dim=-1)
        out = torch.full_like(scores, -math.inf)
        for row in range(scores.shape[0]):
            candidates = top_ids[row].tolist()
            values = self.value_fn(input_ids[row].tolist(), candidates)
            rule = reweight(candidates, top_values[row].tolist(), list(values), self.alpha)
            out[row, top_ids[row]] = torch.tensor(rule.logprobs, dtype=out.dtype, device=out.device)
        return out


def transfer_q_logits(
    logits: torch.Tensor, candidate_ids: torch.Tensor, values: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """The same rule as :func:`reweight`, batched over rows and written as new logits, for engines that
    sample from logits themselves (alignd's vLLM plugin applies it inside vLLM's decode step).

    ``logits`` [B, V], ``candidate_ids`` [B, k] (distinct token ids per row), ``values`` [B, k] (Q of
    each candidate), ``alpha`` [B] (> 0; checked where requests are admitted, not here: a check would
    cost a device synchronisation every step). Returns new float32 logits [B, V]: each candidate gets
    ``log_softmax(logits)[z] + Q(z) / alpha``, every other token ``-inf``. Their softmax is exactly
    :func:`reweight`'s distribution over the candidates, so greedy decoding takes its argmax and
    sampling at temperature 1 samples it. A candidate whose value is ``-inf`` is dropped: rows of one
    batch with fewer candidates pad ``values`` with ``-inf``.

    The input is not modified."""
    if logits.dim() != 2 or candidate_ids.shape != values.shape or candidate_ids.dim() != 2:
        raise ValueError(
            f"expected logits [B, V] and candidate_ids, values [B, k]; got {tuple(logits.shape)}, "
            f"{tuple(candidate_ids.shape)}, {tuple(values.shape)}"
        )
    if candidate_ids.shape[0] != logits.shape[0] or alpha.shape != (logits.shape[0],):
        raise ValueError(
            f"expected {logits.shape[0]} rows of candidates and one alpha per row; got "
            f"{candidate_ids.shape[0]} and alpha of shape {tuple(alpha.shape)}"
        )
    logits = logits.float()
    # log_softmax at the candidates only: the normaliser once per row, no [B, V] log-probability tensor
    sft_logprobs = logits.gather(1, candidate_ids) - torch.logsumexp(logits, dim=-1, keepdim=True)
    values = values.float()
    # -inf stays -inf whatever alpha is (a plain division by an infinite alpha would give NaN)
    scaled = torch.where(torch.isneginf(values), values, values / alpha.float().unsqueeze(1))
    out = torch.full_like(logits, -math.inf)
    return out.scatter_(1, candidate_ids, sft_logprobs + scaled)
