"""One contract, two engines: the vLLM engine and the Hugging Face engine on the embedded SmolLM2.

vLLM computes in bfloat16, the HF engine in float32, so log-probabilities are compared with a
tolerance and greedy choices allow near-ties (tokens whose log-probabilities differ by less than the
bfloat16 resolution at that magnitude).
"""

from __future__ import annotations

import math

import pytest

from alignd.models.engine import GenerationParams

pytestmark = pytest.mark.vllm

# bfloat16 keeps 8 bits of mantissa: log-probabilities around -2 are resolved to about 0.016.
LOGPROB_TOL = 0.06
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write one kind sentence about rain."}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a prime number."}],
]


@pytest.fixture(params=["hf", "vllm"], scope="module")
def engine(request):
    return request.getfixturevalue("hf_embedded_engine" if request.param == "hf" else "vllm_engine")


@pytest.fixture(scope="module")
def prompts(hf_embedded_engine):
    return [hf_embedded_engine.render_chat(p) for p in PROMPTS]


def test_top_k_next_is_a_sorted_distribution(engine, prompts, loop_thread):
    tops = loop_thread.run(engine.top_k_next(prompts, 10))
    assert len(tops) == len(prompts)
    for top in tops:
        assert len(top) == 10
        assert len({t.token_id for t in top}) == 10
        values = [t.logprob for t in top]
        assert values == sorted(values, reverse=True)
        assert all(v <= 1e-6 for v in values)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-3


def test_greedy_generation_agrees_with_top_k_and_continuation_logprobs(engine, prompts, loop_thread):
    prompt = prompts[0]
    params = GenerationParams(max_tokens=12, temperature=0.0, logprobs=5)
    choice = loop_thread.run(engine.generate(prompt, params, "contract-greedy")).choices[0]
    assert 0 < len(choice.token_ids) <= 12
    assert choice.text == engine.decode(choice.token_ids)
    # greedy: every chosen token is (within a bf16 tie) the most likely one
    for item in choice.logprobs:
        assert item.logprob >= item.top[0].logprob - LOGPROB_TOL
    # the first token is what top_k_next ranks first (or a near-tie of it)
    top = loop_thread.run(engine.top_k_next([prompt], 5))[0]
    first = {t.token_id: t.logprob for t in top}
    assert choice.token_ids[0] in first and first[choice.token_ids[0]] >= top[0].logprob - LOGPROB_TOL
    # scoring the generated text gives back the log-probabilities reported while generating it
    # (vLLM scores a given text in its prefill kernels and generated text in its decode kernels; in
    # bfloat16 single positions differ by up to ~0.13 nats, the average by far less.)
    scored = loop_thread.run(engine.continuation_logprobs([prompt], [choice.token_ids]))[0]
    reported = [i.logprob for i in choice.logprobs]
    assert scored == pytest.approx(reported, abs=0.2)
    assert sum(abs(a - b) for a, b in zip(scored, reported, strict=False)) / len(scored) < 0.04


def test_stream_deltas_concatenate_to_the_whole_answer(engine, prompts, loop_thread):
    params = GenerationParams(max_tokens=16, temperature=0.0)

    async def both():
        whole = await engine.generate(prompts[1], params, "contract-whole")
        deltas = [d async for d in engine.stream(prompts[1], params, "contract-stream")]
        return whole.choices[0], deltas

    whole, deltas = loop_thread.run(both())
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert whole.text == engine.decode(whole.token_ids) and whole.text
    if engine.applies_stop_strings:  # vLLM detokenizes as it streams
        assert "".join(d.text for d in deltas) == whole.text
    else:  # token ids only: alignd.decoding assembles the text (tests/test_generation.py)
        assert all(d.text == "" for d in deltas)
    assert deltas[-1].finish_reason in ("stop", "length")


def test_rollouts_shape_length_eos_and_seed(engine, prompts, loop_thread, embedded_eos_token_ids):
    eos = set(engine.info.eos_token_ids)
    assert eos == embedded_eos_token_ids  # both engines stop on what the model folder names end-of-text
    first = loop_thread.run(engine.rollouts(prompts, n=3, max_tokens=8, temperature=1.0, seed=7))
    again = loop_thread.run(engine.rollouts(prompts, n=3, max_tokens=8, temperature=1.0, seed=7))
    assert [len(g) for g in first] == [3] * len(prompts)
    for group in first:
        for r in group:
            assert 1 <= len(r.token_ids) <= 8
            if r.finish_reason == "stop":
                assert r.token_ids[-1] in eos
            else:
                assert r.finish_reason == "length" and len(r.token_ids) == 8
                assert not eos & set(r.token_ids)
    assert [[r.token_ids for r in g] for g in first] == [[r.token_ids for r in g] for g in again]
    # a rollout that runs to the end of the answer stops at EOS rather than running on
    long = loop_thread.run(engine.rollouts([prompts[2]], n=1, max_tokens=200, temperature=0.0))[0][0]
    assert long.finish_reason == "stop" and long.token_ids[-1] in eos and len(long.token_ids) < 200


def test_continuation_logprobs_of_many_pairs(engine, prompts, loop_thread):
    conts = [engine.encode(" Paris."), engine.encode(" Rain is kind."), []]
    scored = loop_thread.run(engine.continuation_logprobs(prompts, conts))
    assert [len(s) for s in scored] == [len(c) for c in conts]
    assert all(v <= 1e-6 for s in scored for v in s)


def test_hf_and_vllm_agree_on_the_next_token_distribution(hf_embedded_engine, vllm_engine, prompts, loop_thread):
    hf = loop_thread.run(hf_embedded_engine.top_k_next(prompts, 5))
    vl = loop_thread.run(vllm_engine.top_k_next(prompts, 5))
    for a, b in zip(hf, vl, strict=False):
        hf_map = {t.token_id: t.logprob for t in a}
        shared = [t for t in b if t.token_id in hf_map]
        assert len(shared) >= 4  # the same candidates, up to one near-tie swapped at the edge
        for t in shared:
            assert t.logprob == pytest.approx(hf_map[t.token_id], abs=0.15)


def test_next_token_logprobs_score_listed_tokens_as_the_other_primitives_do(engine, prompts, loop_thread):
    """Listed tokens (any, not only the top ones) scored at the prefix: the top-k's own log-probabilities for
    its members, and continuation_logprobs' for one-token continuations (each engine against itself, so the
    tolerance is the engine's run-to-run noise: exact in float32; vLLM's sampler and its prompt
    log-probabilities are separate kernels in bfloat16)."""
    top = loop_thread.run(engine.top_k_next(prompts, 5))
    far = [7, 1234, engine.info.vocab_size - 1]  # tokens nowhere near the top
    wanted = [[t.token_id for t in row] + far for row in top]
    scored = loop_thread.run(engine.next_token_logprobs(prompts, wanted))
    tolerance = 1e-4 if engine.kind == "hf" else LOGPROB_TOL
    for row, listed, values in zip(top, wanted, scored, strict=False):
        assert len(values) == len(listed)
        assert values[:5] == pytest.approx([t.logprob for t in row], abs=tolerance)
        assert max(values[5:]) < values[0]
    single = loop_thread.run(engine.continuation_logprobs([prompts[0]] * len(far), [[z] for z in far]))
    assert scored[0][5:] == pytest.approx([s[0] for s in single], abs=tolerance)


def test_top_k_over_the_whole_vocabulary_ranks_every_token(engine, prompts, loop_thread):
    """k beyond the engine's max_logprobs (the implicit source's top_k 0 asks for the whole vocabulary)."""
    vocabulary = engine.info.vocab_size
    whole = loop_thread.run(engine.top_k_next(prompts[:1], vocabulary))[0]
    assert len(whole) == vocabulary and len({t.token_id for t in whole}) == vocabulary
    assert sum(math.exp(t.logprob) for t in whole) == pytest.approx(1.0, abs=1e-2)
    top = loop_thread.run(engine.top_k_next(prompts[:1], 5))[0]
    # the same top five (compared by value: bfloat16 logits tie exactly, and the two rankings may order a tie
    # differently)
    assert [t.logprob for t in whole[:5]] == pytest.approx([t.logprob for t in top], abs=1e-5)
