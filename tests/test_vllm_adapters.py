"""An adapter through the real serving path on vLLM (the session's in-process engine, LoRA on): a
random LoRA of the embedded model runs as a LoRARequest in the served engine, and its log-probabilities
agree with the transformers engine's (the adapter merged into the weights) within the engine's precision."""

from __future__ import annotations

import pytest
from support import make_adapter

pytestmark = pytest.mark.vllm

# In float32, vLLM (which applies LoRA as a separate low-rank product) and transformers (the adapter merged)
# score the same tokens within these. In bfloat16 the bounds are measured on the adapted model itself:
# transformers' bfloat16 copy of it against float32, on the same text, is its rounding error (the random x4
# adapter makes it far more sensitive than the base model: 0.81 nats at most, 0.35 on average here, against
# 0.27 / 0.05 for the base); vLLM's kernels round differently, so a token may be off by as much again in the
# other direction: twice the measured error. The adapter's own effect (9 nats a token on average) stays far
# above that, which the test checks, so an adapter applied wrongly is still caught.
TOKEN_TOL, MEAN_TOL = 0.25, 0.05


def assert_scores_like_transformers_merged(adapted, base, merged_hf, loop_thread) -> None:
    """``adapted`` (the adapter on vLLM) scores an answer like transformers with the adapter merged, within
    the tolerances above, and unlike the ``base`` engine (the adapter did something)."""
    from precision import bfloat16_token_errors, is_exact

    prefix = base.render_chat([{"role": "user", "content": "Tell me about your weekend."}])
    answer = base.encode("It was lovely: I walked by the river and read a book in the sun.")
    on_vllm = loop_thread.run(adapted.continuation_logprobs([prefix], [answer]))[0]
    on_hf = loop_thread.run(merged_hf.continuation_logprobs([prefix], [answer]))[0]
    on_base = loop_thread.run(base.continuation_logprobs([prefix], [answer]))[0]
    effect = sum(abs(a - b) for a, b in zip(on_vllm, on_base, strict=False)) / len(on_base)
    token_tol, mean_tol = TOKEN_TOL, MEAN_TOL
    if not is_exact():
        rounding = bfloat16_token_errors(merged_hf.model, prefix, answer)
        token_tol, mean_tol = 2 * max(rounding), 2 * sum(rounding) / len(rounding)
        print(
            f"\nadapted model in bfloat16 vs float32 (transformers): max {max(rounding):.3f}, mean "
            f"{sum(rounding) / len(rounding):.3f} nats a token; tolerances {token_tol:.3f} / {mean_tol:.3f}; "
            f"the adapter's effect {effect:.2f}"
        )
    gaps = [abs(a - b) for a, b in zip(on_vllm, on_hf, strict=False)]
    assert max(gaps) < token_tol and sum(gaps) / len(gaps) < mean_tol, gaps
    assert effect > 5 * max(MEAN_TOL, mean_tol)  # the adapter did something, far beyond the tolerance


@pytest.fixture(scope="module")
def embedded_adapter(embedded_model_dir, tmp_path_factory):
    return make_adapter(embedded_model_dir, tmp_path_factory.mktemp("embedded-adapter"), rank=8, seed=3)


def test_adapter_log_probabilities_agree_between_vllm_and_transformers(
    vllm_engine, hf_embedded_engine, embedded_adapter, embedded_settings, loop_thread
):
    from alignd.models.factory import build_adapter_engine

    lora, info, owned = loop_thread.run(
        build_adapter_engine(vllm_engine, "random", embedded_adapter, embedded_settings)
    )
    assert not owned and info.rank == 8  # a view of the served engine: same weights, batches, cache
    assert_scores_like_transformers_merged(
        lora, vllm_engine, hf_embedded_engine.with_adapter("random", str(embedded_adapter)), loop_thread
    )


def test_prompt_log_probabilities_batched_beside_generation_and_adapters_keep_the_engine_alive(
    vllm_engine, embedded_adapter, embedded_settings, loop_thread
):
    """vLLM 0.32 wraps lm_head with a LoRA layer whose mapping has one row per request, while prompt
    log-probabilities have one row per prompt token: batched with other requests, the worker died
    (einsum size mismatch; vllm-project/vllm#16668). alignd restricts served LoRAs to the projections
    (ALIGND_LORA_TARGET_MODULES), so implicit rewards can be scored in the same batches as rollouts."""
    import asyncio

    from alignd.models.factory import build_adapter_engine

    lora, _, _ = loop_thread.run(build_adapter_engine(vllm_engine, "random", embedded_adapter, embedded_settings))
    questions = ["The capital of France is", "Tell me about your weekend, please, in some detail.", "Why does it rain?"]
    prefixes = [vllm_engine.render_chat([{"role": "user", "content": q}]) for q in questions]
    answers = [vllm_engine.encode(a) for a in (" Paris.", " Rain is kind and gentle to us all.", " Clouds.")]

    async def together():
        return await asyncio.gather(
            vllm_engine.continuation_logprobs(prefixes, answers),
            lora.continuation_logprobs(prefixes, answers),
            vllm_engine.rollouts(prefixes, 2, 12, 1.0, seed=1),
            lora.rollouts(prefixes, 2, 12, 1.0, seed=2),
            vllm_engine.top_k_next(prefixes, 5),
        )

    base, adapted, *_ = loop_thread.run(together())
    alone = loop_thread.run(lora.continuation_logprobs(prefixes[:1], answers[:1]))[0]
    assert [len(s) for s in base] == [len(s) for s in adapted] == [len(a) for a in answers]
    # each request was scored with its own weights, batched or not
    assert adapted[0] == pytest.approx(alone, abs=0.05)
    assert any(abs(a - b) > 0.05 for a, b in zip(base[1], adapted[1], strict=False))


def test_the_default_merged_adapter_runs_on_its_own_engine_and_agrees_with_transformers(
    vllm_engine, hf_embedded_engine, embedded_adapter, embedded_settings, loop_thread
):
    """ALIGND_ADAPTER_SERVING=merged (the default: vLLM-CPU's LoRA requests decode 2-4x slower than a merged
    copy, docs/BENCHMARKS.md): the adapter is merged into a model folder that a second vLLM engine serves,
    which the caller owns, and that engine scores like transformers with the adapter merged."""
    from alignd.models.factory import build_adapter_engine

    merged_settings = embedded_settings.model_copy(update={"adapter_serving": "merged"})
    engine, info, owned = loop_thread.run(
        build_adapter_engine(vllm_engine, "random", embedded_adapter, merged_settings), timeout=900
    )
    try:
        assert owned and engine is not vllm_engine and info.rank == 8
        assert not engine.info.extra.get("lora")  # a plain engine on merged weights
        assert_scores_like_transformers_merged(
            engine, vllm_engine, hf_embedded_engine.with_adapter("random", str(embedded_adapter)), loop_thread
        )
    finally:
        loop_thread.run(engine.shutdown())
