"""TQ* with the implicit value source (``decoding.value='implicit'``): the exact token-level Q of a DPO
baseline, ``beta * (log pi_BL - log pi_SFT)``, on the tiny model in float32 (the transformers engine; the
baseline is a random LoRA adapter whose manifest says DPO with beta 0.2), checked against the merged
baseline's own greedy decoding and against the rule computed by hand in transformers; and the 400s that
say what is missing."""

from __future__ import annotations

import asyncio

import pytest
import torch
from support import TINY_ADAPTER_BETA as BETA
from support import door_on_own_loop, make_adapter

from alignd.decoding.config import DecodingConfig
from alignd.decoding.generation import Generation
from alignd.decoding.values import ImplicitValue
from alignd.errors import InvalidRequestError
from alignd.models.engine import GenerationParams
from alignd.settings import Settings

PROMPTS = ["hello world how are", "the cat sat on", "numbers one two", "a happy answer is"]
STEPS = 10


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("implicit-adapters")
    return {
        "dpo": str(make_adapter(tiny_llama_dir, root / "dpo", seed=5)),
        "sft_lora": str(make_adapter(tiny_llama_dir, root / "sft", seed=6, manifest={"kind": "sft"})),
        "no_digest": str(
            make_adapter(tiny_llama_dir, root / "nodigest", seed=7, manifest={"base_model": {"name": "tiny"}})
        ),
    }


@pytest.fixture(scope="module")
def stack(tiny_hf_engine, adapters):
    """The door over the tiny transformers engine, with the DPO adapter as the default baseline."""
    settings = Settings(
        engine="hf",
        baseline_adapter=adapters["dpo"],
        value_head="none",
        baselines={"sft_lora": {"adapter": adapters["sft_lora"]}, "no_digest": {"adapter": adapters["no_digest"]}},
    )
    with door_on_own_loop(tiny_hf_engine, settings) as opened:
        yield opened


def decode(stack, prompt: str, decoding: dict | None, max_tokens: int = STEPS):
    generation, loop = stack
    plan = generation.plan(
        generation.render_text(prompt),
        GenerationParams(max_tokens=max_tokens, temperature=0.0),
        DecodingConfig(**decoding) if decoding is not None else None,
    )
    return loop.run_until_complete(generation.generate(plan, "t")).choices[0]


def test_at_alpha_beta_over_the_whole_vocabulary_it_is_the_baseline_token_for_token(stack):
    implicit = {"method": "transfer_q", "value": "implicit", "top_k": 0, "diagnostics": True}
    changed = 0
    for prompt in PROMPTS:
        tq = decode(stack, prompt, implicit)  # alpha defaults to the baseline's beta
        baseline = decode(stack, prompt, {"method": "baseline"})
        assert tq.token_ids == baseline.token_ids, prompt
        changed += tq.token_ids != decode(stack, prompt, None).token_ids
        steps = tq.alignment.steps
        assert len(steps[0].candidates) == 20  # the whole vocabulary: its 20 most probable listed
        assert tq.alignment.value == "implicit" and tq.alignment.kl > 0 and tq.alignment.reward_name == "positivity"
    assert changed >= 2, "the adapter should change most greedy answers, or this test shows nothing"


def hand_rule(generation: Generation, prefix: list[int], alpha: float, top_k: int) -> tuple[int, dict[int, float]]:
    """argmax over the SFT model's top-k of log pi_SFT + Q / alpha, Q = beta (log pi_BL - log pi_SFT), both
    models' forward passes in transformers (the baseline: the adapter merged into a copy of the weights)."""
    sft_model = generation.engine.model
    baseline_model = generation.baselines.get("default").policy.engine.model
    with torch.no_grad():
        ids = torch.tensor([prefix])
        sft = torch.log_softmax(sft_model(ids).logits[0, -1].float(), -1)
        baseline = torch.log_softmax(baseline_model(ids).logits[0, -1].float(), -1)
    top = sft.topk(top_k).indices.tolist()
    q = {z: BETA * float(baseline[z] - sft[z]) for z in top}
    return max(top, key=lambda z: float(sft[z]) + q[z] / alpha), q


@pytest.mark.parametrize("alpha", [0.05, BETA, 1.0])
def test_every_step_is_the_rule_computed_by_hand(stack, alpha):
    generation, _ = stack
    for prompt in PROMPTS[:2]:
        choice = decode(
            stack,
            prompt,
            {"method": "transfer_q", "value": "implicit", "alpha": alpha, "top_k": 5, "diagnostics": True},
        )
        prefix = generation.render_text(prompt).token_ids
        for step, token in zip(choice.alignment.steps, choice.token_ids, strict=False):
            expected, q = hand_rule(generation, [*prefix, *choice.token_ids[: step.position]], alpha, 5)
            assert token == expected, f"{prompt!r} step {step.position}"
            for c in step.candidates:  # every diagnostic field filled, and consistent
                assert c.value == pytest.approx(q[c.token_id], abs=1e-5)
                assert c.value == pytest.approx(BETA * (c.baseline_logprob - c.sft_logprob), abs=1e-5)
                assert c.logprob is not None
            assert step.kl >= 0


def test_concurrent_requests_with_different_alphas_each_get_their_own(stack):
    generation, loop = stack
    configs = [{"method": "transfer_q", "value": "implicit", "alpha": a, "top_k": 5} for a in (0.05, 1.0)]
    alone = [decode(stack, PROMPTS[0], c).token_ids for c in configs]
    assert alone[0] != alone[1], "the two alphas should decode differently, or this test shows nothing"

    async def together():
        plans = [
            generation.plan(
                generation.render_text(PROMPTS[0]),
                GenerationParams(max_tokens=STEPS, temperature=0),
                DecodingConfig(**c),
            )
            for c in configs
        ]
        return await asyncio.gather(*(generation.generate(p, f"r{i}") for i, p in enumerate(plans)))

    assert [c.choices[0].token_ids for c in loop.run_until_complete(together())] == alone


def test_training_gets_the_implicit_estimator_from_the_door(stack):
    generation, _ = stack
    config, estimator = generation.value_estimator(DecodingConfig(method="transfer_q", value="implicit"))
    assert isinstance(estimator, ImplicitValue) and estimator.beta == BETA and config.alpha == BETA


@pytest.mark.parametrize(
    ("decoding", "says", "param"),
    [
        ({"baseline": "prompted"}, "system prompt, not a policy trained by DPO or IRFT", "decoding.baseline"),
        ({"baseline": "sft_lora"}, "was not trained by DPO or IRFT (its manifest's kind: sft)", "decoding.baseline"),
        ({"baseline": "no_digest"}, "no base-model weights digest", "decoding.baseline"),
        ({"beta": 0.5}, "trained with beta 0.2", "decoding.beta"),
        ({"reward": "length_penalty"}, "Q of the baseline's own reward, 'positivity'", "decoding.reward"),
        ({"rollout_len": 4}, "runs no rollouts: leave rollout_len unset", "decoding.rollout_len"),
        ({"transfer": "indirect"}, "direct transfer", "decoding"),
    ],
)
def test_what_it_cannot_serve_is_a_400_naming_the_cause(stack, decoding, says, param):
    generation, _ = stack
    with pytest.raises(InvalidRequestError) as refused:
        try:
            config = DecodingConfig(method="transfer_q", value="implicit", **decoding)
        except ValueError as invalid:  # a request the schema refuses (the server's 400 says the same)
            raise InvalidRequestError(str(invalid), param="decoding") from None
        generation.plan(generation.render_text("hi"), GenerationParams(max_tokens=2), config)
    assert says in refused.value.message and refused.value.param == param


def test_top_k_zero_is_the_implicit_source_s_only(stack):
    generation, _ = stack
    with pytest.raises(InvalidRequestError, match="only valid with decoding.value in"):
        generation.plan(
            generation.render_text("hi"),
            GenerationParams(max_tokens=2),
            DecodingConfig(method="transfer_q", value="rollouts", top_k=0),
        )
    with pytest.raises(ValueError):
        DecodingConfig(method="transfer_q", value="implicit", alpha=0.0)


@pytest.mark.parametrize("top_k", [5, 0])
def test_the_harness_replay_of_an_in_engine_answer_is_the_step_loop_s_own(stack, adapters, tiny_llama_dir, top_k):
    """eval/quality.py decodes implicit rows in vLLM's step and replays their KL in transformers (one pass of
    each model): replayed over answers alignd's own step loop decoded with diagnostics, it picks every token
    as the loop did and gives the loop's KL (an off-by-one position would fail both)."""
    import sys
    from pathlib import Path

    from alignd.models.loading import merge_adapter

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    import quality

    generation, _ = stack
    merged = merge_adapter(
        tiny_llama_dir, adapters["dpo"], Path(generation.settings.cache_dir).expanduser(), progress=False
    )
    replay = quality.ImplicitReplay(tiny_llama_dir, merged, BETA)
    overturned = 0
    for prompt in PROMPTS[:2]:
        choice = decode(
            stack,
            prompt,
            {"method": "transfer_q", "value": "implicit", "alpha": 0.05, "top_k": top_k, "diagnostics": True},
        )
        prefix = generation.render_text(prompt).token_ids
        replayed = replay(prefix, choice.token_ids, 0.05, top_k)
        assert replayed["agreement"] == 1.0
        assert replayed["kl"] == pytest.approx(choice.alignment.kl, rel=1e-4, abs=1e-5)
        # (over the whole vocabulary the diagnostics list the 20 most probable re-weighted candidates, which need
        # not hold SFT's top-1: the k 5 case checks the replay's steering against theirs)
        flips = [s.chosen[0] != max(s.candidates, key=lambda c: c.sft_logprob).token_id for s in choice.alignment.steps]
        if top_k:
            assert replayed["guidance"]["flip_share"] == pytest.approx(sum(flips) / len(flips))
        overturned += round(replayed["guidance"]["flip_share"] * len(flips))
        sft = decode(stack, prompt, None).token_ids
        if sft != choice.token_ids:
            assert replay(prefix, sft, 0.05, top_k)["agreement"] < 1.0
    assert overturned > 0, "the values never overturned SFT's choice: the test would not see a wrong position"


@pytest.mark.parametrize(
    ("manifest_alpha", "asked", "expected"), [(0.1, None, 0.1), (0.1, 0.5, 0.5), (None, None, None)]
)
def test_a_head_request_without_alpha_takes_the_head_s_own(stack, manifest_alpha, asked, expected):
    """A head distilled from implicit targets is in units of beta * log-ratio (alpha = beta reproduces the
    baseline), one from rollouts in reward units: alpha defaults to the alpha its manifest records, else the
    settings' (this engine's manifest is a stand-in, for planning only: the HF engine runs no head)."""
    import copy
    import dataclasses

    generation, _ = stack
    head = {
        "reward": "positivity",
        "alpha": manifest_alpha,
        "baseline": {"name": "prompted", "kind": "prompted", "source": generation.settings.baseline_system_prompt},
    }
    engine = copy.copy(generation.engine)
    engine.info = dataclasses.replace(engine.info, extra={**engine.info.extra, "value_head": head})
    with_head = Generation(engine, generation.rewards, generation.settings, generation.baselines)
    resolved = with_head.plan_decoding(DecodingConfig(method="transfer_q", value="head", alpha=asked))
    assert resolved.alpha == (expected if expected is not None else generation.settings.decoding_alpha)


@pytest.mark.parametrize(
    ("fields", "source"),
    [
        ({}, "implicit"),
        ({"top_k": 0}, "implicit"),  # (a 400 with rollouts: the whole vocabulary is the implicit source's)
        ({"alpha": 0.05, "beta": BETA, "reward": "positivity", "diagnostics": True}, "implicit"),
        ({"rollout_len": 4}, "rollouts"),
        ({"prune": False}, "rollouts"),
        ({"baseline": "prompted"}, "rollouts"),
        ({"baseline": "sft_lora"}, "rollouts"),
        ({"reward": "length_penalty"}, "rollouts"),
        ({"transfer": "indirect"}, "rollouts"),
        ({"beta": 0.5}, "rollouts"),
        ({"value": "rollouts"}, "rollouts"),
    ],
)
def test_a_request_that_names_no_value_source_gets_implicit_where_it_serves_it(stack, fields, source):
    """ALIGND_DECODING_VALUE=auto: the best measured source that serves the request as it stands, so no request
    that rollouts serve becomes a 400 (the cases that stay on rollouts are each a 400 with value='implicit')."""
    generation, _ = stack
    resolved = generation.plan_decoding(DecodingConfig(method="transfer_q", **fields))
    assert resolved.value == source
    if source == "implicit":
        assert resolved.alpha == fields.get("alpha", BETA)  # the implicit source's default: the baseline itself
    else:
        assert resolved.alpha == generation.settings.decoding_alpha


def test_auto_decodes_as_the_implicit_source_and_rollouts_only_is_a_setting(stack):
    generation, _ = stack
    bare = decode(stack, PROMPTS[0], {"method": "transfer_q", "top_k": 5, "diagnostics": True})
    assert bare.alignment.value == "implicit"
    assert (
        bare.token_ids == decode(stack, PROMPTS[0], {"method": "transfer_q", "value": "implicit", "top_k": 5}).token_ids
    )
    always = Generation(
        generation.engine,
        generation.rewards,
        generation.settings.model_copy(update={"decoding_value": "rollouts"}),
        generation.baselines,
    )
    assert always.plan_decoding(DecodingConfig(method="transfer_q")).value == "rollouts"
