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
    kwargs = dict(
        model=model_name,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=10,
        temperature=0,
        extra_body={"decoding": TQ},
    )
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
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 12,
        "temperature": 0,
        "decoding": {"method": "baseline", "diagnostics": True},
    }
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


IMPLICIT = {"method": "transfer_q", "value": "implicit", "diagnostics": True}


def test_the_committed_adapter_has_an_implicit_q_and_the_prompted_baseline_says_why_not(server):
    cards = {c["name"]: c for c in httpx.get(server.base_url + "/v1/baselines", timeout=30).json()["data"]}
    made = manifest()
    assert cards["default"]["implicit_q"] == {"beta": made["beta"], "reward": made["reward"], "trained_by": "dpo"}
    assert cards["default"]["implicit_q_unavailable"] is None
    assert cards["prompted"]["implicit_q"] is None and "system prompt" in cards["prompted"]["implicit_q_unavailable"]
    sources = {s["name"]: s for s in httpx.get(server.base_url + "/v1/methods").json()["value_sources"]}
    assert sources["implicit"]["available"]
    refused = httpx.post(
        server.base_url + "/generate",
        json={
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 2,
            "decoding": {**IMPLICIT, "baseline": "prompted"},
        },
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "decoding.baseline"


def test_implicit_tq_at_alpha_beta_over_the_vocabulary_is_the_adapter_s_greedy_answer(server, served_precision):
    """alpha defaults to the adapter's beta, top_k 0: the rule is the adapter itself, so the answer is the
    baseline method's greedy answer (both on the session engine, the adapter as a LoRA); in bfloat16 they may
    part where the adapter's choice and the implicit one were within the engine's measured run-to-run bound
    (tests/precision.py)."""
    from precision import first_divergence

    def answer(decoding: dict) -> dict:
        body = {
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 6,
            "temperature": 0,
            "decoding": decoding,
        }
        r = httpx.post(server.base_url + "/generate", json=body, timeout=600)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    tq, baseline = answer({**IMPLICIT, "top_k": 0}), answer({"method": "baseline"})
    alignment = tq["alignment"]
    assert alignment["value"] == "implicit" and alignment["reward_name"] == "positivity" and alignment["kl"] > 0
    beta = manifest()["beta"]
    steps = alignment["steps"]
    for step in steps:
        listed = step["candidates"]
        assert len(listed) == 20  # the whole vocabulary's 20 most probable under the rule
        for c in listed:  # at alpha = beta the re-weighted distribution is the adapter's own
            assert c["value"] == pytest.approx(beta * (c["baseline_logprob"] - c["sft_logprob"]), abs=1e-5)
            assert c["logprob"] == pytest.approx(c["baseline_logprob"], abs=1e-3)
        assert step["chosen"] == [max(listed, key=lambda c: c["logprob"])["token_id"]]
    step = first_divergence(baseline["token_ids"], tq["token_ids"])
    if step is not None:  # where they part, the adapter's own choice was a near-tie of the implicit one
        listed = {c["token_id"]: c["logprob"] for c in steps[step]["candidates"]}
        ours, theirs = tq["token_ids"][step], baseline["token_ids"][step]
        assert theirs in listed, (step, tq["text"], baseline["text"])
        assert listed[ours] - listed[theirs] <= served_precision.near_tie_between_runs(0.0), (
            step,
            tq["text"],
            baseline["text"],
        )
    else:
        assert tq["token_ids"] == baseline["token_ids"]
