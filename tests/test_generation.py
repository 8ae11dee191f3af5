"""The one door to generation (``alignd.decoding.generation.Generation``) on a tiny random model built in
the test: plain decoding, plain decoding with diagnostics, the checks a plan makes, typed diagnostics.
No server; the same door serves every endpoint (tests/test_server*.py go through it over HTTP)."""

from __future__ import annotations

import asyncio

import pytest

from alignd.decoding.config import DecodingConfig
from alignd.decoding.generation import ALIGNED, PLAIN, Generation
from alignd.errors import ClientError
from alignd.models.engine import GenerationParams
from alignd.protocol.diagnostics import AlignmentSummary, BestOfNStep, ValueGuidedStep
from alignd.rewards.registry import build_rewards
from alignd.settings import Settings

PROMPT = "hello world how are"


@pytest.fixture(scope="module")
def generation(tiny_hf_engine):
    settings = Settings()
    registry = asyncio.run(build_rewards(settings, tiny_hf_engine))
    return Generation(tiny_hf_engine, registry, settings)


def answer(generation: Generation, params: GenerationParams, decoding: DecodingConfig | None = None):
    plan = generation.plan(generation.render_text(PROMPT), params, decoding)

    async def go():
        deltas = [d async for d in generation.stream(plan, "t")]
        whole = await generation.generate(plan, "t")
        return deltas, whole

    return asyncio.run(go())


def test_plain_stream_assembles_text_and_applies_stop_strings(generation):
    params = GenerationParams(max_tokens=16, temperature=0.0)
    deltas, whole = answer(generation, params)
    choice = whole.choices[0]
    assert "".join(d.text for d in deltas) == choice.text == generation.decode(choice.token_ids)
    assert choice.text and choice.alignment is None

    stop = choice.text.strip()[3:6]
    assert stop, "greedy text too short for a stop string"
    deltas, stopped = answer(generation, GenerationParams(max_tokens=16, temperature=0.0, stop=(stop,)))
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == choice.text[: choice.text.find(stop)]
    assert "".join(d.text for d in deltas) == stopped.choices[0].text


def test_sft_with_diagnostics_keeps_every_sampling_field(generation):
    """Diagnostics only add the summary: a seeded answer with top_p, stop and penalties is the same."""
    params = GenerationParams(
        max_tokens=24, temperature=0.9, top_p=0.8, seed=7, presence_penalty=0.6, frequency_penalty=0.8
    )
    _, free = answer(generation, params)
    stop = free.choices[0].text[5:8]
    params = GenerationParams(**{**params.__dict__, "stop": (stop,)}) if stop.strip() else params
    _, plain = answer(generation, params)
    _, diagnosed = answer(generation, params, DecodingConfig(method="sft", diagnostics=True))
    assert diagnosed.choices[0].token_ids == plain.choices[0].token_ids
    assert diagnosed.choices[0].text == plain.choices[0].text
    assert diagnosed.choices[0].finish_reason == plain.choices[0].finish_reason
    summary = diagnosed.choices[0].alignment
    assert isinstance(summary, AlignmentSummary)
    assert summary.method == "sft" and summary.kl == 0.0 and summary.steps == []


def test_plans_choose_the_family_once(generation):
    prompt = generation.render_text(PROMPT)
    params = GenerationParams(max_tokens=4, temperature=0.0)
    assert generation.plan(prompt, params, None).family == PLAIN
    assert generation.plan(prompt, params, DecodingConfig(method="sft", diagnostics=True)).family == PLAIN
    tq = generation.plan(prompt, params, DecodingConfig(method="transfer_q"))
    assert tq.family == ALIGNED
    assert tq.decoding.top_k == Settings().decoding_top_k  # resolved from the settings


@pytest.mark.parametrize(
    ("decoding", "params", "param"),
    [
        (DecodingConfig(method="cd", cd_mode="block"), dict(frequency_penalty=0.5), "frequency_penalty"),
        (DecodingConfig(method="transfer_q", block_size=4), dict(presence_penalty=0.5), "decoding.block_size"),
        (DecodingConfig(method="args"), dict(logprobs=2), "logprobs"),
        (DecodingConfig(method="transfer_q", reward="nope"), {}, "reward"),
    ],
)
def test_plans_refuse_what_a_method_cannot_honour(generation, decoding, params, param):
    with pytest.raises(ClientError) as err:
        generation.plan(
            generation.render_text(PROMPT), GenerationParams(max_tokens=4, temperature=0.0, **params), decoding
        )
    assert err.value.param == param and 400 <= err.value.status < 500
    assert len(err.value.message) > 40  # says why, not just "invalid"


def test_diagnostics_are_typed_per_method_family(generation):
    params = GenerationParams(max_tokens=3, temperature=0.0, frequency_penalty=1.0)
    _, tq = answer(generation, params, DecodingConfig(method="args", top_k=3, diagnostics=True))
    summary = tq.choices[0].alignment
    assert summary.method == "args" and summary.cost.decisions == len(summary.steps) >= 1
    assert all(isinstance(s, ValueGuidedStep) and len(s.candidates) == 3 for s in summary.steps)
    # the JSON an API returns parses back into the same typed summary
    assert AlignmentSummary.model_validate_json(summary.model_dump_json()) == summary

    _, bon = answer(
        generation,
        GenerationParams(max_tokens=3, temperature=0.0),
        DecodingConfig(method="best_of_n", num_samples=3, diagnostics=True),
    )
    (step,) = bon.choices[0].alignment.steps
    assert isinstance(step, BestOfNStep) and len(step.candidates) == 3
    assert step.chosen == bon.choices[0].token_ids
