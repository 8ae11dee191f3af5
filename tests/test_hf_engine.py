"""Unit tests of the Hugging Face engine on a tiny random Llama built in the test (seconds, no server).

The batched, padded, KV-cached paths are checked against plain one-sequence forward passes.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from alignd.models.engine import GenerationParams
from alignd.models.hf_engine import HFEngine

PREFIXES = [[5, 9, 14], [7], [20, 21, 22, 23, 24, 25], [11, 12]]


def full_logprobs(engine: HFEngine, ids: list[int]) -> torch.Tensor:
    """log p(. | ids[:j+1]) for every position, from one unpadded forward pass without cache."""
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def reference_greedy(engine: HFEngine, prefix: list[int], steps: int) -> list[int]:
    ids = list(prefix)
    out = []
    for _ in range(steps):
        tok = int(full_logprobs(engine, ids)[-1].argmax())
        out.append(tok)
        ids.append(tok)
        if tok in engine.info.eos_token_ids:
            break
    return out


def test_top_k_next_matches_unpadded_forward(tiny_hf_engine):
    result = asyncio.run(tiny_hf_engine.top_k_next(PREFIXES, 5))
    assert len(result) == len(PREFIXES)
    for prefix, top in zip(PREFIXES, result, strict=False):
        expected = full_logprobs(tiny_hf_engine, prefix)[-1]
        values, indices = expected.topk(5)
        assert [t.token_id for t in top] == indices.tolist()
        assert [t.logprob for t in top] == pytest.approx(values.tolist(), abs=1e-4)
        assert all(a.logprob >= b.logprob for a, b in zip(top, top[1:], strict=False))


def test_continuation_logprobs_match_unpadded_forward(tiny_hf_engine):
    continuations = [[3, 4], [30, 31, 32], [8], []]
    result = asyncio.run(tiny_hf_engine.continuation_logprobs(PREFIXES, continuations))
    for prefix, cont, values in zip(PREFIXES, continuations, result, strict=False):
        assert len(values) == len(cont)
        if not cont:
            continue
        full = full_logprobs(tiny_hf_engine, prefix + cont)
        expected = [float(full[len(prefix) - 1 + j, tok]) for j, tok in enumerate(cont)]
        assert values == pytest.approx(expected, abs=1e-4)


def test_continuation_logprobs_reject_mismatched_lengths(tiny_hf_engine):
    with pytest.raises(ValueError, match="same length"):
        asyncio.run(tiny_hf_engine.continuation_logprobs([[1, 2]], [[3], [4]]))


def test_greedy_generation_matches_step_by_step_argmax(tiny_hf_engine):
    prompt = [5, 9, 14, 22]
    result = asyncio.run(
        tiny_hf_engine.generate(prompt, GenerationParams(max_tokens=12, temperature=0.0, logprobs=3), "t")
    )
    choice = result.choices[0]
    assert choice.token_ids == reference_greedy(tiny_hf_engine, prompt, 12)
    assert choice.text == tiny_hf_engine.decode(choice.token_ids)
    # reported log-probabilities are the model's, and the chosen token is the best alternative
    full = full_logprobs(tiny_hf_engine, prompt + choice.token_ids)
    for j, item in enumerate(choice.logprobs):
        assert item.logprob == pytest.approx(float(full[len(prompt) - 1 + j, item.token_id]), abs=1e-4)
        assert item.top[0].token_id == item.token_id
        assert len(item.top) == 3


def test_rollouts_are_batched_padded_and_stop_at_eos(tiny_llama_dir):
    engine = HFEngine.from_pretrained(tiny_llama_dir)
    prefix = [5, 9, 14]
    greedy = reference_greedy(engine, prefix, 6)
    # Make the 3rd greedy token the end-of-sequence token: greedy rollouts must stop on it, keep it.
    stop_token = greedy[2]
    assert stop_token not in greedy[:2]
    engine.info.eos_token_ids = (stop_token,)
    rollouts = asyncio.run(engine.rollouts([prefix, [7, 8]], n=3, max_tokens=6, temperature=0.0))
    assert [len(group) for group in rollouts] == [3, 3]
    for r in rollouts[0]:
        assert r.token_ids == greedy[:3]
        assert r.finish_reason == "stop"
    for r in rollouts[1]:
        assert len(r.token_ids) <= 6
        if r.finish_reason == "length":
            assert len(r.token_ids) == 6 and stop_token not in r.token_ids
        else:
            assert r.token_ids[-1] == stop_token


def test_seeded_sampling_is_reproducible(tiny_hf_engine):
    run = lambda seed: asyncio.run(  # noqa: E731
        tiny_hf_engine.rollouts([[5, 9], [7]], n=2, max_tokens=8, temperature=1.0, seed=seed)
    )
    a, b, c = run(1), run(1), run(2)
    tokens = lambda rs: [[r.token_ids for r in g] for g in rs]  # noqa: E731
    assert tokens(a) == tokens(b)
    assert tokens(a) != tokens(c)


def test_first_token_sampling_frequencies_match_the_model(tiny_hf_engine):
    """Sampling at temperature 1 draws from softmax(logits): a chi-square test on the first token.

    False-alarm rate: the threshold is the 0.999 quantile of chi-square, so a correct sampler fails
    about once in a thousand runs (the seed is fixed, so the run is deterministic)."""
    from scipy.stats import chi2

    prefix = [5, 9, 14]
    probs = full_logprobs(tiny_hf_engine, prefix)[-1].exp()
    draws = 3000
    rollouts = asyncio.run(tiny_hf_engine.rollouts([prefix], n=draws, max_tokens=1, temperature=1.0, seed=123))[0]
    counts = torch.bincount(torch.tensor([r.token_ids[0] for r in rollouts]), minlength=probs.numel()).double()
    expected = probs.double() * draws
    # pool rare tokens into one bin so every expected count is at least 5
    common = expected >= 5
    obs = torch.cat([counts[common], counts[~common].sum().unsqueeze(0)])
    exp = torch.cat([expected[common], expected[~common].sum().unsqueeze(0)])
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert stat < chi2.ppf(0.999, df=len(obs) - 1)


def test_temperature_and_top_p_shape_the_distribution(tiny_hf_engine):
    prefix = [5, 9, 14]
    top1 = int(full_logprobs(tiny_hf_engine, prefix)[-1].argmax())
    # a tiny top_p keeps only the most likely token: sampling becomes greedy
    result = asyncio.run(
        tiny_hf_engine.generate(prefix, GenerationParams(max_tokens=1, temperature=1.0, top_p=1e-6, n=20, seed=0), "t")
    )
    assert {c.token_ids[0] for c in result.choices} == {top1}


def test_stream_concatenates_to_generate_and_leaves_text_to_the_caller(tiny_hf_engine):
    """The transformers engine streams token ids only (stop strings and text are alignd.decoding's:
    tests/test_generation.py); ``generate`` decodes the whole answer."""
    prompt = [20, 21, 22]
    params = GenerationParams(max_tokens=16, temperature=0.0)
    whole = asyncio.run(tiny_hf_engine.generate(prompt, params, "a")).choices[0]

    async def collect(p):
        return [d async for d in tiny_hf_engine.stream(prompt, p, "b")]

    deltas = asyncio.run(collect(params))
    assert not tiny_hf_engine.applies_stop_strings
    assert all(d.text == "" for d in deltas)
    assert sum((d.token_ids for d in deltas), []) == whole.token_ids
    assert whole.text == tiny_hf_engine.decode(whole.token_ids) and whole.text
    assert deltas[-1].finish_reason == whole.finish_reason


def test_closing_a_stream_early_cancels_the_work(tiny_hf_engine):
    async def scenario():
        stream = tiny_hf_engine.stream(
            [5, 9], GenerationParams(max_tokens=200, temperature=1.0, seed=0, ignore_eos=True), "x"
        )
        first = await stream.__anext__()
        await stream.aclose()  # the client went away
        # the engine is free again at once: a new request completes
        again = await tiny_hf_engine.generate([5], GenerationParams(max_tokens=2, temperature=0.0), "y")
        return first, again

    first, again = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert first.token_ids
    assert len(again.choices[0].token_ids) <= 2


def test_chat_template_renders_through_the_tokenizer(tiny_hf_engine):
    ids = tiny_hf_engine.render_chat([{"role": "user", "content": "hello world"}])
    text = tiny_hf_engine.tokenizer.decode(ids)
    assert text.startswith("<s>user: hello world</s>") and text.endswith("assistant: ")


def test_penalties_change_sampling_scores(tiny_hf_engine):
    prompt = [5, 9, 14]
    plain = asyncio.run(tiny_hf_engine.generate(prompt, GenerationParams(max_tokens=20, temperature=0.0), "p"))
    penalised = asyncio.run(
        tiny_hf_engine.generate(prompt, GenerationParams(max_tokens=20, temperature=0.0, frequency_penalty=2.0), "q")
    )
    tokens, pen_tokens = plain.choices[0].token_ids, penalised.choices[0].token_ids
    repeats = lambda t: len(t) - len(set(t))  # noqa: E731
    assert repeats(tokens) > 0, "precondition: the random model repeats itself without a penalty"
    assert repeats(pen_tokens) < repeats(tokens)
