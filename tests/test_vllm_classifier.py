"""A classifier reward model on vLLM's pooling runner agrees with the transformers path.

The model: SmolLM2-135M's weights with a one-logit head (random, fixed seed): a real-size reward
model architecture, meaningless as a judge. Both run it in float32 here, so the scores agree to float
rounding (1e-3). In bfloat16, vLLM's default, a random head's scores of about 0.3 move by up to 0.06
(and transformers' own bfloat16 run by 0.03 the other way): too coarse to catch a wrong pooling.
"""

from __future__ import annotations

import pytest
import torch

from alignd.rewards.base import RewardItem
from alignd.rewards.classifier import ClassifierReward, load_classifier
from alignd.settings import Settings

pytestmark = pytest.mark.vllm

ITEMS = [
    RewardItem("What a lovely question, thank you!", prompt="Hi"),
    RewardItem("No.", prompt="Can you help me?"),
    RewardItem("Paris is the capital of France.", prompt="What is the capital of France?"),
    RewardItem("I refuse to answer that.", prompt="What is 2+2?"),
    RewardItem(
        "Rain falls from clouds when droplets grow heavy.",
        messages=({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why does it rain?"}),
    ),
]


@pytest.fixture(scope="module")
def classifier_135m(tmp_path_factory, embedded_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("rm-135m")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(embedded_model_dir, num_labels=1)
    model.config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_dir).save_pretrained(path)
    return path


def test_pooling_runner_matches_transformers(classifier_135m, loop_thread):
    settings = Settings(max_model_len=512, dtype="float32")

    async def both():
        vllm_rm = load_classifier("rm", str(classifier_135m), settings, backend="vllm")
        try:
            assert type(vllm_rm).__name__ == "VLLMClassifierReward"
            served = [s.value for s in await vllm_rm.score(ITEMS)]
            with pytest.raises(Exception, match="truncate"):
                await vllm_rm.score([RewardItem("word " * 600, prompt="x")])
            [cut] = await vllm_rm.score([RewardItem("word " * 600, prompt="x")], truncate=True)
        finally:
            await vllm_rm.close()
        reference = [s.value for s in await ClassifierReward.from_pretrained("ref", classifier_135m).score(ITEMS)]
        return served, reference, cut

    served, reference, cut = loop_thread.run(both())
    for a, b in zip(served, reference, strict=False):
        assert a == pytest.approx(b, abs=1e-3)
    assert sorted(range(len(ITEMS)), key=served.__getitem__) == sorted(range(len(ITEMS)), key=reference.__getitem__)
    assert cut.truncated
