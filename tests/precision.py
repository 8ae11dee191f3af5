"""What precision the test engines compute in, and the error that follows, measured rather than assumed.

``ALIGND_DTYPE=auto`` serves float32 on CPUs without native bfloat16 kernels and bfloat16 elsewhere (CPUs
with AVX-512 BF16 or AMX, every GPU; alignd.models.platform). The tests' exact comparisons (greedy answers
against a rule computed by hand in float32 transformers, a batched answer against the same request alone)
hold in float32, where two computations of a log-probability differ by about 1e-5. In bfloat16 they
differ by tenths of a nat (8 bits of mantissa; the matmul shape, so the batch, changes the rounding), so
a greedy step whose best two candidates are that close can go either way. Those tests then accept a
different choice only where the float32 reference says it was that close, with the bound computed from
an error measured on the engine under test (:func:`measure_logprob_error`), printed, not guessed.

The bounds: if two computations A and B of the same log-probabilities are each within ``e`` of the exact
ones, and A's greedy step picked ``x`` where B picked ``y``, then A's own gap ``lp_A(x) - lp_A(y)`` is at
most ``4e`` (both gaps are within ``2e`` of the exact gap, and have opposite signs). Against a float32
reference (error ~0), the served engine's choice ``y`` is acceptable where the reference's gap is at most
``2e``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=1)
def served_dtype() -> str:
    """The dtype the session server and the in-process engine compute in (ALIGND_DTYPE resolved here, in
    the same environment the test servers inherit)."""
    from alignd.models.platform import engine_dtype
    from alignd.settings import Settings

    return engine_dtype(Settings().dtype)


def is_exact() -> bool:
    """Whether the served engines compute in float32, where the tests' exact comparisons hold."""
    return served_dtype() == "float32"


@dataclass(frozen=True)
class MeasuredError:
    """The largest (and median) absolute difference between the engine's top log-probabilities and
    float32 transformers' at the same prefixes, over ``samples`` numbers."""

    dtype: str
    max: float
    median: float
    samples: int

    def near_tie_between_runs(self, float32_bound: float) -> float:
        """Largest gap at which two runs of this engine may pick differently: ``float32_bound`` (the
        test's own, for float32) or 4 x the measured error (module docstring)."""
        return float32_bound if self.dtype == "float32" else max(float32_bound, 4 * self.max)

    def __str__(self) -> str:
        return (
            f"{self.dtype} engine vs float32 transformers: log-probability error max {self.max:.4f}, "
            f"median {self.median:.4f} nats over {self.samples} top-5 entries"
        )


def measure_logprob_error(
    served: Sequence[Sequence[dict[int, float]]], reference: Sequence[Sequence[dict[int, float]]], dtype: str
) -> MeasuredError:
    """``served[i][t]`` and ``reference[i][t]``: token id -> log-probability at step t of answer i, the
    engine's and float32 transformers' (the ids compared are those both list)."""
    gaps = [
        abs(step[token] - ref[token])
        for answer, ref_answer in zip(served, reference, strict=True)
        for step, ref in zip(answer, ref_answer, strict=True)
        for token in step
        if token in ref
    ]
    if not gaps:
        raise ValueError("no log-probabilities to compare")
    return MeasuredError(dtype, max(gaps), statistics.median(gaps), len(gaps))


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first step where two token sequences differ (None if one is a prefix of the other)."""
    for step, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return step
    return None


def assert_same_greedy_answer(
    expected: Sequence[int], expected_top: Sequence[dict[int, float]], got: Sequence[int], near_tie: float
) -> None:
    """``got`` is the greedy answer ``expected`` (whose step t had the top log-probabilities
    ``expected_top[t]``), except that it may part from it at a step where ``expected``'s choice and
    ``got``'s were within ``near_tie`` nats (after which the prefixes differ and nothing more is compared).
    ``near_tie`` 0: identical."""
    step = first_divergence(expected, got)
    if step is None:
        n = min(len(expected), len(got))
        assert len(expected) == len(got) or near_tie > 0, (expected, got)
        assert expected[:n] == got[:n]
        return
    assert near_tie > 0, f"step {step}: {got[step]} instead of {expected[step]} ({expected} vs {got})"
    top = expected_top[step]
    assert got[step] in top, f"step {step}: {got[step]} is not among {sorted(top)}"
    gap = top[expected[step]] - top[got[step]]
    assert gap <= near_tie, (
        f"step {step}: {got[step]} instead of {expected[step]}, {gap:.3f} nats apart > {near_tie:.3f}"
    )


def teacher_forced_logprobs(model, prompt: Sequence[int], answer: Sequence[int]):
    """A transformers model's log-probabilities of the next token at each answer step, [len(answer), vocab]
    (float32 whatever the model computes in)."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([[*prompt, *answer]])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) + len(answer) - 1]
    return torch.log_softmax(logits.float(), dim=-1)


def bfloat16_token_errors(model, prompt: Sequence[int], answer: Sequence[int]) -> list[float]:
    """How far a bfloat16 copy of the float32 transformers ``model`` scores each answer token from the
    model itself: the rounding error of that model in bfloat16, on that text."""
    import copy

    import torch

    low = copy.deepcopy(model).to(torch.bfloat16)
    exact = teacher_forced_logprobs(model, prompt, answer)
    rounded = teacher_forced_logprobs(low, prompt, answer)
    return [abs(float(rounded[i, t]) - float(exact[i, t])) for i, t in enumerate(answer)]
