"""Seeded sampling that survives chunked prefill (alignd.models.seeded_sampling).

vLLM 0.32 rewinds a seeded request's generator after a partial prefill, which CPU generators cannot do:
with chunked prefill on, one seeded request with a long prompt killed the engine and every request with
it (EngineDeadError, `RuntimeError: CPU Generator does not use offset`). alignd now sends vLLM no seed: its
logits processor samples seeded requests with Gumbel noise keyed by (seed, step). Checked here:

- the rule itself (no engine): an exact sample of the tempered, nucleus-truncated, penalised distribution,
  the same noise for the same (seed, step), bad values refused;
- alignd's server on the tiny model with chunked prefill on and 64 tokens a step: a burst of 32 seeded
  sampled requests with prompts of ~150 tokens (partial prefills), beside unseeded and greedy ones, all
  answered, the engine alive after, each seeded answer the same alone and in the burst (float32);
- stock ``vllm serve`` with alignd installed, the same settings: requests that ask for alignd's seeded
  sampling (``vllm_xargs``) get the same guarantees. (A plain ``seed`` there still meets vLLM's bug: the
  README says so, and the flag that avoids it.)
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import httpx
import pytest
import torch
from support import ON_THE_SESSION_CORE, ServerProcess, tiny_server_env, vllm_serve_process

from alignd.models.seeded_sampling import (
    SEED_KEY,
    TEMPERATURE_KEY,
    TOP_P_KEY,
    SeededSampling,
    gumbel_noise,
    sampling_scores,
    seeded_sampling_request,
)

BURST_SEEDED = 32
BATCHED_TOKENS = 64  # a step's token budget: a ~150-token prompt takes three prefill steps
LONG_PROMPT = " ".join(["the cat sat on the mat and the dog sat on the log"] * 3)  # ~150 tiny-tokenizer tokens
SHORT_PROMPT = "hello world how are you"
MAX_TOKENS = 8


# ---------------------------------------------------------------------------- the rule
def sample(logits: torch.Tensor, sampling: SeededSampling, output_ids=()) -> int:
    return int(sampling_scores(logits, list(output_ids), sampling).argmax())


def test_noise_depends_on_the_seed_and_the_step_only():
    assert torch.equal(gumbel_noise(7, 3, 100), gumbel_noise(7, 3, 100))
    assert not torch.equal(gumbel_noise(7, 3, 100), gumbel_noise(7, 4, 100))
    assert not torch.equal(gumbel_noise(7, 3, 100), gumbel_noise(8, 3, 100))
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    # a step drawn twice (a discarded partial-prefill step, then the real one) draws the same token
    assert sample(logits, SeededSampling(5, 1.0), [1, 2]) == sample(logits.clone(), SeededSampling(5, 1.0), [1, 2])


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.5, 1.0), (1.0, 0.6)])
def test_seeded_samples_follow_the_tempered_nucleus_distribution(temperature, top_p):
    """4000 seeds: every token's frequency within 4.5 standard errors of its probability, and no token
    outside the nucleus."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0])
    probs = torch.softmax(logits / temperature, -1)
    ordered, order = probs.sort(descending=True)
    keep = order[(ordered.cumsum(-1) - ordered) < top_p]
    target = torch.zeros_like(probs)
    target[keep] = probs[keep] / probs[keep].sum()
    draws = 4000
    counts = Counter(sample(logits, SeededSampling(seed, temperature, top_p)) for seed in range(draws))
    for token, p in enumerate(target.tolist()):
        if p == 0:
            assert counts[token] == 0, (token, counts)
        else:
            sd = math.sqrt(p * (1 - p) / draws)
            assert abs(counts[token] / draws - p) < 4.5 * sd, (token, counts[token] / draws, p)


def test_penalties_are_subtracted_before_the_temperature():
    logits = torch.tensor([3.0, 2.9, -10.0])
    fixed = SeededSampling(1, 1e-4, presence_penalty=0.5, frequency_penalty=0.0)  # near-greedy
    assert sample(logits, fixed) == 0
    assert sample(logits, fixed, output_ids=[0]) == 1  # token 0 was used: 2.5 < 2.9
    counted = SeededSampling(1, 1e-4, frequency_penalty=0.06)
    assert sample(logits, counted, output_ids=[0]) == 0 and sample(logits, counted, output_ids=[0, 0]) == 1


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({SEED_KEY: "7"}, SEED_KEY),
        ({SEED_KEY: 7, TEMPERATURE_KEY: 0}, TEMPERATURE_KEY),
        ({SEED_KEY: 7, TOP_P_KEY: 1.5}, TOP_P_KEY),
        ({SEED_KEY: 7, TEMPERATURE_KEY: float("nan")}, TEMPERATURE_KEY),
    ],
)
def test_bad_values_are_refused_naming_the_key(extra, says):
    with pytest.raises(ValueError, match=says):
        seeded_sampling_request(extra)
    assert seeded_sampling_request({"other": 1}) is None


# ---------------------------------------------------------------------------- through servers
def burst_bodies(model: str, seeded_extra) -> list[dict]:
    """32 seeded sampled requests with long prompts, 4 unseeded sampled and 4 greedy ones beside them."""
    seeded = [
        {"model": model, "prompt": LONG_PROMPT + f" {i}", "max_tokens": MAX_TOKENS, **seeded_extra(1000 + i)}
        for i in range(BURST_SEEDED)
    ]
    others = [
        {"model": model, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": t}
        for p in (LONG_PROMPT, SHORT_PROMPT)
        for t in (1.0, 0.0)
        for _ in range(2)
    ]
    return seeded + others


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=600) as client:
        return list(await asyncio.gather(*(client.post(url, json=body) for body in bodies)))


def check_burst(base_url: str, model: str, seeded_extra) -> None:
    url = base_url + "/v1/completions"
    bodies = burst_bodies(model, seeded_extra)
    replies = asyncio.run(post_all(url, bodies))
    assert [r.status_code for r in replies] == [200] * len(bodies), [
        r.text[:200] for r in replies if r.status_code != 200
    ]
    assert httpx.get(base_url + "/health", timeout=30).status_code == 200  # the engine is alive
    burst = [r.json()["choices"][0]["text"] for r in replies[:BURST_SEEDED]]
    assert len(set(burst)) > BURST_SEEDED // 2  # different seeds, different samples
    for i in (0, 7, 31):  # repeated alone: the same answer, as in the burst (float32: batch-invariant)
        alone = httpx.post(url, json=bodies[i], timeout=300).json()["choices"][0]["text"]
        assert alone == burst[i], (i, alone, burst[i])


CHUNKED = {"ALIGND_ENABLE_CHUNKED_PREFILL": "true", "ALIGND_MAX_NUM_BATCHED_TOKENS": str(BATCHED_TOKENS)}


@pytest.fixture(scope="module")
def chunked_servers(tiny_vllm_dir, tmp_path_factory):
    """alignd and stock ``vllm serve`` of the tiny model, both with chunked prefill on and 64 tokens a step,
    started together (each start is mostly one process's imports: two at once take about one's time on 2
    cores); each burst then runs alone."""
    env = {**tiny_server_env(tiny_vllm_dir), "ALIGND_DTYPE": "float32", **CHUNKED, **ON_THE_SESSION_CORE}
    chunked = ("--enable-chunked-prefill", "--max-num-batched-tokens", str(BATCHED_TOKENS))
    log = tmp_path_factory.mktemp("seeded-vllm-serve") / "vllm-serve.log"
    with (
        ServerProcess(env) as alignd,
        vllm_serve_process(tiny_vllm_dir, "tiny", log, max_model_len=256, extra_args=chunked) as stock,
    ):
        alignd.wait_ready(timeout=600)
        stock.wait_ready(timeout=600)
        yield {"alignd": alignd, "stock": stock}


@pytest.mark.vllm
def test_a_burst_of_seeded_requests_with_partial_prefills_through_alignd(chunked_servers):
    check_burst(chunked_servers["alignd"].base_url, "tiny", lambda seed: {"temperature": 1.0, "seed": seed})


@pytest.mark.vllm
def test_the_same_burst_on_stock_vllm_serve_with_alignd_s_seeded_sampling(chunked_servers):
    check_burst(
        chunked_servers["stock"].base_url,
        "tiny",
        lambda seed: {"temperature": 0.0, "vllm_xargs": {SEED_KEY: seed, TEMPERATURE_KEY: 1.0}},
    )
