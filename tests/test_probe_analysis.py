"""Probe analysis pieces: hidden states (tiny random Llama), few-shot prompts, per-layer analysis, the
plot and the job manager. Fast: no embedded model, no server."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from alignd.errors import NotFoundError
from alignd.probes.analysis import AnalysisParams, analyse_conditions, analyse_layer, analyse_layers, plot_layers
from alignd.probes.fewshot import (
    FewShotItem,
    build_prompt,
    build_prompts,
    dataset_labels,
    format_subject,
    select_shots,
)
from alignd.probes.hidden_states import _batches, layer_representations, num_layers, resolve_layers
from alignd.probes.jobs import JobCancelled, JobConflictError, JobManager, JobQueueFullError

TEXTS = [
    "the cat sat on the mat",
    "hello",
    "a happy answer is kind and warm and helpful today",
    "numbers one two",
    "how are you",
]


def reference_states(engine, text: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's states [tokens, hidden] of one text, alone and unpadded, straight from the model:
    (block inputs / final norm output, block inputs after their input norm)."""
    ids = torch.tensor([engine.encode(text)])
    with torch.inference_mode():
        hs = engine.model(input_ids=ids, output_hidden_states=True).hidden_states
        blocks = engine.model.model.layers
        normed = [blocks[i].input_layernorm(hs[i]) for i in range(len(blocks))] + [hs[-1]]
    return [h[0].float() for h in hs], [h[0].float() for h in normed]


# ------------------------------------------------------------------------------------ hidden states
def test_every_layer_float32_one_row_per_text(tiny_hf_engine):
    reps = asyncio.run(layer_representations(tiny_hf_engine, TEXTS))
    L = num_layers(tiny_hf_engine)
    assert L == 2 and sorted(reps) == [0, 1, 2]
    for X in reps.values():
        assert X.shape == (len(TEXTS), 32) and X.dtype == np.float32 and np.isfinite(X).all()


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("site", ["residual", "normed"])
def test_last_token_of_padded_batch_equals_the_text_alone(tiny_hf_engine, padding_side, site):
    reps = asyncio.run(layer_representations(tiny_hf_engine, TEXTS, site=site, padding_side=padding_side))
    for i, text in enumerate(TEXTS):
        residual, normed = reference_states(tiny_hf_engine, text)
        expected = residual if site == "residual" else normed
        for layer in reps:
            np.testing.assert_allclose(reps[layer][i], expected[layer][-1].numpy(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_mean_pooling_averages_the_real_tokens_only(tiny_hf_engine, padding_side):
    last = asyncio.run(layer_representations(tiny_hf_engine, TEXTS, pooling="last"))
    mean = asyncio.run(layer_representations(tiny_hf_engine, TEXTS, pooling="mean", padding_side=padding_side))
    for i, text in enumerate(TEXTS):
        residual, _ = reference_states(tiny_hf_engine, text)
        for layer in mean:
            np.testing.assert_allclose(mean[layer][i], residual[layer].mean(0).numpy(), atol=2e-5, rtol=1e-5)
    assert not np.allclose(last[1], mean[1])  # the two poolings differ (multi-token texts)


def test_layer_subset_batch_limits_and_progress(tiny_hf_engine):
    seen: list[float] = []
    full = asyncio.run(layer_representations(tiny_hf_engine, TEXTS))
    small = asyncio.run(
        layer_representations(
            tiny_hf_engine, TEXTS, layers=[2, 0], batch_size=2, max_batch_tokens=8, progress=seen.append
        )
    )
    assert sorted(small) == [0, 2]
    for layer in small:
        np.testing.assert_allclose(small[layer], full[layer], atol=2e-5)
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) >= 3


def test_batches_respect_rows_and_padded_tokens():
    lengths = [5, 1, 9, 3, 3, 2, 40]
    batches = _batches(lengths, batch_size=3, max_batch_tokens=12)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 12  # an over-long text rides alone


def test_layer_range_and_bad_input_are_clear(tiny_hf_engine):
    with pytest.raises(ValueError, match=r"layers are 0\.\.2"):
        asyncio.run(layer_representations(tiny_hf_engine, TEXTS, layers=[3]))
    with pytest.raises(ValueError, match="pooling"):
        asyncio.run(layer_representations(tiny_hf_engine, TEXTS, pooling="max"))
    with pytest.raises(ValueError, match="above the model's context of 256"):
        asyncio.run(layer_representations(tiny_hf_engine, ["word " * 300]))
    assert resolve_layers("all", 2) == [0, 1, 2] and resolve_layers([2, 1, 2], 2) == [1, 2]


def test_runs_under_the_engine_lock(tiny_hf_engine):
    """A probe never runs at the same time as the engine's own model calls."""

    async def scenario():
        tiny_hf_engine._lock.acquire()
        try:
            task = asyncio.create_task(layer_representations(tiny_hf_engine, TEXTS))
            await asyncio.sleep(0.3)
            assert not task.done()
        finally:
            tiny_hf_engine._lock.release()
        return await asyncio.wait_for(task, 30)

    assert sorted(asyncio.run(scenario())) == [0, 1, 2]


def test_an_engine_without_hidden_states_is_refused(tiny_hf_engine):
    """The capability comes from the Engine contract (vLLM says no), not from the engine's class."""

    class NoHiddenStates:
        supports_hidden_states = False
        info = tiny_hf_engine.info
        tokenizer = tiny_hf_engine.tokenizer

    with pytest.raises(ValueError, match="does not give hidden states"):
        asyncio.run(layer_representations(NoHiddenStates(), TEXTS))
    assert tiny_hf_engine.supports_hidden_states and tiny_hf_engine.info.num_layers == 2
    assert num_layers(tiny_hf_engine.model) == num_layers(tiny_hf_engine) == 2


def test_a_raising_progress_callback_stops_the_work(tiny_hf_engine):
    calls = []

    def stop(fraction):
        calls.append(fraction)
        raise JobCancelled("stop")

    with pytest.raises(JobCancelled):
        asyncio.run(layer_representations(tiny_hf_engine, TEXTS, batch_size=1, progress=stop))
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------ few-shot
def make_items(n_per_subject: int = 6, subjects=("astronomy", "world_history")) -> list[FewShotItem]:
    return [
        FewShotItem(
            question=f"{s} question {i}?", choices=[f"w{i}", f"x{i}", f"y{i}", f"z{i}"], answer="ABCD"[i % 4], subject=s
        )
        for s in subjects
        for i in range(n_per_subject)
    ]


def test_mmlu_prompt_format():
    shot = FewShotItem(
        question="What is 2 + 2?", choices=["3", "4", "5", "6"], answer=1, subject="elementary_mathematics"
    )
    item = FewShotItem(
        question="What is 3 + 3?", choices=["6", "7", "8", "9"], answer="a", subject="elementary_mathematics"
    )
    assert build_prompt(item, [shot]) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        "What is 3 + 3?\nA. 6\nB. 7\nC. 8\nD. 9\nAnswer:"
    )
    assert build_prompt(item, [], style="bare") == "What is 3 + 3?\nA. 6\nB. 7\nC. 8\nD. 9\nAnswer:"
    assert build_prompt(item.model_copy(update={"subject": None})).startswith(
        "The following are multiple choice questions (with answers).\n\n"
    )
    assert format_subject("high_school_physics") == "high school physics"
    assert item.answer_letter == "A" and shot.answer_letter == "B" and shot.answer_index == 1


def test_item_answers_are_checked():
    with pytest.raises(ValueError, match="not one of the letters A, B"):
        FewShotItem(question="q", choices=["a", "b"], answer="C")
    with pytest.raises(ValueError, match="out of range"):
        FewShotItem(question="q", choices=["a", "b"], answer=2)


def test_shot_choice_is_deterministic_nested_same_subject_and_never_the_item():
    items = make_items()
    for i, item in enumerate(items):
        five = select_shots(items, i, 5, seed=3)
        assert five == select_shots(items, i, 5, seed=3)  # same seed, same shots
        assert select_shots(items, i, 2, seed=3) == five[:2]  # nested across shot counts
        assert item not in five and all(s.subject == item.subject for s in five)
    assert any(select_shots(items, i, 3, seed=0) != select_shots(items, i, 3, seed=1) for i in range(len(items)))
    # not enough of the subject: falls back to the other subjects; not enough at all: a clear error
    mixed = select_shots(items, 0, 8, seed=0)
    assert len(mixed) == 8 and items[0] not in mixed
    with pytest.raises(ValueError, match="needs 20 shots but only 11"):
        select_shots(items, 0, 20)
    prompts = build_prompts(items, 2, seed=0)
    assert len(prompts) == len(items) and all(p.endswith("Answer:") and p.count("Answer:") == 3 for p in prompts)
    assert dataset_labels(items)["subject"][0] == "astronomy" and dataset_labels(items)["answer"][:4] == list("ABCD")


# ------------------------------------------------------------------------------------------ analysis
def blobs(n_per: int = 40, k: int = 3, dim: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 12.0
    X = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centres])
    return X, np.repeat(np.arange(k), n_per)


def test_clusters_are_found_and_match_their_labels():
    X, lab = blobs()
    rng = np.random.default_rng(1)
    noise = rng.normal(size=X.shape)
    out = analyse_layers(
        {0: X, 1: noise}, {"cluster": lab, "random": rng.integers(0, 3, len(lab))}, other={0: X + 1e-3 * noise, 1: X}
    )
    first, second = out
    assert first["layer"] == 0 and first["num_peaks"] == 3 and first["skipped"] is None
    assert first["ari"]["cluster"] > 0.95 and abs(first["ari"]["random"]) < 0.1
    assert first["label_overlap"]["cluster"] > 0.95 and first["core_fraction"] > 0.5
    assert first["neighbourhood_overlap"] > 0.95  # a tiny perturbation keeps the neighbours
    assert 1.0 < first["intrinsic_dimension"] < 8.0 and first["intrinsic_dimension_twonn"] > 1.0
    assert second["num_peaks"] == 1 and abs(second["ari"]["cluster"]) < 0.1
    assert second["neighbourhood_overlap"] < 0.5  # noise vs clusters share few neighbours


def test_duplicated_points_are_dropped_and_too_few_distinct_ones_skip_the_layer():
    X, lab = blobs(n_per=20, k=2)
    twice = np.concatenate([X, X])
    entry = analyse_layer(twice, {"c": np.concatenate([lab, lab])})
    assert entry["n_points"] == 80 and entry["n_unique"] == 40 and entry["num_peaks"] == 2
    assert entry["label_overlap"]["c"] > 0.95  # overlaps accept duplicates
    same = analyse_layer(np.ones((40, 4)), {"c": lab}, other=X)
    assert same["n_unique"] == 1 and "only 1 distinct points" in same["skipped"]
    assert same["intrinsic_dimension"] is None and same["num_peaks"] is None and same["ari"] == {"c": None}
    # identical points: any neighbour list is a tie-break, so no overlap is reported
    assert same["label_overlap"] == {"c": None} and same["neighbourhood_overlap"] is None
    assert "overlaps need more than k_overlap=30" in same["skipped"]


def test_params_say_how_many_points_they_need():
    assert AnalysisParams().min_points == 33
    assert AnalysisParams(k_id=4, k_overlap=10).min_points == 11
    with pytest.raises(ValueError, match="maxk"):
        AnalysisParams(maxk=8)


def test_two_conditions_and_the_png():
    X, lab = blobs()
    result = analyse_conditions({"0-shot": {0: X, 3: 2 * X}, "5-shot": {0: X[::-1].copy(), 3: X}}, {"c": lab})
    assert result["conditions"] == ["0-shot", "5-shot"] and result["compare"]["condition"] == "5-shot"
    assert [e["layer"] for e in result["layers"]] == [0, 3] == [e["layer"] for e in result["compare"]["layers"]]
    assert result["layers"][1]["neighbourhood_overlap"] == pytest.approx(1.0)  # scaling keeps neighbours
    assert result["compare"]["layers"][1]["neighbourhood_overlap"] == result["layers"][1]["neighbourhood_overlap"]
    png = plot_layers(result, title="test")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert plot_layers(result["layers"]).startswith(b"\x89PNG")  # a single condition's list works too


# ------------------------------------------------------------------------------------------ jobs
async def wait_finished(manager: JobManager, job_id: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not manager.get(job_id).finished:
        assert time.monotonic() < deadline, "job did not finish"
        await asyncio.sleep(0.01)


async def test_job_completes_with_progress_and_result():
    manager = JobManager()
    seen = []

    async def work(job):
        for i in range(4):
            job.report((i + 1) / 4)
            seen.append(job.progress)
            await asyncio.sleep(0)
        return {"answer": 42}

    job = manager.submit(work)
    assert job.status == "queued" and job.id.startswith("job-")
    await wait_finished(manager, job.id)
    assert job.status == "done" and job.progress == 1.0 and job.result == {"answer": 42} and job.error is None
    assert seen == [0.25, 0.5, 0.75, 1.0] and job.started_at >= job.created_at and job.finished_at >= job.started_at


async def test_failed_job_keeps_its_error_message():
    manager = JobManager()

    async def work(job):
        raise ValueError("labels 'x' has 3 entries but there are 4 points")

    job = manager.submit(work)
    await wait_finished(manager, job.id)
    assert job.status == "failed" and job.error_code == "failed" and "3 entries but there are 4" in job.error


async def test_cancel_a_running_thread_job_and_a_queued_one():
    manager = JobManager(max_running=1)
    started, stopped = threading.Event(), threading.Event()

    def busy(job):  # a worker thread that reports progress, like the hidden-state pass
        started.set()
        try:
            for i in range(10_000):
                job.report(i / 10_000)
                time.sleep(0.005)
        finally:
            stopped.set()

    async def work(job):
        await asyncio.to_thread(busy, job)

    running = manager.submit(work)
    queued = manager.submit(work)
    await asyncio.to_thread(started.wait, 10)
    assert running.status == "running" and queued.status == "queued"
    manager.cancel(queued.id, "not needed")
    manager.cancel(running.id, "changed my mind")
    assert running.status == "cancelled" and running.error == "changed my mind" and running.error_code == "cancelled"
    assert queued.status == "cancelled" and queued.error == "not needed"
    assert await asyncio.to_thread(stopped.wait, 10)  # the thread stopped at its next report
    with pytest.raises(JobConflictError, match="already finished"):
        manager.cancel(running.id)
    await manager.close()


async def test_queue_bound_eviction_unknown_ids_and_timeout():
    manager = JobManager(max_queued=1, max_running=1, max_finished=2, timeout_s=0.2)
    gate = asyncio.Event()

    async def blocked(job):
        await gate.wait()
        return "ok"

    first = manager.submit(blocked)
    second = manager.submit(blocked)  # first has not started yet: a free slot still counts for it
    with pytest.raises(JobQueueFullError) as info:
        manager.submit(blocked)
    assert info.value.status == 429 and "limit is 1" in info.value.message
    await wait_finished(manager, first.id)
    assert first.status == "failed" and first.error_code == "timeout" and "0.2 s" in first.error
    gate.set()
    await wait_finished(manager, second.id)
    assert second.status == "done"

    async def quick(job):
        return 1

    third = manager.submit(quick)
    await wait_finished(manager, third.id)
    fourth = manager.submit(quick)
    await wait_finished(manager, fourth.id)
    assert [j.id for j in manager.list()] == [third.id, fourth.id]  # the oldest finished were forgotten
    with pytest.raises(NotFoundError):
        manager.get(first.id)
    await manager.close()
    with pytest.raises(Exception, match="shutting down"):
        manager.submit(quick)
