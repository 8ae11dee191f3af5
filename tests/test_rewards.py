"""The reward layer without a server: programmatic rewards, a tiny classifier through the real
loading path, the implicit reward on a tiny model against a hand computation, weighted sums."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from alignd.errors import ConfigurationError, ContextLengthError, RewardFailedError, RewardNotFoundError
from alignd.models.chat import with_system_prompt
from alignd.rewards.base import RewardItem
from alignd.rewards.implicit import ImplicitReward
from alignd.rewards.programmatic import CallableReward, LengthPenaltyReward, PositivityReward
from alignd.rewards.registry import build_rewards
from alignd.server.rewards.protocol import bradley_terry
from alignd.settings import Settings

WARM = "What a wonderful question! I'm happy to help, and I love how curious you are. Thank you!"
HOSTILE = "That is a stupid question. I hate answering idiots like you. Go away."


def score(reward, items, **kw):
    return asyncio.run(reward.score(items, **kw))


def test_positivity_ranks_a_warm_answer_above_a_hostile_one():
    warm, hostile = score(PositivityReward(), [RewardItem(WARM, prompt="Hi"), RewardItem(HOSTILE, prompt="Hi")])
    assert warm.value > 0.5 > -0.5 > hostile.value


def test_length_penalty_is_zero_within_budget_then_linear():
    reward = LengthPenaltyReward(per_word=0.5, free_words=3)
    values = [s.value for s in score(reward, [RewardItem("a b c", prompt="x"), RewardItem("a b c d e", prompt="x")])]
    assert values == [0.0, -1.0]
    with pytest.raises(ConfigurationError):
        LengthPenaltyReward(per_word=-1)


def test_bradley_terry_is_the_sigmoid_of_the_gap():
    assert bradley_terry(2.0, 0.5) == pytest.approx(1 / (1 + math.exp(-1.5)))
    assert bradley_terry(0.0, 0.0) == 0.5
    assert bradley_terry(-1000.0, 1000.0) == 0.0 and bradley_terry(1000.0, -1000.0) == 1.0


def test_callable_rewards_by_import_path():
    plain = CallableReward("exclaim", "reward_plugins:exclamation_count")
    batched = CallableReward("len", "reward_plugins:batched_length", batched=True)
    items = [RewardItem("wow!!", prompt="p"), RewardItem("ok", prompt="p")]
    assert [s.value for s in score(plain, items)] == [2.0, 0.0]
    assert [s.value for s in score(batched, items)] == [5.0, 2.0]
    with pytest.raises(RewardFailedError, match="the reward backend is down"):
        score(CallableReward("broken", "reward_plugins:broken"), items)
    for bad_path in ("no_colon", "reward_plugins:missing", "no_such_module:fn"):
        with pytest.raises(ConfigurationError):
            CallableReward("bad", bad_path)


def test_system_prompt_is_merged_with_the_users_own():
    assert with_system_prompt([{"role": "user", "content": "q"}], "Be warm.") == [
        {"role": "system", "content": "Be warm."},
        {"role": "user", "content": "q"},
    ]
    merged = with_system_prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}], "Be warm."
    )
    assert merged[0] == {"role": "system", "content": "Be warm.\n\nBe brief."} and len(merged) == 2


def test_implicit_reward_equals_the_hand_computed_log_ratio(tiny_hf_engine):
    """beta * (log pi_aligned(y|x) - log pi_ref(y|x)), with the prompted baseline as the aligned model,
    computed here from plain forward passes of the same model."""
    beta = 0.3
    reward = ImplicitReward(
        "imp",
        aligned=tiny_hf_engine,
        reference=tiny_hf_engine,
        beta=beta,
        aligned_system_prompt="a happy answer is kind",
    )
    item = RewardItem("the cat sat on the mat", prompt="hello world")
    [result] = score(reward, [item], token_values=True)

    tok = tiny_hf_engine.tokenizer
    response = tiny_hf_engine.encode(item.response)

    def logprob_sum(messages):
        prefix = tok.encode(
            tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False
        )
        ids = torch.tensor([prefix + response])
        with torch.inference_mode():
            lp = torch.log_softmax(tiny_hf_engine.model(input_ids=ids).logits[0].float(), -1)
        return sum(float(lp[len(prefix) - 1 + j, t]) for j, t in enumerate(response))

    aligned = logprob_sum(
        [{"role": "system", "content": "a happy answer is kind"}, {"role": "user", "content": "hello world"}]
    )
    reference = logprob_sum([{"role": "user", "content": "hello world"}])
    assert result.value == pytest.approx(beta * (aligned - reference), abs=1e-4)
    assert len(result.token_values) == len(response) == len(result.tokens)
    assert sum(result.token_values) == pytest.approx(result.value, abs=1e-5)
    assert result.value != 0.0


def test_implicit_reward_context_limit_and_truncation(tiny_hf_engine):
    reward = ImplicitReward("imp", aligned=tiny_hf_engine, reference=tiny_hf_engine, aligned_system_prompt="be kind")
    too_long = RewardItem("one two three " * 200, prompt="hi")
    with pytest.raises(ContextLengthError, match="truncate"):
        score(reward, [too_long])
    [cut] = score(reward, [too_long], truncate=True)
    assert cut.truncated and math.isfinite(cut.value)


def test_classifier_loads_through_the_registry_and_scores(tiny_classifier_dir, tiny_hf_engine):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    settings = Settings(rewards={"rm": {"type": "classifier", "model": str(tiny_classifier_dir), "backend": "hf"}})
    registry = asyncio.run(build_rewards(settings, tiny_hf_engine))
    reward = registry.get("rm")
    items = [
        RewardItem("the cat sat", prompt="hello"),
        RewardItem("a happy answer", prompt="how are you"),
        RewardItem(
            "one two", messages=({"role": "system", "content": "numbers"}, {"role": "user", "content": "count"})
        ),
    ]
    values = [s.value for s in score(reward, items)]

    # the same texts through a model loaded independently, one at a time (no padding)
    tok = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    expected = []
    for item in items:
        text = tok.apply_chat_template(item.chat() + [{"role": "assistant", "content": item.response}], tokenize=False)
        with torch.inference_mode():
            expected.append(float(model(**tok(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0]))
    assert values == pytest.approx(expected, abs=1e-4)
    assert len(set(round(v, 6) for v in values)) == 3  # a real (random) head, not a constant

    with pytest.raises(ContextLengthError):
        score(reward, [RewardItem("cat " * 500, prompt="x")])
    [cut] = score(reward, [RewardItem("cat " * 500, prompt="x")], truncate=True)
    assert cut.truncated


def test_registry_defaults_unknown_names_and_weighted_sums(tiny_hf_engine):
    settings = Settings(rewards={"mix": {"type": "weighted_sum", "terms": {"positivity": 2.0, "length_penalty": 1.0}}})
    registry = asyncio.run(build_rewards(settings, tiny_hf_engine))
    assert {"positivity", "length_penalty", "prompted_implicit", "mix"} <= set(registry.names())
    with pytest.raises(RewardNotFoundError, match="positivity"):
        registry.get("nope")
    items = [RewardItem(WARM, prompt="hi")]
    pos = score(registry.get("positivity"), items)[0].value
    length = score(registry.get("length_penalty"), items)[0].value
    assert score(registry.get("mix"), items)[0].value == pytest.approx(2 * pos + length)
    for bad in (
        {"x": {"type": "weird"}},
        {"x": {"type": "weighted_sum", "terms": {"missing": 1}}},
        {"x": {"type": "implicit"}},
        {"x": {"type": "classifier"}},
    ):
        with pytest.raises(ConfigurationError):
            asyncio.run(build_rewards(Settings(rewards=bad), tiny_hf_engine))
