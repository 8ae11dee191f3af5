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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Reweighted:
    """The decoding distribution over the candidates of one step."""

    token_ids: list[int]
    sft_logprobs: list[float]
    values: list[float]
    logprobs: list[float]  # log pi(z | s), normalised over the candidates

    @property
    def kl_from_sft(self) -> float:
        """KL(pi || pi_sft), exact: pi is zero outside the candidate set, and pi_sft(z) is the SFT
        model's own (full-vocabulary) probability of each candidate."""
        return sum(math.exp(lp) * (lp - s) for lp, s in zip(self.logprobs, self.sft_logprobs) if lp > -math.inf)

    def greedy_index(self) -> int:
        # Ties go to the SFT model's preferred (earlier) candidate, so alpha -> inf reproduces SFT greedy.
        best = max(self.logprobs)
        return next(i for i, lp in enumerate(self.logprobs) if lp == best)

    def sample_index(self, generator: torch.Generator | None, temperature: float = 1.0) -> int:
        logits = torch.tensor(self.logprobs, dtype=torch.float64) / max(temperature, 1e-6)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))


def reweight(token_ids: Sequence[int], sft_logprobs: Sequence[float], values: Sequence[float], alpha: float) -> Reweighted:
    """``log pi(z) = log pi_sft(z) + Q(z)/alpha - logsumexp`` over the candidates."""
    if math.isnan(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be > 0 (got {alpha}); use a large alpha to stay close to the SFT model")
    if not (len(token_ids) == len(sft_logprobs) == len(values)) or not token_ids:
        raise ValueError("token_ids, sft_logprobs and values must be non-empty and of equal length")
    scale = 0.0 if alpha == math.inf else 1.0 / alpha
    scores = torch.tensor(sft_logprobs, dtype=torch.float64) + scale * torch.tensor(values, dtype=torch.float64)
    logprobs = torch.log_softmax(scores, dim=-1)
    return Reweighted(list(token_ids), list(sft_logprobs), list(values), logprobs.tolist())


class TransferQLogitsProcessor:
    """A ``transformers`` logits processor applying the TQ* rule: keeps the SFT model's top-k tokens and
    adds ``Q(s, z) / alpha`` to their log-probabilities.

    ``value_fn(input_ids, candidate_ids) -> list[float]`` gives Q for the candidates of one row (for
    example rollouts of a baseline model scored by a reward). Pass it in a ``LogitsProcessorList``:

        >>> from transformers import LogitsProcessorList
        >>> proc = TransferQLogitsProcessor(lambda ids, cands: [0.0] * len(cands), top_k=10, alpha=1.0)
        >>> out = model.generate(input_ids, logits_processor=LogitsProcessorList([proc]), do_sample=False)  # doctest: +SKIP

    The input scores are not modified; a new tensor is returned.
    """

    def __init__(self, value_fn: Callable[[list[int], list[int]], Sequence[float]], top_k: int = 10, alpha: float = 1.0):
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
