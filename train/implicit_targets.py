"""Dense implicit targets for ``alignd train value-head --targets implicit``.

For a policy trained by DPO (or IRFT) from the SFT model with coefficient beta,
``beta * (log pi_BL(z|s) - log pi_SFT(z|s)) = Q(s, z) - V(s)`` (Rafailov et al. 2024, "From r to Q*"): the
values ``decoding.value='implicit'`` decodes with (``alignd.decoding.values.ImplicitValue``). V(s) is the same
for every candidate of a state and the head's loss compares differences within a state only, so the log-ratio
is an exact target. And it is dense: one teacher-forced pass of each model over a sampled answer gives the
targets of every state along it, for every candidate, where rollout targets cost k x L baseline tokens a state.

    training prompts --(SFT engine, temperature T, one seed per answer)--> answers
        --> <out>.partial/answers.jsonl, one line per finished answer (resumable)
    then, in transformers (float32, batched): one pass of the SFT model (h(s), the LM head's input, and
    log pi_SFT) and one of the merged baseline (log pi_BL) over prompt + answer; at each state
    s_j = prompt + answer[:j] (j = 0 .. len - 1, the decision of answer token j): the SFT model's top-k z and
    the targets beta * (log pi_BL(z|s_j) - log pi_SFT(z|s_j)).

The features are the same as for rollout targets (h(s) and the candidates' input embeddings), from the same
pass, so a head trained here is served exactly as any other.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from alignd.models.baseline_stack import IMPLICIT_KINDS
from alignd.train.data import TrainingInputError, append_work_records, read_work_file

if TYPE_CHECKING:
    import torch

    from alignd.settings import Settings
    from alignd.train.value_head import StateSlot, _MadeData, _RunContext


@dataclass(frozen=True)
class ImplicitBaseline:
    """A baseline with an exact token-level Q: an adapter trained by DPO or IRFT from the served weights."""

    name: str
    adapter: Path
    beta: float
    reward: str  # the reward it was trained for (its manifest's), else its own implicit reward
    trained_by: str


def implicit_baseline(name: str, kind: str, source: str, manifest: dict) -> ImplicitBaseline:
    """The baseline's implicit form, or a TrainingInputError naming what is missing (the same conditions as
    the server's ``Baseline.implicit_form``; the base weights digest was checked when the adapter loaded)."""
    use = "use --targets rollouts"
    if kind != "adapter":
        raise TrainingInputError(
            f"--targets implicit: baseline '{name}' is a {kind} baseline, not an adapter trained "
            f"by 'alignd train dpo|irft' from this model, so it has no implicit Q; {use}"
        )
    trained_by = manifest.get("kind")
    if trained_by not in IMPLICIT_KINDS:
        raise TrainingInputError(
            f"--targets implicit: adapter '{name}' was not trained by DPO or IRFT (its manifest's "
            f"kind: {trained_by or 'none'}), so its log-ratio to the SFT model is not its Q; {use}"
        )
    beta = manifest.get("beta")
    if beta is None or not float(beta) > 0:
        raise TrainingInputError(
            f"--targets implicit: adapter '{name}': its manifest has no beta > 0, the scale of its implicit Q; {use}"
        )
    if not (manifest.get("base_model") or {}).get("weights_digest"):
        raise TrainingInputError(
            f"--targets implicit: adapter '{name}': its manifest records no base-model weights "
            f"digest, so it cannot be checked to be a policy of this model; {use}"
        )
    reward = manifest.get("reward") or f"{name}_implicit"
    return ImplicitBaseline(name, Path(source), float(beta), str(reward), str(trained_by))


# ---------------------------------------------------------------------------- answers
async def _sample(
    engine_settings: Settings,
    todo: Sequence[StateSlot],
    *,
    answer_len: int,
    temperature: float,
    concurrency: int,
    answers_file: Path,
    total: int,
    progress: bool,
) -> None:
    from alignd.models.factory import open_engine

    async with open_engine(engine_settings, progress=progress) as engine:
        context = engine.info.max_model_len
        eos = frozenset(engine.info.eos_token_ids)
        pending = iter(todo)
        bar = tqdm(
            total=total,
            initial=total - len(todo),
            unit="answer",
            disable=not progress,
            desc=f"SFT answers (temperature {temperature:g})",
        )

        async def worker() -> None:
            for slot in pending:  # one shared iterator: each slot goes to one worker
                prefix = list(engine.render_chat(list(slot.prompt.chat())))
                if len(prefix) + answer_len > context:
                    raise TrainingInputError(
                        f"prompt '{slot.prompt.id}' is {len(prefix)} tokens; with --answer-len "
                        f"{answer_len} it exceeds the model's context of {context}"
                    )
                answer = (await engine.rollouts([prefix], 1, answer_len, temperature, seed=slot.answer_seed))[0][
                    0
                ].token_ids
                append_work_records(
                    answers_file,
                    [
                        {
                            "slot": slot.index,
                            "prompt_id": slot.prompt.id,
                            "prompt_tokens": prefix,
                            "answer": list(answer),
                            "finished": bool(answer) and answer[-1] in eos,
                        }
                    ],
                )
                bar.update(1)

        with bar:
            try:
                async with asyncio.TaskGroup() as group:
                    for _ in range(min(concurrency, len(todo))):
                        group.create_task(worker())
            except BaseExceptionGroup as failed:
                raise failed.exceptions[0] from None


def sample_answers(
    engine_settings: Settings,
    slots: Sequence[StateSlot],
    answers_file: Path,
    *,
    answer_len: int,
    temperature: float,
    concurrency: int,
    progress: bool,
) -> list[dict]:
    """The answers of ``slots``, in slot order: those already in ``answers_file`` are kept, the others
    sampled on the served engine (one seeded request each) and appended as they finish."""
    done = {r["slot"] for r in read_work_file(answers_file)}
    todo = [s for s in slots if s.index not in done]
    if todo:
        asyncio.run(
            _sample(
                engine_settings,
                todo,
                answer_len=answer_len,
                temperature=temperature,
                concurrency=concurrency,
                answers_file=answers_file,
                total=len(slots),
                progress=progress,
            )
        )
        gc.collect()  # free the engine now, while the modules its finalizers need are alive (see train/dpo.py)
    by_slot = {r["slot"]: r for r in read_work_file(answers_file)}
    return [by_slot[s.index] for s in slots]


# ---------------------------------------------------------------------------- teacher-forced targets
@dataclass
class DenseStates:
    """Every state of the answers: ``records`` (slot, prompt_id, answer_slot, position, candidates,
    sft_logprobs, values) and ``hidden`` [N, d], the SFT model's h(s) at each, in the same order."""

    records: list[dict]
    hidden: torch.Tensor
    sampled_in_top_k: float  # fraction of the sampled answer tokens among the SFT top-k (an alignment check)


def state_id(answer_slot: int, position: int, answer_len: int) -> int:
    return answer_slot * answer_len + position


def _padded(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    ids = torch.zeros(len(sequences), max(len(s) for s in sequences), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, seq in enumerate(sequences):
        ids[j, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[j, : len(seq)] = 1
    return ids, mask


def dense_targets(
    sft_model,
    baseline_model,
    answers: Sequence[dict],
    *,
    top_k: int,
    beta: float,
    answer_len: int,
    batch_size: int = 8,
    progress: bool = False,
) -> DenseStates:
    """One forward of each model per batch of answers (right-padded: a causal model's real tokens never
    see the padding). The row of position ``P - 1 + j`` (P prompt tokens) predicts answer token j."""
    import torch

    records: list[dict] = []
    hidden_rows: list[torch.Tensor] = []
    in_top = total = 0
    order = sorted(range(len(answers)), key=lambda i: len(answers[i]["prompt_tokens"]) + len(answers[i]["answer"]))
    with (
        torch.inference_mode(),
        tqdm(
            total=len(order),
            unit="answer",
            disable=not progress,
            desc="implicit targets (teacher-forced, transformers float32)",
        ) as bar,
    ):
        for start in range(0, len(order), batch_size):
            batch = [answers[i] for i in order[start : start + batch_size]]
            ids, mask = _padded([a["prompt_tokens"] + a["answer"] for a in batch])
            states = sft_model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            sft_lm_head = sft_model.get_output_embeddings()
            baseline_logits = baseline_model(input_ids=ids, attention_mask=mask).logits.float()
            for j, answer in enumerate(batch):
                p, n = len(answer["prompt_tokens"]), len(answer["answer"])
                if n == 0:
                    continue
                rows = slice(p - 1, p - 1 + n)
                h = states[j, rows]
                sft = torch.log_softmax(sft_lm_head(h).float(), dim=-1)
                base = torch.log_softmax(baseline_logits[j, rows], dim=-1)
                top = sft.topk(top_k, dim=-1)
                values = beta * (base.gather(-1, top.indices) - top.values)
                sampled = torch.tensor(answer["answer"])
                in_top += int((top.indices == sampled[:, None]).any(-1).sum())
                total += n
                for pos in range(n):
                    records.append(
                        {
                            "slot": state_id(answer["slot"], pos, answer_len),
                            "prompt_id": answer["prompt_id"],
                            "answer_slot": answer["slot"],
                            "position": pos,
                            "candidates": top.indices[pos].tolist(),
                            "sft_logprobs": top.values[pos].tolist(),
                            "values": values[pos].tolist(),
                        }
                    )
                hidden_rows.append(h.clone())
            bar.update(len(batch))
    d = int(sft_model.config.get_text_config().hidden_size)
    hidden = torch.cat(hidden_rows) if hidden_rows else torch.empty(0, d)
    return DenseStates(records, hidden, in_top / total if total else math.nan)


def load_models(model_dir: Path, adapter: Path, cache_dir: Path):
    """The SFT model and the baseline (the adapter merged into a copy of the SFT weights, as the server's
    merged serving makes it: the same folder, cached), both float32 in transformers, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignd.models.loading import merge_adapter
    from alignd.train.tuning import load_sft

    sft, _ = load_sft(model_dir)
    merged = merge_adapter(model_dir, adapter, cache_dir, progress=False)
    baseline = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    return sft.eval(), baseline.eval()


# ---------------------------------------------------------------------------- the run's data
def _sampling_settings(ctx: _RunContext) -> Settings:
    """The served engine as a plain SFT engine: answers need no baseline, head or baseline stack in it."""
    from alignd.settings import NO_ADAPTER

    return ctx.settings.model_copy(
        update={
            "model": str(ctx.model_dir),
            "value_head": "none",
            "baseline_adapter": NO_ADAPTER,
            "implicit_in_engine": False,
        }
    )


def _dense(ctx: _RunContext, form: ImplicitBaseline, answers: list[dict]):
    """The teacher-forced states of ``answers`` and their features, from the partial folder where an
    earlier run of the same inputs left them (the answers decide them), else computed and saved there."""
    import torch

    from alignd.train.data import write_json_atomic
    from alignd.train.value_head import DENSE_STAMP, FEATURES_FILE, STATES_FILE, Features

    partial, targets = ctx.workspace.partial, ctx.run.targets
    wanted = sorted(a["slot"] for a in answers)
    stamp = partial / DENSE_STAMP
    known = Features.load(partial / FEATURES_FILE)
    if known is not None and stamp.is_file() and json.loads(stamp.read_text()).get("answers") == wanted:
        return read_work_file(partial / STATES_FILE), known, json.loads(stamp.read_text())["sampled_in_top_k"]
    sft, baseline = load_models(ctx.model_dir, form.adapter, Path(ctx.settings.cache_dir).expanduser())
    dense = dense_targets(
        sft,
        baseline,
        answers,
        top_k=targets.top_k,
        beta=form.beta,
        answer_len=targets.answer_len,
        progress=ctx.run.progress,
    )
    tokens = sorted({z for r in dense.records for z in r["candidates"]})
    with torch.inference_mode():
        table = sft.get_input_embeddings().weight.detach().float()[torch.tensor(tokens)].clone()
    del sft, baseline
    gc.collect()
    n = len(dense.records)
    features = Features([r["slot"] for r in dense.records], dense.hidden, tokens, table, [True] * n, [0.0] * n)
    (partial / STATES_FILE).unlink(missing_ok=True)
    append_work_records(partial / STATES_FILE, dense.records)
    features.save(partial / FEATURES_FILE)
    write_json_atomic(stamp, {"answers": wanted, "sampled_in_top_k": dense.sampled_in_top_k})
    return dense.records, features, dense.sampled_in_top_k


def make_implicit_data(ctx: _RunContext) -> _MadeData:
    """Sampled SFT answers (resumable), every state along them with its dense implicit targets and features."""
    from alignd.train.value_head import ANSWERS_FILE, _MadeData, state_slots

    run, targets = ctx.run, ctx.run.targets
    form = implicit_baseline(ctx.baseline.name, ctx.baseline.kind, ctx.baseline.source, ctx.baseline.adapter_manifest)
    slots = state_slots(ctx.prompts, targets.answers or len(ctx.prompts), ctx.inputs["seed"])
    began = time.perf_counter()
    answers = sample_answers(
        _sampling_settings(ctx),
        slots,
        ctx.workspace.partial / ANSWERS_FILE,
        answer_len=targets.answer_len,
        temperature=targets.sample_temperature,
        concurrency=targets.concurrency,
        progress=run.progress,
    )
    sampling_s = time.perf_counter() - began
    began = time.perf_counter()
    records, features, in_top_k = _dense(ctx, form, answers)
    if targets.states is not None:
        records = records[: targets.states]  # the first states in slot order (answer, then position)
    return _MadeData(
        records,
        features,
        manifest={
            "transfer": "direct",
            "targets": "implicit",
            "top_k": targets.top_k,
            "beta": form.beta,
            "baseline_trained_by": form.trained_by,
        },
        features_check={
            "sampled_token_in_top_k": round(in_top_k, 6),
            "meaning": "the fraction of the sampled answers' tokens that are among the SFT model's top-k at their "
            "state in the teacher-forced pass (a misaligned position would drop it to chance); "
            "candidates, log-probabilities and h(s) come from that one pass",
        },
        data={
            "answers": len(answers),
            "answers_finished": sum(1 for a in answers if a["finished"]),
            "states_per_answer": _mean_len(answers),
            "cut": "every position of each answer (dense)",
        },
        notes=[
            f"targets: beta * (log pi_BL - log pi_SFT) of baseline '{ctx.baseline.name}' ({form.trained_by}, beta "
            f"{form.beta:g}), its exact token-level Q up to V(s) (decoding.value='implicit'), for the SFT model's "
            f"top-{targets.top_k} at every state of its own sampled answers, from one teacher-forced pass of each "
            "model (transformers, float32)"
        ],
        wall_s={
            "answers_this_process": round(sampling_s, 3),
            "targets_and_features": round(time.perf_counter() - began, 3),
        },
    )


def _mean_len(answers: Sequence[dict]) -> float | None:
    return round(sum(len(a["answer"]) for a in answers) / len(answers), 3) if answers else None
