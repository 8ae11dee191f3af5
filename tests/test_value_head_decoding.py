"""``decoding.value='head'`` on alignd's side: the request's checks, and refusals where no head can run.
The head inside vLLM is tests/test_vllm_plugin.py; through the real server, tests/test_server_value_head.py."""

from __future__ import annotations

import pytest

from alignd.decoding.config import DecodingConfig
from alignd.decoding.generation import ALIGNED, PLAIN, Generation, GenerationPlan
from alignd.decoding.prompt import Prompt
from alignd.errors import InvalidRequestError
from alignd.models.engine import GenerationParams, ValueGuidance
from alignd.rewards.registry import RewardRegistry
from alignd.settings import Settings


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "cd", "value": "head"}, "transfer_q estimator"),
        ({"method": "transfer_q", "value": "head", "transfer": "indirect"}, "direct transfer"),
        ({"method": "transfer_q", "value": "head", "block_size": 4}, "leave them unset"),
        ({"method": "transfer_q", "value": "head", "confidence_threshold": 0.9}, "leave them unset"),
    ],
)
def test_value_head_options_that_do_not_apply_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        DecodingConfig(**fields)


def test_a_head_request_is_admitted_as_plain_decoding_and_has_its_own_metric_label():
    head = DecodingConfig(method="transfer_q", value="head")
    rollouts = DecodingConfig(method="transfer_q")
    prompt = Prompt((1, 2, 3))
    assert GenerationPlan(prompt, GenerationParams(), head).family == PLAIN  # one engine request per answer
    assert GenerationPlan(prompt, GenerationParams(), rollouts).family == ALIGNED
    assert (head.metric_label, rollouts.metric_label) == ("transfer_q_head", "transfer_q")


def test_a_server_without_a_head_refuses_value_head_with_what_to_set(tiny_hf_engine):
    generation = Generation(tiny_hf_engine, RewardRegistry({}), Settings(value_head="none"))
    with pytest.raises(InvalidRequestError, match="ALIGND_VALUE_HEAD") as caught:
        generation.plan(Prompt((1, 2, 3)), GenerationParams(max_tokens=4),
                        DecodingConfig(method="transfer_q", value="head"))
    assert caught.value.param == "decoding.value"


def test_the_reference_engine_refuses_value_guidance(tiny_hf_engine):
    with pytest.raises(InvalidRequestError, match="ALIGND_ENGINE=hf"):
        tiny_hf_engine.check_params(GenerationParams(value_guidance=ValueGuidance(alpha=1.0, top_k=4)))
