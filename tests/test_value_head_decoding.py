"""``decoding.value='head'`` on alignd's side: the request's checks, and refusals where no head can run.
The head inside vLLM is tests/test_vllm_plugin.py; through the real server, tests/test_server_value_head.py."""

from __future__ import annotations

import asyncio

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
        generation.plan(
            Prompt((1, 2, 3)), GenerationParams(max_tokens=4), DecodingConfig(method="transfer_q", value="head")
        )
    assert caught.value.param == "decoding.value"


def test_the_reference_engine_refuses_value_guidance(tiny_hf_engine):
    with pytest.raises(InvalidRequestError, match="ALIGND_ENGINE=hf"):
        tiny_hf_engine.check_params(GenerationParams(value_guidance=ValueGuidance(alpha=1.0, top_k=4)))


class _HeadedGeneration(Generation):
    """Generation whose engine has a value head with the given manifest (the reference engine cannot run
    one; only the request checks run here)."""

    manifest: dict | None = None

    @property
    def value_head(self) -> dict | None:
        return self.manifest


def _tensors(folder, value: float):
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({"lora_A": torch.full((2, 3), value)}, str(folder / "adapter_model.safetensors"))
    return folder


def test_the_head_s_baseline_is_found_by_its_weights_not_by_its_name(tiny_hf_engine, tmp_path):
    """A head records the baseline it was distilled from (name, kind, source, weights digest); a server
    may serve that adapter under another name or from another folder, or serve another adapter as
    "default": only the digest says which of its baselines the head's values belong to."""
    import shutil

    from alignd.decoding.baselines import Baseline, BaselineRegistry
    from alignd.decoding.prompt import Policy
    from alignd.models.weights import weights_digest

    trained = _tensors(tmp_path / "trained", 1.0)
    copy = shutil.copytree(trained, tmp_path / "elsewhere")
    other = _tensors(tmp_path / "other", 2.0)
    registry = BaselineRegistry(
        {
            "default": Baseline("default", "adapter", Policy(tiny_hf_engine, "default"), str(other)),
            "mine": Baseline("mine", "adapter", Policy(tiny_hf_engine, "mine"), str(copy)),
            "prompted": Baseline("prompted", "prompted", Policy(tiny_hf_engine, "prompted", "Be kind."), "Be kind."),
        }
    )
    generation = _HeadedGeneration(tiny_hf_engine, RewardRegistry({}), Settings(value_head="none"), registry)
    head = {"name": "default", "kind": "adapter", "source": str(trained), "weights_digest": weights_digest(trained)}
    generation.manifest = {"reward": "positivity", "baseline": head}
    # the digests are read once, before serving, off the event loop (Generation.prepare at start-up)
    asyncio.run(generation.prepare())
    assert set(generation._baseline_digests) == {"default", "mine"}
    assert generation.head_baseline() == ("mine", "mine")

    def refused(baseline: str) -> InvalidRequestError:
        with pytest.raises(InvalidRequestError) as caught:
            generation.plan(
                Prompt((1, 2, 3)),
                GenerationParams(max_tokens=4),
                DecodingConfig(method="transfer_q", value="head", baseline=baseline),
            )
        assert caught.value.param == "decoding.baseline"
        return caught.value

    assert "distilled from baseline 'mine', not 'default'" in str(refused("default"))  # same name, other weights

    generation.manifest = {"reward": "positivity", "baseline": {**head, "weights_digest": "0" * 64}}
    assert generation.head_baseline() == (None, "default (adapter, not served here)")
    assert "not served here" in str(refused("mine"))

    generation.manifest = {
        "reward": "positivity",
        "baseline": {"name": "kind", "kind": "prompted", "source": "Be kind."},
    }
    assert generation.head_baseline() == ("prompted", "prompted")
