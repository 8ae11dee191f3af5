"""Seeded sampling that does not use vLLM's per-request generator, so that it survives chunked prefill.

Why: vLLM 0.32 gives each request with a ``seed`` its own ``torch.Generator``, and after a step that
sampled a token it then discards (a partial prefill of a long prompt, with chunked prefill on) it
rewinds that generator with ``gen.set_offset(gen.get_offset() - 4)``
(``vllm/v1/worker/gpu_model_runner.py``, ``_bookkeeping_sync``; introduced by vllm-project/vllm#10097,
"relies on cuda-specific torch-internal impl details"). CPU generators have no offset: the call raises
``RuntimeError: CPU Generator does not use offset`` in the engine core, which dies with every request.

How: alignd's engine sends vLLM no seed. It asks for a greedy request and passes the sampling parameters
in ``SamplingParams.extra_args`` under the keys below; alignd's logits processor (loaded into every vLLM
engine by the ``vllm.logits_processors`` entry point) then turns the row's logits into

    (logits - presence * [count > 0] - frequency * count) / temperature,  outside the top-p nucleus -inf,
    + Gumbel noise drawn from a generator seeded by (seed, number of tokens generated so far)

and vLLM's argmax of that is an exact sample of the tempered, nucleus-truncated, penalised distribution
(the Gumbel-max trick). The noise of a step depends only on the seed and the step: a discarded step
draws the same noise again, and nothing has to be rewound. Prompt log-probabilities and the returned
``logprobs`` are vLLM's raw ones (computed before any processor), as for every request.

This module is imported inside vLLM's worker processes (``alignd.vllm_plugin``): keep it to torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

SEED_KEY = "alignd_seed"
TEMPERATURE_KEY = "alignd_temperature"
TOP_P_KEY = "alignd_top_p"
PRESENCE_PENALTY_KEY = "alignd_presence_penalty"
FREQUENCY_PENALTY_KEY = "alignd_frequency_penalty"

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SeededSampling:
    seed: int
    temperature: float
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def extra_args(self) -> dict[str, Any]:
        return {
            SEED_KEY: self.seed,
            TEMPERATURE_KEY: self.temperature,
            TOP_P_KEY: self.top_p,
            PRESENCE_PENALTY_KEY: self.presence_penalty,
            FREQUENCY_PENALTY_KEY: self.frequency_penalty,
        }


def seeded_sampling_request(extra_args: Mapping[str, Any] | None) -> SeededSampling | None:
    """The request's seeded sampling from ``SamplingParams.extra_args``; None when it asks for none. A
    ``ValueError`` names a bad value."""
    if not extra_args or SEED_KEY not in extra_args:
        return None
    seed = extra_args[SEED_KEY]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{SEED_KEY} must be an integer, got {seed!r}")
    numbers = {
        key: extra_args.get(key, default)
        for key, default in (
            (TEMPERATURE_KEY, 1.0),
            (TOP_P_KEY, 1.0),
            (PRESENCE_PENALTY_KEY, 0.0),
            (FREQUENCY_PENALTY_KEY, 0.0),
        )
    }
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
    if numbers[TEMPERATURE_KEY] <= 0:
        raise ValueError(
            f"{TEMPERATURE_KEY} must be > 0 (a greedy request needs no seed), got {numbers[TEMPERATURE_KEY]}"
        )
    if not 0 < numbers[TOP_P_KEY] <= 1:
        raise ValueError(f"{TOP_P_KEY} must be in (0, 1], got {numbers[TOP_P_KEY]}")
    return SeededSampling(
        seed,
        float(numbers[TEMPERATURE_KEY]),
        float(numbers[TOP_P_KEY]),
        float(numbers[PRESENCE_PENALTY_KEY]),
        float(numbers[FREQUENCY_PENALTY_KEY]),
    )


def _step_seed(seed: int, step: int) -> int:
    """One 63-bit seed per (seed, step): splitmix64 of the pair, so nearby seeds and steps draw unrelated noise."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def gumbel_noise(seed: int, step: int, size: int) -> torch.Tensor:
    """Standard Gumbel noise of ``size`` tokens for step ``step`` of a request seeded with ``seed`` (float32,
    on the CPU): the same numbers for the same (seed, step), whatever else ran."""
    generator = torch.Generator().manual_seed(_step_seed(seed, step))
    uniform = torch.rand(size, generator=generator, dtype=torch.float64).clamp_(min=1e-300)
    return (-torch.log(-torch.log(uniform))).float()


def sampling_scores(logits: torch.Tensor, output_ids: Sequence[int], sampling: SeededSampling) -> torch.Tensor:
    """One row's scores whose argmax is its seeded sample at this step (module docstring). ``logits``: [V]."""
    scores = logits.float().clone()
    if output_ids and (sampling.presence_penalty or sampling.frequency_penalty):
        counts = torch.bincount(torch.tensor(list(output_ids), dtype=torch.long), minlength=scores.shape[0])
        counts = counts[: scores.shape[0]].to(scores.device, scores.dtype)
        scores -= sampling.frequency_penalty * counts + sampling.presence_penalty * (counts > 0).to(scores.dtype)
    scores /= sampling.temperature
    if sampling.top_p < 1.0:
        ordered, order = scores.sort(descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        outside = cumulative - ordered.softmax(-1) >= sampling.top_p  # tokens after the nucleus is full
        outside[0] = False  # at least the most likely token
        scores[order[outside]] = -math.inf
    return scores + gumbel_noise(sampling.seed, len(output_ids), scores.shape[0]).to(scores.device)
