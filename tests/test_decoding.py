"""Correctness of the decoding methods on a tiny model whose Q can be computed exactly.

The world: a random Llama over a 6-token vocabulary ("a" .. "e" and the end token), a horizon of a
few tokens, and a reward that counts the letter "c" in the answer. Every continuation can be
enumerated, so Q(s, z) = E_{tau ~ policy(.|s, z)} r(s, z, tau) is exact.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from scipy.stats import chi2

from alignd.decoding.methods import BestOfNDecoder, BlockwiseCDDecoder, ValueGuidedDecoder
from alignd.decoding.prompt import Policy, Prompt
from alignd.decoding.rule import TransferQLogitsProcessor, reweight
from alignd.decoding.values import FunctionValue, PartialRewardValue, RolloutValueEstimator
from alignd.models.engine import GenerationParams
from alignd.models.hf_engine import HFEngine
from alignd.rewards.base import Reward, RewardScore

WORDS = ["a", "b", "c", "d", "e"]
EOS = 5
PROMPT = [0, 1]  # "a b"


def build_letter_model(path: Path, seed: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)} | {"</s>": EOS}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    config = LlamaConfig(
        vocab_size=6,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        eos_token_id=EOS,
        pad_token_id=EOS,
        bos_token_id=EOS,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # a peaked but not degenerate distribution
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    return HFEngine.from_pretrained(build_letter_model(tmp_path_factory.mktemp("sft"), seed=3))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return HFEngine.from_pretrained(build_letter_model(tmp_path_factory.mktemp("baseline"), seed=4))


class LetterCount(Reward):
    """r = number of "c" in the answer, minus 0.5 per "e"."""

    name = kind = "letters"

    async def score(self, items, *, token_values=False, truncate=False):
        return [RewardScore(i.response.split().count("c") - 0.5 * i.response.split().count("e")) for i in items]


def reward_of(tokens: list[int]) -> float:
    words = [WORDS[t] for t in tokens if t != EOS]
    return words.count("c") - 0.5 * words.count("e")


def next_logprobs(engine: HFEngine, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)


def exact_q(engine: HFEngine, prefix: list[int], generated: list[int], z: int, rollout_len: int) -> float:
    """E over every continuation of up to rollout_len tokens (stopping at EOS) sampled at temperature 1."""
    if z == EOS:
        return reward_of(generated + [z])

    def expand(tail: list[int], prob: float) -> float:
        if len(tail) == rollout_len or (tail and tail[-1] == EOS):
            return prob * reward_of(generated + [z] + tail)
        lp = next_logprobs(engine, prefix + generated + [z] + tail)
        return sum(expand(tail + [t], prob * math.exp(float(lp[t]))) for t in range(6))

    return expand([], 1.0)


def run(decoder, prompt=PROMPT):
    async def go():
        return [c async for c in decoder.run(Prompt(tuple(prompt), text="a b"))]

    return asyncio.run(go())


# ---------------------------------------------------------------------------- the rule itself
def test_reweight_on_hand_built_numbers():
    ids, sft_lp, q = [7, 8, 9], [math.log(0.5), math.log(0.3), math.log(0.2)], [0.0, 1.0, 2.0]
    before = (list(sft_lp), list(q))
    rule = reweight(ids, sft_lp, q, alpha=0.5)
    weights = [0.5 * math.exp(0 / 0.5), 0.3 * math.exp(1 / 0.5), 0.2 * math.exp(2 / 0.5)]
    expected = [math.log(w / sum(weights)) for w in weights]
    assert rule.logprobs == pytest.approx(expected, abs=1e-12)
    assert rule.greedy_index() == 2
    assert (sft_lp, q) == before  # inputs untouched
    # exact KL over the candidate set, against the full-vocabulary SFT probabilities
    assert rule.kl_from_sft == pytest.approx(
        sum(math.exp(lp) * (lp - s) for lp, s in zip(expected, sft_lp, strict=True))
    )
    # alpha -> infinity is the SFT distribution restricted to the candidates (renormalised), KL = -log(mass)
    sft_like = reweight(ids, sft_lp, q, alpha=math.inf)
    assert sft_like.logprobs == pytest.approx(sft_lp) and sft_like.greedy_index() == 0
    assert sft_like.kl_from_sft == pytest.approx(0.0, abs=1e-12)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            reweight(ids, sft_lp, q, alpha=bad)
    with pytest.raises(ValueError):
        reweight(ids, sft_lp[:2], q, alpha=1.0)


# ---------------------------------------------------------------------------- TQ* with exact Q
def test_greedy_tq_with_exact_q_takes_the_argmax_every_step(sft, baseline):
    alpha, k, horizon = 0.5, 4, 3
    q_fn = lambda generated, z: exact_q(baseline, PROMPT, generated, z, rollout_len=2)  # noqa: E731
    decoder = ValueGuidedDecoder(
        Policy(sft, "sft"),
        FunctionValue(q_fn),
        GenerationParams(max_tokens=horizon, temperature=0.0),
        alpha=alpha,
        top_k=k,
    )
    got = [t for c in run(decoder) for t in c.token_ids]
    # brute force: the same rule written out by hand from plain forward passes
    expected: list[int] = []
    for _ in range(horizon):
        lp = next_logprobs(sft, PROMPT + expected)
        top = lp.topk(k)
        scores = [float(v) + q_fn(expected, int(t)) / alpha for v, t in zip(top.values, top.indices, strict=False)]
        expected.append(int(top.indices[max(range(k), key=lambda i: scores[i])]))
        if expected[-1] == EOS:
            break
    assert got == expected
    plain = run(
        ValueGuidedDecoder(
            Policy(sft, "sft"),
            FunctionValue(lambda g, z: 0.0),
            GenerationParams(max_tokens=horizon, temperature=0.0),
            alpha=alpha,
            top_k=k,
        )
    )
    assert got != [t for c in plain for t in c.token_ids], "precondition: the values change the answer"


def test_sampling_frequencies_match_pi_sft_times_exp_q_over_alpha(sft, baseline):
    """First-token frequencies over 3000 seeded draws against pi_sft * exp(Q/alpha) over the top-k,
    normalised. Chi-square at the 0.999 quantile: a correct sampler fails about 1 run in 1000."""
    alpha, k, draws = 1.0, 5, 3000
    q = {z: exact_q(baseline, PROMPT, [], z, rollout_len=2) for z in range(6)}
    lp = next_logprobs(sft, PROMPT)
    top = lp.topk(k).indices.tolist()
    weights = torch.tensor([math.exp(float(lp[z]) + q[z] / alpha) for z in top])
    expected = (weights / weights.sum() * draws).tolist()

    async def draw_all():
        counts = Counter()
        for seed in range(draws):
            decoder = ValueGuidedDecoder(
                Policy(sft, "sft"),
                FunctionValue(lambda g, z: q[z]),
                GenerationParams(max_tokens=1, temperature=1.0, seed=seed),
                alpha=alpha,
                top_k=k,
            )
            async for chunk in decoder.run(Prompt(tuple(PROMPT))):
                counts[chunk.token_ids[0]] += 1
        return counts

    counts = asyncio.run(draw_all())
    assert set(counts) <= set(top)
    observed = [counts[z] for z in top]
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=False))
    assert stat < chi2.ppf(0.999, df=k - 1), (observed, expected)


def test_rollout_estimator_converges_to_exact_q(sft, baseline):
    """Direct transfer: the rollout average approaches Q^{rho_BL}; its error shrinks like 1/sqrt(N)."""
    generated, candidates = [2], [0, 2, 3]
    exact = [exact_q(baseline, PROMPT, generated, z, rollout_len=2) for z in candidates]

    def estimator_for(n: int) -> RolloutValueEstimator:
        return RolloutValueEstimator(
            Policy(baseline, "bl"), LetterCount(), num_rollouts=n, rollout_len=2, temperature=1.0
        )

    errors = {}
    for n in (8, 2048):
        values, cost = asyncio.run(
            estimator_for(n).estimate(Prompt(tuple(PROMPT)), PROMPT, generated, candidates, seed=5)
        )
        errors[n] = max(abs(v - e) for v, e in zip(values, exact, strict=False))
        assert cost.rollouts == n * len(candidates)
    # reward in [-1, 3] over 3 tokens: the standard error at N=2048 is below 0.04, so 0.15 is > 3.5 sigma
    assert errors[2048] < 0.15
    assert errors[2048] < errors[8]


def test_cd_rolls_out_the_sft_model_itself(sft, baseline):
    """CD's Q is Q^{pi_sft}: with 8192 rollouts (standard error about 0.01) the estimate sits within
    0.04 of the SFT model's exact Q, and the baseline's exact Q is more than 0.07 away."""
    generated, candidates = [], [0, 1]
    exact_sft = [exact_q(sft, PROMPT, generated, z, rollout_len=2) for z in candidates]
    exact_bl = [exact_q(baseline, PROMPT, generated, z, rollout_len=2) for z in candidates]
    estimator = RolloutValueEstimator(
        Policy(sft, "sft"), LetterCount(), num_rollouts=8192, rollout_len=2, temperature=1.0
    )
    values, _ = asyncio.run(estimator.estimate(Prompt(tuple(PROMPT)), PROMPT, generated, candidates, seed=9))
    assert values == pytest.approx(exact_sft, abs=0.04)
    assert all(abs(a - b) > 0.07 for a, b in zip(exact_sft, exact_bl, strict=False)), (
        "precondition: the two policies differ"
    )


def test_indirect_transfer_uses_self_normalised_importance_weights(sft, baseline):
    class Half(Reward):
        name = kind = "half"

        async def score(self, items, *, token_values=False, truncate=False):
            return [RewardScore(0.5 * i.response.split().count("c") + len(i.response.split()) * 0.1) for i in items]

    beta, n = 0.7, 6
    kwargs = dict(num_rollouts=n, rollout_len=3, temperature=1.0)
    direct = RolloutValueEstimator(Policy(baseline, "bl"), LetterCount(), **kwargs)
    indirect = RolloutValueEstimator(Policy(baseline, "bl"), LetterCount(), baseline_reward=Half(), beta=beta, **kwargs)
    prompt = Prompt(tuple(PROMPT))
    # same seed -> same rollouts; recompute the weights by hand from them
    rollouts = asyncio.run(
        baseline.rollouts([PROMPT + [z] for z in (1, 2)], n=n, max_tokens=3, temperature=1.0, seed=3)
    )
    values, _ = asyncio.run(indirect.estimate(prompt, PROMPT, [], [1, 2], seed=3))
    direct_values, _ = asyncio.run(direct.estimate(prompt, PROMPT, [], [1, 2], seed=3))
    for z, group, value, plain in zip((1, 2), rollouts, values, direct_values, strict=False):
        texts = [" ".join(WORDS[t] for t in [z] + r.token_ids if t != EOS) for r in group]
        r = [t.split().count("c") - 0.5 * t.split().count("e") for t in texts]
        r_bl = [0.5 * t.split().count("c") + len(t.split()) * 0.1 for t in texts]
        w = [math.exp((a - b) / beta) for a, b in zip(r, r_bl, strict=False)]
        assert value == pytest.approx(sum(wi * ri for wi, ri in zip(w, r, strict=False)) / sum(w), abs=1e-9)
        assert plain == pytest.approx(sum(r) / n, abs=1e-9)


def test_args_is_the_rule_with_the_partial_reward(sft):
    alpha, k = 0.25, 4
    decoder = ValueGuidedDecoder(
        Policy(sft, "sft"),
        PartialRewardValue(LetterCount(), sft.decode),
        GenerationParams(max_tokens=3, temperature=0.0),
        alpha=alpha,
        top_k=k,
    )
    got = [t for c in run(decoder) for t in c.token_ids]
    expected: list[int] = []
    for _ in range(3):
        lp = next_logprobs(sft, PROMPT + expected)
        top = lp.topk(k)
        scores = [
            float(v) + reward_of(expected + [int(t)]) / alpha for v, t in zip(top.values, top.indices, strict=False)
        ]
        expected.append(int(top.indices[max(range(k), key=lambda i: scores[i])]))
        if expected[-1] == EOS:
            break
    assert got == expected


def test_very_large_alpha_reproduces_sft_greedy(sft, baseline):
    estimator = RolloutValueEstimator(Policy(baseline, "bl"), LetterCount(), num_rollouts=1, rollout_len=3)
    decoder = ValueGuidedDecoder(
        Policy(sft, "sft"), estimator, GenerationParams(max_tokens=8, temperature=0.0), alpha=1000000000000.0, top_k=6
    )
    tq = [t for c in run(decoder) for t in c.token_ids]
    greedy = (
        asyncio.run(sft.generate(PROMPT, GenerationParams(max_tokens=8, temperature=0.0), "g")).choices[0].token_ids
    )
    assert tq == greedy


def test_best_of_n_returns_the_best_of_its_samples(sft):
    decoder = BestOfNDecoder(
        Policy(sft, "sft"),
        LetterCount(),
        GenerationParams(max_tokens=4, seed=21, temperature=0.0),
        num_samples=8,
        record_candidates=True,
    )
    [chunk] = run(decoder)
    samples = asyncio.run(sft.rollouts([PROMPT], n=8, max_tokens=4, temperature=1.0, seed=21))[0]
    rewards = [reward_of(s.token_ids) for s in samples]
    assert reward_of(chunk.token_ids) == max(rewards)
    assert chunk.step.kl == pytest.approx(math.log(8) - 7 / 8)
    assert len(set(map(tuple, (s.token_ids for s in samples)))) > 1, "precondition: the samples differ"


def test_blockwise_cd_keeps_the_best_block(sft):
    decoder = BlockwiseCDDecoder(
        Policy(sft, "sft"),
        LetterCount(),
        GenerationParams(max_tokens=2, seed=4, temperature=0.0),
        num_blocks=6,
        block_len=2,
        record_candidates=True,
    )
    [chunk] = run(decoder)
    values = [c.value for c in chunk.step.candidates]
    assert reward_of(chunk.token_ids) == max(values)


def test_block_size_and_confidence_gating_reduce_value_steps(sft, baseline):
    calls = []

    def q_fn(generated, z):
        calls.append(len(generated))
        return exact_q(baseline, PROMPT, generated, z, rollout_len=1)

    base = ValueGuidedDecoder(
        Policy(sft, "sft"), FunctionValue(q_fn), GenerationParams(max_tokens=6, temperature=0.0), top_k=3
    )
    steps_every_token = sum(1 for c in run(base) if not c.step.gated)
    calls.clear()
    blocked = ValueGuidedDecoder(
        Policy(sft, "sft"), FunctionValue(q_fn), GenerationParams(max_tokens=6, temperature=0.0), top_k=3, block_size=3
    )
    chunks = run(blocked)
    assert sum(len(c.token_ids) for c in chunks) <= 6
    assert len(chunks) < steps_every_token
    gated = ValueGuidedDecoder(
        Policy(sft, "sft"),
        FunctionValue(q_fn),
        GenerationParams(max_tokens=6, temperature=0.0),
        top_k=3,
        confidence_threshold=1e-09,
    )
    assert all(c.step.gated and c.step.kl == 0.0 for c in run(gated))  # every step is "confident": no value work


def test_logits_processor_gives_the_same_greedy_answer_as_the_decoder(sft, baseline):
    """The rule is one implementation: transformers' generate with TransferQLogitsProcessor and the
    server's ValueGuidedDecoder agree token for token."""
    from transformers import LogitsProcessorList

    alpha, k = 0.5, 4
    q_fn = lambda generated, z: exact_q(baseline, PROMPT, generated, z, rollout_len=1)  # noqa: E731
    decoder = ValueGuidedDecoder(
        Policy(sft, "sft"), FunctionValue(q_fn), GenerationParams(max_tokens=4, temperature=0.0), alpha=alpha, top_k=k
    )
    ours = [t for c in run(decoder) for t in c.token_ids]
    processor = TransferQLogitsProcessor(
        lambda ids, cands: [q_fn(ids[len(PROMPT) :], z) for z in cands], top_k=k, alpha=alpha
    )
    out = sft.model.generate(
        torch.tensor([PROMPT]),
        attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
        logits_processor=LogitsProcessorList([processor]),
        do_sample=False,
        max_new_tokens=4,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    theirs = out[0, len(PROMPT) :].tolist()
    if EOS in theirs:
        theirs = theirs[: theirs.index(EOS) + 1]
    assert ours == theirs
    with pytest.raises(ValueError, match="top_k"):
        TransferQLogitsProcessor(q_fn, top_k=0)


def test_enumeration_helper_is_a_distribution(baseline):
    """Sanity of the exact-Q helper: with r = 1 everywhere, the expectation is 1."""
    total = 0.0
    lp = next_logprobs(baseline, PROMPT)
    for a, b in itertools.product(range(6), repeat=2):
        p = math.exp(float(lp[a]))
        if a == EOS:
            total += p if b == 0 else 0.0
            continue
        total += p * math.exp(float(next_logprobs(baseline, PROMPT + [a])[b]))
    assert total == pytest.approx(1.0, abs=1e-9)


def test_pruning_keeps_the_greedy_answer_and_saves_rollouts(sft, baseline):
    """Candidates whose SFT log-probability trails the best by more than (hi - lo) / alpha cannot win:
    skipping their rollouts leaves the greedy answer unchanged."""

    class BoundedLetters(LetterCount):
        bounds = (-2.5, 5.0)  # answers of at most 5 words here

    def decode(prune):
        estimator = RolloutValueEstimator(Policy(baseline, "bl"), BoundedLetters(), num_rollouts=1, rollout_len=2)
        decoder = ValueGuidedDecoder(
            Policy(sft, "sft"),
            estimator,
            GenerationParams(max_tokens=3, temperature=0.0),
            alpha=12.0,
            top_k=6,
            prune=prune,
        )
        chunks = run(decoder)
        return [t for c in chunks for t in c.token_ids], sum(c.step.cost.rollouts for c in chunks)

    (pruned_tokens, pruned_rollouts), (full_tokens, full_rollouts) = decode(True), decode(False)
    assert pruned_tokens == full_tokens
    assert pruned_rollouts < full_rollouts


def test_indirect_transfer_needs_two_rollouts():
    """With one rollout the self-normalised importance weights cancel: it would be direct transfer."""
    from alignd.decoding.config import DecodingConfig
    from alignd.errors import InvalidRequestError
    from alignd.settings import Settings

    settings = Settings(decoding_num_rollouts=1)
    resolved = DecodingConfig(method="transfer_q", transfer="indirect").resolved(settings)
    assert resolved.num_rollouts == 2 and resolved.rollout_temperature == 1.0
    assert DecodingConfig(method="transfer_q").resolved(settings).num_rollouts == 1  # direct keeps the default
    with pytest.raises(InvalidRequestError, match="num_rollouts >= 2"):
        DecodingConfig(method="transfer_q", transfer="indirect", num_rollouts=1).resolved(settings)
    with pytest.raises(InvalidRequestError, match="rollout_temperature"):  # greedy rollouts would be identical
        DecodingConfig(method="transfer_q", transfer="indirect", rollout_temperature=0.0).resolved(settings)


# ---------------------------------------------------------------------------- the request's sampling fields
def test_repetition_penalties_follow_openai_definition():
    from alignd.decoding.rule import repetition_penalties

    answer = [1, 2, 2, 3, 2]
    assert repetition_penalties([2, 1, 4], answer, presence_penalty=0.5, frequency_penalty=0.25) == [
        pytest.approx(0.5 + 3 * 0.25),
        pytest.approx(0.5 + 0.25),
        0.0,
    ]
    assert repetition_penalties([2], answer, 0.0, 0.0) is None  # nothing to apply


def test_penalties_shift_the_rule_but_not_the_kl_reference():
    ids, sft_lp, q, pen = [4, 7, 9], [math.log(0.5), math.log(0.3), math.log(0.1)], [0.0, 0.2, 0.4], [1.5, 0.0, 0.0]
    rule = reweight(ids, sft_lp, q, alpha=0.5, penalties=pen)
    scores = torch.tensor(sft_lp, dtype=torch.float64) - torch.tensor(pen, dtype=torch.float64) + torch.tensor(q) / 0.5
    assert rule.logprobs == pytest.approx(torch.log_softmax(scores, -1).tolist())
    # KL is measured from the SFT model's own (unpenalised) probabilities
    kl = sum(math.exp(lp) * (lp - s) for lp, s in zip(rule.logprobs, sft_lp, strict=False))
    assert rule.kl_from_sft == pytest.approx(kl)
    assert rule.greedy_index() != reweight(ids, sft_lp, q, alpha=0.5).greedy_index()  # the penalty moved the choice


def test_top_p_limits_the_value_guided_candidates(sft):
    top_p = 0.6
    decoder = ValueGuidedDecoder(
        Policy(sft, "sft"),
        FunctionValue(lambda g, z: 0.0),
        GenerationParams(max_tokens=4, temperature=0.0, top_p=top_p),
        top_k=6,
        record_candidates=True,
    )
    generated: list[int] = []
    for chunk in run(decoder):
        probs = sorted(next_logprobs(sft, PROMPT + generated).exp().tolist(), reverse=True)
        expected = next(i + 1 for i in range(6) if sum(probs[: i + 1]) >= top_p)
        assert len(chunk.step.candidates) == expected
        generated += chunk.token_ids


def test_frequency_penalty_repeats_fewer_tokens_and_shows_in_the_diagnostics(sft):
    no_end = FunctionValue(lambda g, z: -100.0 if z == EOS else 0.0)  # answers run to max_tokens

    def decode(frequency_penalty):
        params = GenerationParams(max_tokens=5, temperature=0.0, frequency_penalty=frequency_penalty)
        chunks = run(ValueGuidedDecoder(Policy(sft, "sft"), no_end, params, top_k=6, record_candidates=True))
        return [t for c in chunks for t in c.token_ids], chunks

    plain, _ = decode(0.0)
    penalised, chunks = decode(2.0)
    repeats = lambda tokens: len(tokens) - len(set(tokens))  # noqa: E731
    assert repeats(penalised) < repeats(plain), (plain, penalised)
    for i, chunk in enumerate(chunks):
        answer = penalised[:i]
        for c in chunk.step.candidates:
            assert c.penalty == pytest.approx(2.0 * answer.count(c.token_id))
