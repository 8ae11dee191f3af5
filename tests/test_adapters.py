"""LoRA adapters as baselines and implicit rewards, on a tiny random model built in the test (the
transformers engine merges an adapter into a copy of its weights; the vLLM path is in
tests/test_vllm_adapters.py): loading checks, the ``baseline`` method, the baseline's implicit reward,
and the defaults a baseline gives indirect transfer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from support import TINY_ADAPTER_BETA as BETA
from support import make_adapter

from alignd.decoding.baselines import build_baselines
from alignd.decoding.config import DecodingConfig
from alignd.decoding.generation import PLAIN, Generation
from alignd.errors import ConfigurationError, NotFoundError
from alignd.models.adapters import load_adapter
from alignd.models.engine import GenerationParams
from alignd.rewards.base import RewardItem
from alignd.rewards.registry import build_rewards
from alignd.settings import Settings


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def settings(tiny_llama_dir, adapter_dir) -> Settings:
    return Settings(engine="hf", model=str(tiny_llama_dir), baselines={"tiny": {"adapter": str(adapter_dir)}})


@pytest.fixture(scope="module")
def generation(tiny_hf_engine, settings):
    async def build():
        baselines = await build_baselines(tiny_hf_engine, settings)
        rewards = await build_rewards(settings, tiny_hf_engine, baselines.aligned_policies())
        return Generation(tiny_hf_engine, rewards, settings, baselines)

    return asyncio.run(build())


def test_adapter_checks_refuse_what_would_serve_nonsense(tiny_llama_dir, adapter_dir, tmp_path):
    info = load_adapter("tiny", adapter_dir, tiny_llama_dir, max_rank=16)
    assert info.rank == 4 and info.provenance["beta"] == BETA
    foreign = make_adapter(tiny_llama_dir, tmp_path / "foreign", digest="0" * 64)
    with pytest.raises(ConfigurationError) as err:
        load_adapter("foreign", foreign, tiny_llama_dir, max_rank=16)
    assert "'tiny'" in err.value.message and str(tiny_llama_dir) in err.value.message  # both sides named
    wide = make_adapter(tiny_llama_dir, tmp_path / "wide", rank=16)
    with pytest.raises(ConfigurationError, match="rank 16, above this server's limit of 8"):
        load_adapter("wide", wide, tiny_llama_dir, max_rank=8)
    with pytest.raises(ConfigurationError, match="not an adapter folder"):
        load_adapter("none", tmp_path, tiny_llama_dir, max_rank=16)


def test_an_adapter_on_the_output_layer_is_refused_as_a_lora_and_accepted_merged(tiny_llama_dir, tmp_path):
    """vLLM's LoRA on lm_head breaks prompt log-probabilities (see test_vllm_adapters): such an adapter is
    refused where it would run as a LoRA, with the way out named, and merging it stays possible."""
    head = make_adapter(tiny_llama_dir, tmp_path / "head", target_modules=("q_proj", "lm_head"))
    served_layers = Settings().lora_target_modules
    with pytest.raises(ConfigurationError) as err:
        load_adapter("head", head, tiny_llama_dir, max_rank=16, lora_modules=served_layers)
    assert "changes lm_head" in err.value.message and "ALIGND_ADAPTER_SERVING=merged" in err.value.message
    assert load_adapter("head", head, tiny_llama_dir, max_rank=16).rank == 4  # merged: any layer
    with pytest.raises(ValueError, match="may not name lm_head"):
        Settings(lora_target_modules=("q_proj", "lm_head"))


def test_baseline_method_samples_the_adapter(generation, tiny_hf_engine, adapter_dir):
    prompt = generation.render_text("hello world how are")
    params = GenerationParams(max_tokens=8, temperature=0.0)
    plan = generation.plan(prompt, params, DecodingConfig(method="baseline", baseline="tiny", diagnostics=True))
    assert plan.family == PLAIN  # one engine request, like plain decoding
    answer = asyncio.run(generation.generate(plan, "b")).choices[0]
    merged = tiny_hf_engine.with_adapter("check", str(adapter_dir))
    expected = asyncio.run(merged.generate(list(prompt.token_ids), params, "m")).choices[0]
    sft = asyncio.run(tiny_hf_engine.generate(list(prompt.token_ids), params, "s")).choices[0]
    assert answer.token_ids == expected.token_ids != sft.token_ids  # the adapter, not the SFT model
    (step,) = answer.alignment.steps
    lp_adapter, lp_sft = (
        asyncio.run(merged.continuation_logprobs([list(prompt.token_ids)], [answer.token_ids]))[0],
        asyncio.run(tiny_hf_engine.continuation_logprobs([list(prompt.token_ids)], [answer.token_ids]))[0],
    )
    assert step.kind == "baseline" and step.kl == pytest.approx(sum(lp_adapter) - sum(lp_sft), abs=1e-4)


def test_the_baselines_implicit_reward_is_beta_log_ratio(generation, tiny_hf_engine, adapter_dir):
    reward = generation.rewards.get("tiny_implicit")
    item = RewardItem(prompt="hello world", response=" the cat sat on the mat")
    (score,) = asyncio.run(reward.score([item]))
    merged = tiny_hf_engine.with_adapter("check", str(adapter_dir))
    prefix = tiny_hf_engine.render_chat(item.chat())
    response = tiny_hf_engine.encode(item.response)
    lp_a = asyncio.run(merged.continuation_logprobs([prefix], [response]))[0]
    lp_s = asyncio.run(tiny_hf_engine.continuation_logprobs([prefix], [response]))[0]
    assert score.value == pytest.approx(BETA * (sum(lp_a) - sum(lp_s)), abs=1e-4)  # beta from the manifest


def test_a_baseline_sets_indirect_transfers_reward_and_beta(generation):
    prompt = generation.render_text("hello world")
    params = GenerationParams(max_tokens=2, temperature=0.0)
    plan = generation.plan(prompt, params, DecodingConfig(method="transfer_q", transfer="indirect", baseline="tiny"))
    assert plan.decoding.baseline_reward == "tiny_implicit" and plan.decoding.beta == BETA
    prompted = generation.plan(prompt, params, DecodingConfig(method="transfer_q", transfer="indirect"))
    assert prompted.decoding.baseline_reward == "prompted_implicit"  # the default baseline here is the prompted one
    with pytest.raises(NotFoundError, match="tiny"):
        generation.plan(prompt, params, DecodingConfig(method="transfer_q", baseline="nope"))


def test_closing_the_baselines_releases_the_engines_they_started(tiny_hf_engine, settings):
    registry = asyncio.run(build_baselines(tiny_hf_engine, settings))
    # the reference engine serves an adapter merged into a copy of the weights: an engine of its own
    assert registry.owned_engines == [registry.get("tiny").policy.engine]
    asyncio.run(registry.close())
    assert registry.owned_engines == []
