"""The committed baseline adapter through the real server: `make serve`'s configuration (the embedded
SmolLM2 with adapters/smollm2-positivity-dpo, a LoRA in the served vLLM engine) is what the session
server runs, so TQ* here transfers from a baseline alignd trained, not from a system prompt."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from alignd.settings import EMBEDDED_ADAPTER_DIR

pytestmark = pytest.mark.server

TQ = {"method": "transfer_q", "alpha": 0.1, "top_k": 4, "rollout_len": 6, "diagnostics": True}
QUESTION = "Tell me about your weekend."


def manifest() -> dict:
    return json.loads((EMBEDDED_ADAPTER_DIR / "alignd_adapter.json").read_text())


def test_the_committed_adapter_is_the_default_baseline_with_its_provenance(server):
    listing = httpx.get(server.base_url + "/v1/baselines", timeout=30).json()
    cards = {card["name"]: card for card in listing["data"]}
    assert {"default", "prompted"} <= set(cards)
    default = cards["default"]
    assert default["kind"] == "adapter" and default["source"] == str(EMBEDDED_ADAPTER_DIR)
    made = manifest()
    # how it was made travels with it: the reward, beta, data, seed, metrics and the command
    assert default["provenance"]["reward"] == made["reward"] == "positivity"
    assert default["provenance"]["command"] == made["command"]
    assert " ".join(made["command"]).startswith(".venv/bin/alignd train dpo")
    assert default["provenance"]["seed"] == made["seed"]
    assert default["beta"] == made["beta"]
    assert default["implicit_reward"] in {r["name"] for r in httpx.get(server.base_url + "/v1/rewards").json()["data"]}
    assert cards["prompted"]["kind"] == "prompted"


def test_tq_from_the_committed_adapter_through_the_openai_client(openai_client, model_name):
    kwargs = dict(model=model_name, messages=[{"role": "user", "content": QUESTION}], max_tokens=10, temperature=0,
                  extra_body={"decoding": TQ})
    whole = openai_client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    alignment = choice.model_extra["alignment"]
    assert alignment["method"] == "transfer_q"
    assert alignment["baseline"] == "default" and alignment["baseline_kind"] == "adapter"
    assert alignment["cost"]["rollouts"] > 0 and choice.message.content
    chunks = list(openai_client.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_the_baseline_method_samples_the_adapter_not_the_sft_model(server, model_name, hf_embedded_engine):
    """Greedy answers of the baseline method are the adapter's greedy answers: checked token by token
    against the adapter merged into the transformers engine (float32) where the served (bfloat16)
    choice was not a near-tie."""
    body = {"model": model_name, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12,
            "temperature": 0, "decoding": {"method": "baseline", "diagnostics": True}}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["alignment"]["baseline"] == "default"
    # the one-sample KL estimate log pi_adapter(y) - log pi_sft(y) of a greedy adapter answer is positive:
    # the adapter is not the SFT model
    assert choice["alignment"]["steps"][0]["kl"] > 0
    merged = hf_embedded_engine.with_adapter("default", str(EMBEDDED_ADAPTER_DIR))
    prefix = merged.render_chat([{"role": "user", "content": QUESTION}])
    served = merged.encode(choice["message"]["content"])
    with torch.inference_mode():
        logits = merged.model(input_ids=torch.tensor([prefix + served])).logits[0].float()
    for j, token in enumerate(served):
        top2 = torch.topk(logits[len(prefix) - 1 + j], 2)
        if top2.values[0] - top2.values[1] < 0.1:  # a near-tie: bfloat16 may pick either; stop checking
            break
        assert int(top2.indices[0]) == token, (j, merged.decode(served))
