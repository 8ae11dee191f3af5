"""Implicit reward of an aligned model against its reference (DPO / the IRL seed):

    r(x, y) = beta * (log pi_aligned(y | x) - log pi_ref(y | x)),

a sum over the response tokens, each token contributing ``beta * (lp_aligned - lp_ref)``. The aligned
model may be a separate model, or the reference model itself with an alignment system prompt (a
"prompted baseline"): then both terms come from one engine, in one batched call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from alignd.errors import ConfigurationError, ContextLengthError
from alignd.models.chat import with_system_prompt
from alignd.models.engine import Engine
from alignd.rewards.base import Reward, RewardItem, RewardScore


class ImplicitReward(Reward):
    kind = "implicit"
    supports_token_values = True

    def __init__(
        self,
        name: str,
        *,
        aligned: Engine,
        reference: Engine,
        beta: float = 0.1,
        aligned_system_prompt: str | None = None,
        description: str = "",
    ) -> None:
        if beta <= 0:
            raise ConfigurationError(f"implicit reward '{name}' needs beta > 0, got {beta}")
        if aligned is not reference:
            probe = "Tokenizers must agree: 123 héllo\n"
            if aligned.info.vocab_size != reference.info.vocab_size or aligned.encode(probe) != reference.encode(probe):
                raise ConfigurationError(
                    f"implicit reward '{name}': the aligned and reference models use different tokenizers"
                )
        self.name = name
        self.aligned = aligned
        self.reference = reference
        self.beta = beta
        self.aligned_system_prompt = aligned_system_prompt
        self.description = description or f"beta * log(pi_aligned / pi_ref), beta={beta}"

    def _fit(self, prefix_len: int, response: list[int], truncate: bool, max_len: int) -> tuple[list[int], bool]:
        room = max_len - prefix_len
        if len(response) <= room:
            return response, False
        if not truncate or room <= 0:
            raise ContextLengthError(
                f"reward '{self.name}': prompt ({prefix_len} tokens) plus response ({len(response)} tokens) exceed "
                f'the model\'s context of {max_len} tokens; shorten them, or send "truncate": true to score '
                "only the first part of the response",
                param="items",
            )
        return response[:room], True

    async def score(self, items: Sequence[RewardItem], *, token_values=False, truncate=False):
        ref_prefixes, aligned_prefixes, responses, truncated = [], [], [], []
        max_len = min(self.aligned.info.max_model_len, self.reference.info.max_model_len)
        for item in items:
            chat = item.chat()
            ref_prefix = self.reference.render_chat(chat)
            aligned_prefix = self.aligned.render_chat(with_system_prompt(chat, self.aligned_system_prompt))
            response = self.reference.encode(item.response)
            response, cut = self._fit(max(len(ref_prefix), len(aligned_prefix)), response, truncate, max_len)
            ref_prefixes.append(ref_prefix)
            aligned_prefixes.append(aligned_prefix)
            responses.append(response)
            truncated.append(cut)
        aligned_lp, ref_lp = await asyncio.gather(
            self.aligned.continuation_logprobs(aligned_prefixes, responses),
            self.reference.continuation_logprobs(ref_prefixes, responses),
        )
        out = []
        for response, a, r, cut in zip(responses, aligned_lp, ref_lp, truncated, strict=False):
            per_token = [self.beta * (x - y) for x, y in zip(a, r, strict=False)]
            score = RewardScore(sum(per_token), truncated=cut)
            if token_values:
                score.tokens = [self.reference.decode([t]) for t in response]
                score.token_values = per_token
            out.append(score)
        return out
