"""Reward endpoints through the real server (vLLM, embedded SmolLM2, test rewards configured)."""

from __future__ import annotations

import httpx
import pytest
import torch

from alignd.models.chat import with_system_prompt
from alignd.server.rewards.protocol import bradley_terry
from alignd.settings import DEFAULT_BASELINE_SYSTEM_PROMPT

pytestmark = pytest.mark.server

WARM = "What a wonderful question! I'm happy to help, and I love how curious you are. Thank you!"
HOSTILE = "That is a stupid question. I hate answering idiots like you. Go away."
PROMPT = "Can you help me with my homework?"


def post(server, path, body, status=200):
    r = httpx.post(server.base_url + path, json=body, timeout=300)
    assert r.status_code == status, r.text
    return r.json()


def test_lists_built_in_and_configured_rewards(server):
    data = httpx.get(server.base_url + "/v1/rewards").json()["data"]
    names = {r["name"]: r for r in data}
    assert {"positivity", "length_penalty", "prompted_implicit", "tiny_rm", "exclaim", "warm_and_short"} <= set(names)
    assert names["prompted_implicit"]["token_values"] is True and names["positivity"]["kind"] == "positivity"


def test_positivity_ranks_warm_above_hostile_and_compare_is_bradley_terry(server):
    scored = post(
        server,
        "/v1/rewards",
        {
            "reward": "positivity",
            "items": [{"prompt": PROMPT, "response": WARM}, {"prompt": PROMPT, "response": HOSTILE}],
        },
    )
    assert scored["reward"] == "positivity"
    warm, hostile = scored["scores"]
    assert warm > 0.5 and hostile < -0.5
    compared = post(
        server, "/v1/rewards/compare", {"reward": "positivity", "prompt": PROMPT, "responses": [WARM, HOSTILE]}
    )
    assert compared["scores"] == pytest.approx([warm, hostile])
    assert compared["preference"] == pytest.approx(1 / (1 + torch.exp(torch.tensor(hostile - warm)).item()))
    assert compared["preference"] == pytest.approx(bradley_terry(warm, hostile))


def hand_implicit(hf_engine, messages, response, beta):
    """beta * (log p(y | baseline prompt) - log p(y | plain prompt)) from the HF engine's forward pass."""
    y = hf_engine.encode(response)

    def logprob_sum(chat):
        prefix = hf_engine.render_chat(chat)
        with torch.inference_mode():
            logits = hf_engine.model(input_ids=torch.tensor([prefix + y])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        return [float(lp[len(prefix) - 1 + j, t]) for j, t in enumerate(y)]

    aligned = logprob_sum(with_system_prompt(messages, DEFAULT_BASELINE_SYSTEM_PROMPT))
    reference = logprob_sum(messages)
    return beta * (sum(aligned) - sum(reference)), len(y)


def test_implicit_reward_matches_the_hand_computation_from_the_hf_engine(server, hf_embedded_engine, embedded_settings):
    """The server computes in bfloat16 (vLLM), the hand computation in float32 (transformers). Per token,
    log-probabilities differ by bfloat16 rounding, about 0.02-0.05 nats on average; the stated tolerance
    is beta * 0.06 nats per response token, plus 1% of the value."""
    beta = embedded_settings.implicit_beta
    cases = [
        ([{"role": "user", "content": PROMPT}], WARM),
        ([{"role": "user", "content": PROMPT}], HOSTILE),
        (
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe rain."}],
            "Rain is water falling from clouds.",
        ),
    ]
    body = {
        "reward": "prompted_implicit",
        "token_values": True,
        "items": [{"messages": m, "response": r} for m, r in cases],
    }
    served = post(server, "/v1/rewards", body)
    for (messages, response), value, token_values in zip(cases, served["scores"], served["token_values"], strict=False):
        expected, n_tokens = hand_implicit(hf_embedded_engine, messages, response, beta)
        assert value == pytest.approx(expected, abs=beta * 0.06 * n_tokens + 0.01 * abs(expected))
        assert len(token_values) == n_tokens
        assert sum(t["value"] for t in token_values) == pytest.approx(value, abs=1e-4)
    # the warm baseline prefers the warm answer
    assert served["scores"][0] > served["scores"][1]


def test_classifier_callables_and_several_rewards_at_once(server, tiny_classifier_dir):
    import asyncio

    from alignd.rewards.base import RewardItem
    from alignd.rewards.classifier import ClassifierReward

    items = [{"prompt": "hello", "response": "the cat sat!"}, {"prompt": "how are you", "response": "a happy answer"}]
    result = post(
        server, "/v1/rewards", {"rewards": ["tiny_rm", "exclaim", "char_length", "warm_and_short"], "items": items}
    )
    by = result["scores_by_reward"]
    local = ClassifierReward.from_pretrained("local", tiny_classifier_dir)
    expected = asyncio.run(local.score([RewardItem(i["response"], prompt=i["prompt"]) for i in items]))
    assert by["tiny_rm"] == pytest.approx([s.value for s in expected], abs=1e-4)
    assert by["exclaim"] == [1.0, 0.0]
    assert by["char_length"] == [12.0, 14.0]
    assert len(by["warm_and_short"]) == 2


BAD = {
    "empty batch": ({"reward": "positivity", "items": []}, 400, "items"),
    "unknown reward": ({"reward": "helpfulness", "items": [{"prompt": "p", "response": "r"}]}, 404, "reward"),
    "no prompt": ({"reward": "positivity", "items": [{"response": "r"}]}, 400, "prompt"),
    "both reward fields": (
        {"reward": "positivity", "rewards": ["exclaim"], "items": [{"prompt": "p", "response": "r"}]},
        400,
        None,
    ),
    "batch above limit": ({"reward": "positivity", "items": [{"prompt": "p", "response": "r"}] * 257}, 400, "items"),
    "token values of a lexicon": (
        {"reward": "positivity", "token_values": True, "items": [{"prompt": "p", "response": "r"}]},
        400,
        "token_values",
    ),
    "callable raises": ({"reward": "broken", "items": [{"prompt": "p", "response": "r"}]}, 422, "reward"),
    "too long for the classifier": (
        {"reward": "tiny_rm", "items": [{"prompt": "p", "response": "cat " * 400}]},
        400,
        "items",
    ),
    "too long for the context": (
        {"reward": "prompted_implicit", "items": [{"prompt": "p", "response": "word " * 3000}]},
        400,
        "items",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_reward_requests_get_clear_4xx(server, case):
    body, status, param = BAD[case]
    error = post(server, "/v1/rewards", body, status=status)["error"]
    assert error["message"]
    if param:
        assert error["param"] == param or param in error["message"]
    # the server keeps serving
    assert (
        post(server, "/v1/rewards", {"reward": "positivity", "items": [{"prompt": "p", "response": "great!"}]})[
            "scores"
        ][0]
        > 0
    )


def test_truncate_on_request_scores_long_texts(server):
    long = {"prompt": "p", "response": "cat " * 400}
    result = post(server, "/v1/rewards", {"reward": "tiny_rm", "truncate": True, "items": [long]})
    assert result["truncated"] == [True] and len(result["scores"]) == 1
    bad_compare = post(
        server, "/v1/rewards/compare", {"reward": "positivity", "prompt": "p", "responses": ["a"]}, status=400
    )
    assert bad_compare["error"]["param"] == "responses"
