"""Aligned decoding through the real server (vLLM, embedded SmolLM2, prompted baseline, positivity).

Small settings keep the suite fast on 2 cores (top_k 4, 6-token rollouts, 16 new tokens); the
benchmark and evaluation use the paper's settings.
"""

from __future__ import annotations

import asyncio
import statistics

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import SESSION_MAX_RUNNING_ALIGNED

from alignd.clients import Alignd, BadRequestError, NotFoundError

pytestmark = pytest.mark.server

# From the prompted baseline, which shares the SFT engine: the session server runs the committed adapter
# as a LoRA, whose requests vLLM-CPU decodes 2-4x slower (docs/BENCHMARKS.md), and these tests are about
# TQ*'s mechanics; TQ* from the adapter has its own tests (tests/test_server_baselines.py).
TQ = {"method": "transfer_q", "alpha": 0.1, "top_k": 4, "rollout_len": 6, "baseline": "prompted"}
# Neutral-to-dull everyday requests: room for the answer's tone to move either way.
PROMPTS = [
    "Tell me about your weekend.",
    "What do you think of Mondays?",
    "Describe the weather today.",
    "How was your commute?",
    "What is your opinion of homework?",
    "Tell me about traffic jams.",
    "What do you think about rainy days?",
    "Describe a long queue at the bank.",
    "How do you feel about taxes?",
    "Tell me about a broken phone.",
    "What is it like to wait at the airport?",
    "Describe a cold office.",
    "What do you think of alarms in the morning?",
    "Tell me about doing laundry.",
    "How do you feel about meetings?",
    "Describe a noisy neighbour.",
    "What do you think of exams?",
    "Tell me about a flat tyre.",
    "Describe cleaning the kitchen.",
    "What do you think of spam emails?",
]


def alignment_of(choice) -> dict | None:
    return getattr(choice, "alignment", None) or (choice.model_extra or {}).get("alignment")


ANSWER_TOKENS = 8


# Measured on all 20 (8 tokens, bfloat16 and float32): TQ* at least as positive as SFT greedy on 20 of 20, means
# 0.501 against 0.038. Twelve keep that power (12 of 12 at least as high by chance alone: p = 0.5^12 = 0.0002)
# at 60% of the cost (20 took 120 s of the float32 suite on 2 cores).
POSITIVITY_PROMPTS = PROMPTS[:12]


def test_transfer_q_raises_positivity_over_sft_greedy(server, model_name):
    """Twelve prompts, sent concurrently (their decoding steps batch together in vLLM), scored by the
    server's own positivity reward. 8 tokens each (16 took 145 s of the suite on 2 cores)."""

    async def answers(decoding):
        # No more at once than the session server runs, so none waits in its queue (or gets a 429).
        admitted = asyncio.Semaphore(SESSION_MAX_RUNNING_ALIGNED)
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=900) as c:
            extra = {"decoding": decoding} if decoding else {}

            async def one(p):
                async with admitted:
                    return await c.chat.completions.create(
                        model=model_name,
                        messages=[{"role": "user", "content": p}],
                        max_tokens=ANSWER_TOKENS,
                        temperature=0,
                        extra_body=extra,
                    )

            rs = await asyncio.gather(*(one(p) for p in POSITIVITY_PROMPTS))
        return [r.choices[0].message.content for r in rs]

    sft, tq = asyncio.run(answers(None)), asyncio.run(answers(TQ))

    def positivity(texts):
        body = {
            "reward": "positivity",
            "items": [{"prompt": p, "response": t} for p, t in zip(POSITIVITY_PROMPTS, texts, strict=False)],
        }
        return httpx.post(server.base_url + "/v1/rewards", json=body, timeout=60).json()["scores"]

    sft_scores, tq_scores = positivity(sft), positivity(tq)
    print(
        f"\nmean positivity over {len(POSITIVITY_PROMPTS)} prompts: SFT greedy {statistics.mean(sft_scores):.3f}, "
        f"TQ* {statistics.mean(tq_scores):.3f}; "
        f"TQ* higher on {sum(t > s for s, t in zip(sft_scores, tq_scores, strict=True))}, "
        f"as high on {sum(t >= s for s, t in zip(sft_scores, tq_scores, strict=True))}"
    )
    assert statistics.mean(tq_scores) > statistics.mean(sft_scores) + 0.1
    assert sum(t >= s for s, t in zip(sft_scores, tq_scores, strict=False)) >= 3 * len(POSITIVITY_PROMPTS) // 4


def test_diagnostics_report_steps_reward_and_kl(server, model_name, embedded_eos_token_ids):
    with Alignd(server.base_url) as client:
        r = client.generate(
            messages=[{"role": "user", "content": PROMPTS[0]}],
            max_tokens=6,
            temperature=0,
            decoding={**TQ, "diagnostics": True},
        )
    choice = r.choices[0]
    a = choice.alignment  # typed: alignd.protocol.AlignmentSummary
    assert a.method == "transfer_q" and a.reward_name == "positivity"
    steps = a.steps
    assert len(steps) == a.cost.decisions == len(choice.token_ids)
    # a candidate that ends the answer needs no rollout
    assert a.cost.rollouts == sum(1 for s in steps for c in s.candidates if c.token_id not in embedded_eos_token_ids)
    for step in steps:
        cands = step.candidates
        assert step.kind == "value_guided" and len(cands) == 4 and step.kl >= -1e-9
        assert step.chosen[0] == max(cands, key=lambda c: c.logprob).token_id  # greedy over the rule
        for c in cands:  # the rule: log pi = log pi_sft + Q/alpha - logsumexp
            assert c.logprob <= 0 and c.penalty == 0
    assert a.kl == pytest.approx(sum(s.kl for s in steps))
    scored = httpx.post(
        server.base_url + "/v1/rewards",
        json={
            "reward": "positivity",
            "items": [{"messages": [{"role": "user", "content": PROMPTS[0]}], "response": choice.text}],
        },
    ).json()["scores"][0]
    assert a.reward == pytest.approx(scored)


@pytest.mark.parametrize(
    "decoding",
    [
        {"method": "sft", "diagnostics": True},
        TQ,
        # (the adapter's implicit reward would read prompt log-probabilities through the LoRA: 351 s here; the
        # fewest rollouts indirect transfer takes, 2, and short ones: this checks the stream, not the values)
        {**TQ, "transfer": "indirect", "top_k": 3, "rollout_len": 3, "num_rollouts": 2},
        {"method": "args", "alpha": 0.5, "top_k": 4},
        {"method": "cd", "alpha": 0.1, "top_k": 3, "rollout_len": 4},
        {"method": "cd", "cd_mode": "block", "num_blocks": 3, "block_len": 4},
        {"method": "best_of_n", "num_samples": 3},
    ],
    ids=["sft", "tq-direct", "tq-indirect", "args", "cd", "cd-block", "best-of-n"],
)
def test_every_method_streams_the_same_text_it_returns(openai_client, model_name, decoding):
    kwargs = dict(
        model=model_name,
        messages=[{"role": "user", "content": PROMPTS[2]}],
        max_tokens=8,
        temperature=0,
        seed=5,
        extra_body={"decoding": decoding},
    )
    whole = openai_client.chat.completions.create(**kwargs)
    chunks = list(openai_client.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_and_n_with_aligned_decoding(openai_client, model_name):
    r = openai_client.completions.create(
        model=model_name,
        prompt="My day at work was",
        max_tokens=6,
        temperature=0.8,
        seed=3,
        n=2,
        extra_body={"decoding": {**TQ, "diagnostics": True}},
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(alignment_of(c)["method"] == "transfer_q" for c in r.choices)


# Two candidates whose log-probabilities differ by less than this are a tie in float32 here: TQ* reads
# the top-k from a separate request, whose matmul shapes differ from the decode step's. In bfloat16 the
# bound is measured (tests/precision.py).
NEAR_TIE_NATS = 0.1


def test_very_large_alpha_gives_sft_greedy_through_the_server(openai_client, model_name, served_precision):
    """With alpha -> infinity TQ* picks the SFT model's most likely token at every step: the same answer
    as greedy SFT decoding, except where greedy decoding itself stood at a near-tie."""
    near_tie = served_precision.near_tie_between_runs(NEAR_TIE_NATS)
    for prompt in PROMPTS[:3]:
        kwargs = dict(model=model_name, messages=[{"role": "user", "content": prompt}], max_tokens=10, temperature=0)
        sft = openai_client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=5).choices[0]
        tq = openai_client.chat.completions.create(**kwargs, extra_body={"decoding": {**TQ, "alpha": 1e9}})
        tq_text, sft_text = tq.choices[0].message.content, sft.message.content
        if tq_text == sft_text:
            continue
        # the first token where the answers part: greedy's top two candidates there must be a near-tie,
        # and TQ* took the runner-up
        offset = 0
        for step in sft.logprobs.content:
            if not tq_text.startswith(sft_text[: offset + len(step.token)]):
                # TQ* took another of greedy's top candidates there (an exact tie may list either first),
                # one within the near-tie of greedy's own choice
                taken = [c for c in step.top_logprobs if c.token != step.token and tq_text[offset:].startswith(c.token)]
                assert taken, (prompt, sft_text, tq_text, step)
                assert step.logprob - max(c.logprob for c in taken) < near_tie, (
                    prompt,
                    sft_text,
                    tq_text,
                    step,
                    near_tie,
                )
                break
            offset += len(step.token)
        else:
            raise AssertionError(f"TQ* answered {tq_text!r}, greedy SFT {sft_text!r}")


BAD_DECODING = {
    "unknown method": ({"method": "beam"}, 400),
    "top_k above limit": ({**TQ, "top_k": 500}, 400),
    "rollouts above limit": ({**TQ, "num_rollouts": 1000, "rollout_temperature": 1.0}, 400),
    "rollout_len above limit": ({**TQ, "rollout_len": 10000}, 400),
    "greedy multi-rollouts": ({**TQ, "num_rollouts": 4, "rollout_temperature": 0.0}, 400),
    "negative alpha": ({**TQ, "alpha": -1}, 400),
    "unknown field": ({**TQ, "alfa": 1}, 400),
    "unknown reward": ({**TQ, "reward": "helpfulness"}, 404),
}


@pytest.mark.parametrize("case", list(BAD_DECODING), ids=list(BAD_DECODING))
def test_bad_decoding_parameters_get_4xx(server, model_name, case):
    decoding, status = BAD_DECODING[case]
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={
            "model": model_name,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "decoding": decoding,
        },
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert "decoding" in (r.json()["error"]["param"] or "") or case == "unknown reward"
    with Alignd(server.base_url) as client:
        with pytest.raises(BadRequestError if status == 400 else NotFoundError):
            client.generate(prompt="hi", max_tokens=4, decoding=decoding)
        assert client.generate(prompt="hi", max_tokens=2, temperature=0).choices[0].token_ids


def test_logprobs_with_aligned_decoding_is_a_clear_400(server, model_name):
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={"model": model_name, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "decoding": TQ},
    )
    assert r.status_code == 400 and "diagnostics" in r.json()["error"]["message"]


TQ_METRICS = (
    "alignd_decoding_steps_total",
    "alignd_rollout_tokens_total",
    "alignd_value_step_seconds_count",
    "alignd_response_reward_count",
    "alignd_response_kl_count",
)


def transfer_q_metrics(base_url: str) -> dict[str, float]:
    """The transfer_q sample of each of TQ_METRICS on /metrics now (0 where the series does not exist yet)."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    found = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in TQ_METRICS and s.labels.get("method") == "transfer_q"
    }
    return {name: found.get(name, 0.0) for name in TQ_METRICS}


def test_decoding_metrics_are_exported(server, model_name):
    """A transfer_q request of its own moves every transfer_q series (whatever ran before it)."""
    before = transfer_q_metrics(server.base_url)
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        timeout=300,
        json={
            "model": model_name,
            "messages": [{"role": "user", "content": "Tell me about your weekend."}],
            "max_tokens": 4,
            "temperature": 0,
            "decoding": TQ,
        },
    )
    assert r.status_code == 200, r.text
    after = transfer_q_metrics(server.base_url)
    for name in TQ_METRICS:
        assert after[name] > before[name], (name, before[name], after[name])
