"""Transfer Q* speed: alignd (vLLM engine, batched) vs a faithful re-implementation of the reference
loop (Hugging Face, batch size 1), a concurrency sweep with *rollout efficiency*, and cheaper variants;
same settings, same script, same machine.

    .venv/bin/python bench/tq_speed.py                  # reference loop, sweep 1 2 4 8 16, variants
    .venv/bin/python bench/tq_speed.py --no-reference --variant-prompts 0   # the sweep only
    .venv/bin/python bench/tq_speed.py --smoke          # a tiny run (the test suite calls sweep() itself)

Settings (both sides): SFT = embedded SmolLM2, baseline = prompted SmolLM2 (alignment system prompt),
target reward = positivity (VADER), alpha = 1, top_k = 10, 1 greedy rollout of 20 tokens per
candidate, greedy decoding, 64 new tokens. alignd prunes candidates that cannot win (greedy, bounded
reward: the same answers, fewer rollouts) unless --no-prune is given.

Measured:
  * reference loop: output tokens/s for one request (it cannot serve two at once); --no-reference skips it;
  * alignd TQ*: aggregate output tokens/s at each concurrency c (c different prompts decoded at once);
  * rollout efficiency at each c (defined below);
  * alignd TQ* with block-wise decisions (block_size 4) and confidence gating (0.5): rollout tokens
    per output token and mean reward, against plain TQ* on the same prompts (--variant-prompts 0 skips).

Rollout efficiency, precisely. During the TQ* run at concurrency c the engine's ``rollouts`` primitive is
wrapped (on the engine instance, for the run only) so that each rollout sequence counts as *in flight*
from its submission until its own result is back (a call for k prefixes is split into k one-prefix calls,
submitted together: the engine sees the same requests). From that:

  * R = rollout tokens of the run: the sum of the responses' diagnostics ``cost.rollout_tokens``;
  * T = wall time of the run (all c requests, first submission to last answer);
  * rollout throughput = R / T (rollout tokens per second inside TQ*);
  * B = mean number of rollout sequences in flight while at least one is: the time integral of the
    in-flight count divided by the time during which it is >= 1 (the batch the engine really ran
    rollouts at; ``nominal B`` = c x the mean rollouts per decision that rolled out, for comparison);
  * capacity(B) = the engine's own batched greedy decode throughput at batch size B, measured in the same
    process right after the run: B prefixes shaped like rollout prefixes (the c prompts' prompted-baseline
    prefixes plus one of their top candidate tokens, prefix cache warm) each get one greedy continuation
    of ``rollout_len`` tokens, all in one ``engine.rollouts`` call (the primitive TQ* uses, so the same
    request path); generated tokens over the wall time (the tables show that these continuations ran to
    full length), the median of ``--capacity-repeats`` timed runs after one untimed one; for a fractional
    B, linear interpolation between the two neighbouring integer batch sizes;
  * rollout efficiency = (R / T) / capacity(B).

It splits into the *rollout duty* D (the fraction of T with at least one rollout in flight) times the
efficiency while rolling out ((R / (D T)) / capacity(B)): time without rollouts (top-k steps, reward
scoring, decisions that pruning settles without rollouts) lowers D; rollouts that end early at EOS, a
batch that drains unevenly and per-step overhead lower the second factor.

Prints markdown tables for docs/BENCHMARKS.md; --out writes all numbers as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # bench/ is a folder of scripts: its siblings are imported by name
# what TQ* ran and what the engine could have run (importable from here as before)
from rollout_efficiency import RolloutTracker, capacity_at, capacity_prefixes, decode_throughput  # noqa: E402, F401

PROMPTS = [
    "Tell me about your weekend.",
    "What do you think of Mondays?",
    "Describe the weather today.",
    "How was your commute?",
    "What is your opinion of homework?",
    "Tell me about traffic jams.",
    "What do you think about rainy days?",
    "Describe a long queue at the bank.",
    "How do you feel about doing the dishes?",
    "Tell me about waking up early.",
    "What is it like to wait for a delayed train?",
    "Describe your neighbour's loud music.",
    "What do you think of tax forms?",
    "Tell me about a cold shower.",
    "How was the meeting that ran late?",
    "Describe an empty fridge.",
]


@dataclass
class BenchConfig:
    max_tokens: int = 64
    top_k: int = 10
    rollout_len: int = 20
    alpha: float = 1.0
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    prune: bool = True
    reference_prompts: int = 1  # 0 = no reference loop
    variant_prompts: int = 8  # 0 = no cheaper-variants table
    capacity_repeats: int = 3

    def tq(self, **extra) -> dict:
        return dict(
            method="transfer_q",
            alpha=self.alpha,
            top_k=self.top_k,
            num_rollouts=1,
            rollout_len=self.rollout_len,
            diagnostics=True,
            prune=self.prune,
            **extra,
        )


SMOKE = dict(max_tokens=3, top_k=3, rollout_len=4, concurrency=[1, 2], variant_prompts=2, capacity_repeats=1)


# ---------------------------------------------------------------------------- the reference loop
class ReferenceTQ:
    """The authors' algorithm as their code runs it: one request at a time, a Hugging Face model, every
    step recomputes the whole prefix (no KV cache across steps); the k candidates' rollouts go to
    ``generate`` as one batch (they share the prefix length, so no padding), greedy, fixed length, no
    EOS stop; each rollout is scored on its own. (Batching the candidates is what makes the orientation
    figure of about 3 s per token on these machines; one generate call per candidate is ~5x slower.)"""

    def __init__(self, model_path: str, system_prompt: str, reward_fn, top_k: int, rollout_len: int, alpha: float):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.system_prompt = system_prompt
        self.reward_fn = reward_fn
        self.top_k, self.rollout_len, self.alpha = top_k, rollout_len, alpha

    def _ids(self, messages) -> list[int]:
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tok.encode(text, add_special_tokens=False)

    @torch.inference_mode()
    def generate(self, prompt: str, max_tokens: int) -> list[int]:
        sft_ids = self._ids([{"role": "user", "content": prompt}])
        bl_ids = self._ids([{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}])
        out: list[int] = []
        for _ in range(max_tokens):
            logits = self.model(torch.tensor([sft_ids + out])).logits[0, -1]
            top = logits.topk(self.top_k)
            batch = torch.tensor([bl_ids + out + [z] for z in top.indices.tolist()])
            rollouts = self.model.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=self.rollout_len,
                do_sample=False,
                min_new_tokens=self.rollout_len,
                pad_token_id=self.tok.eos_token_id,
            )[:, len(bl_ids) :].tolist()
            scores = []
            for logit, rollout in zip(top.values.tolist(), rollouts, strict=False):
                q = self.reward_fn(prompt, self.tok.decode(rollout, skip_special_tokens=True))
                scores.append(logit + q / self.alpha)  # logit + w * Q, w = 1 / alpha
            out.append(top.indices[max(range(len(scores)), key=scores.__getitem__)].item())
            if out[-1] == self.tok.eos_token_id:
                break
        return out


async def measure_reference(engine, settings, registry, cfg: BenchConfig) -> dict:
    """Output tokens/s of the reference loop over ``cfg.reference_prompts`` prompts, one at a time. Runs
    in a thread; its reward calls go through the same reward object as alignd's, on this loop."""
    from alignd.rewards.base import RewardItem

    loop = asyncio.get_running_loop()
    positivity = registry.get("positivity")

    def reward_fn(prompt, text):
        item = RewardItem(text, prompt=prompt)
        return asyncio.run_coroutine_threadsafe(positivity.score([item]), loop).result()[0].value

    ref = ReferenceTQ(
        engine.info.model_path, settings.baseline_system_prompt, reward_fn, cfg.top_k, cfg.rollout_len, cfg.alpha
    )
    tokens = seconds = 0.0
    for p in tqdm(PROMPTS[: cfg.reference_prompts], desc="reference loop (HF, batch 1)"):
        start = time.perf_counter()
        tokens += len(await asyncio.to_thread(ref.generate, p, cfg.max_tokens))
        seconds += time.perf_counter() - start
    return {"prompts": cfg.reference_prompts, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


# ---------------------------------------------------------------------------- alignd
async def run_alignd(aligned, engine, prompts, config, max_tokens) -> tuple[float, list[dict]]:
    """Decode ``prompts`` concurrently with a resolved decoding ``config``; (wall seconds, per-prompt
    results: output tokens and the alignment diagnostics)."""
    from alignd.decoding.prompt import Prompt
    from alignd.models.engine import GenerationParams

    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)

    async def one(p):
        chat = ({"role": "user", "content": p},)
        prompt = Prompt(tuple(engine.render_chat(list(chat))), messages=chat)
        alignment, tokens = None, 0
        async for delta in aligned.stream(aligned.plan(prompt, params, config), "bench"):
            tokens += len(delta.token_ids)
            alignment = delta.alignment.model_dump() if delta.alignment is not None else alignment
        return {"tokens": tokens, **(alignment or {})}

    start = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - start, results


async def sweep(
    engine, aligned, cfg: BenchConfig, reference_tps: float | None = None, capacity_cache: dict | None = None
) -> list[dict]:
    """TQ* at each concurrency in ``cfg.concurrency``: throughput, reward, rollout statistics and rollout
    efficiency (see the module docstring). ``engine`` may be any open engine (tests pass theirs)."""
    from alignd.decoding.config import DecodingConfig

    config = DecodingConfig(**cfg.tq())
    capacity_cache = {} if capacity_cache is None else capacity_cache
    if max(cfg.concurrency) > len(PROMPTS):
        raise ValueError(f"at most {len(PROMPTS)} concurrent prompts are defined")
    await run_alignd(aligned, engine, PROMPTS[:1], config, min(4, cfg.max_tokens))  # warm-up
    rows = []
    for c in tqdm(cfg.concurrency, desc="alignd TQ* concurrency sweep"):
        prompts = PROMPTS[:c]
        with RolloutTracker(engine) as tracker:
            seconds, results = await run_alignd(aligned, engine, prompts, config, cfg.max_tokens)
        tokens = sum(r["tokens"] for r in results)
        rollout_tokens = sum(r["cost"]["rollout_tokens"] for r in results)
        rollouts = sum(r["cost"]["rollouts"] for r in results)
        decisions = sum(r["cost"]["decisions"] for r in results)
        rollout_decisions = sum(1 for r in results for s in r["steps"] if s["cost"]["rollouts"])
        batch = tracker.mean_in_flight
        capacity = (
            await capacity_at(engine, aligned, prompts, batch, cfg.rollout_len, cfg.capacity_repeats, capacity_cache)
            if batch
            else float("nan")
        )
        duty = tracker.busy_seconds / seconds
        row = {
            "concurrency": c,
            "seconds": seconds,
            "output_tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "vs_reference": tokens / seconds / reference_tps if reference_tps else None,
            "mean_reward": statistics.mean(r["reward"] for r in results),
            "decisions": decisions,
            "rollout_decisions": rollout_decisions,
            "rollouts": rollouts,
            "rollout_tokens": rollout_tokens,
            "rollout_tokens_tracked": tracker.tokens,
            "rollout_tokens_per_s": rollout_tokens / seconds,
            "batch": batch,
            "nominal_batch": c * rollouts / rollout_decisions if rollout_decisions else 0.0,
            "capacity_tokens_per_s": capacity,
            "rollout_efficiency": rollout_tokens / seconds / capacity if batch else float("nan"),
            "rollout_duty": duty,
            "efficiency_while_rolling_out": (
                rollout_tokens / tracker.busy_seconds / capacity if tracker.busy_seconds else float("nan")
            ),
            # diagnostics: what the engine itself ran, and who used the CPU
            "engine_running_mean": tracker.engine_running_mean,
            "sampled_in_flight_mean": tracker.sampled_in_flight_mean,
            "front_end_cpu_cores": tracker.front_end_cpu_seconds / tracker.wall_seconds,
            "engine_cpu_cores": tracker.engine_cpu_seconds / tracker.wall_seconds,
        }
        rows.append(row)
        running = row["engine_running_mean"]
        print(
            f"alignd c={c}: {row['tokens_per_s']:.3f} tokens/s aggregate, {row['rollout_tokens_per_s']:.1f} rollout "
            f"tokens/s at B={batch:.1f} (engine {capacity:.1f} tokens/s): efficiency {row['rollout_efficiency']:.2f} "
            f"(duty {duty:.2f} x {row['efficiency_while_rolling_out']:.2f}); vLLM running "
            f"{'-' if running is None else f'{running:.1f}'}, CPU front end {row['front_end_cpu_cores']:.2f} / "
            f"engine {row['engine_cpu_cores']:.2f} cores",
            flush=True,
        )
    return rows


VARIANTS = {
    "TQ* every token": {},
    "TQ* block 4": {"block_size": 4},
    "TQ* gate 0.5": {"confidence_threshold": 0.5},
    "TQ* block 4 + gate 0.5": {"block_size": 4, "confidence_threshold": 0.5},
}


async def cheaper_variants(engine, aligned, cfg: BenchConfig) -> list[dict]:
    """Block-wise decisions and confidence gating against plain TQ*, ``cfg.variant_prompts`` prompts at once."""
    from alignd.decoding.config import DecodingConfig

    rows = []
    for name, extra in tqdm(VARIANTS.items() if cfg.variant_prompts else [], desc="cheaper variants"):
        config = DecodingConfig(**cfg.tq(**extra))
        seconds, results = await run_alignd(aligned, engine, PROMPTS[: cfg.variant_prompts], config, cfg.max_tokens)
        tokens = sum(r["tokens"] for r in results)
        rollout_tokens = sum(r["cost"]["rollout_tokens"] for r in results)
        rows.append(
            {
                "variant": name,
                "rollout_tokens_per_output_token": rollout_tokens / tokens,
                "mean_reward": statistics.mean(r["reward"] for r in results),
                "tokens_per_s": tokens / seconds,
            }
        )
    return rows


async def run_all(engine, settings, cfg: BenchConfig) -> dict:
    """Everything this script measures, over an open engine."""
    from alignd.decoding.generation import open_generation

    # the prompted baseline only (TQ* here transfers from it; no adapter engine to start)
    async with open_generation(engine, settings, configured_baselines=False) as aligned:
        reference = await measure_reference(engine, settings, aligned.rewards, cfg) if cfg.reference_prompts else None
        if reference:
            print(
                f"reference loop: {reference['tokens_per_s']:.3f} tokens/s "
                f"({1 / reference['tokens_per_s']:.2f} s/token)",
                flush=True,
            )
        capacity_cache: dict = {}
        rows = await sweep(engine, aligned, cfg, reference["tokens_per_s"] if reference else None, capacity_cache)
        variants = await cheaper_variants(engine, aligned, cfg)
    return {
        "config": asdict(cfg),
        "reference": reference,
        "sweep": rows,
        "capacity": capacity_cache,
        "variants": variants,
    }


def report(results: dict) -> str:
    cfg = BenchConfig(**results["config"])
    ref = results["reference"]
    lines = [
        f"{platform.machine()}, {os.cpu_count()} cores; k={cfg.top_k}, rollout_len={cfg.rollout_len}, 1 rollout, "
        f"greedy, alpha={cfg.alpha}, {cfg.max_tokens} new tokens; reference: "
        f"{cfg.reference_prompts or 'no'} prompt(s); pruning {'on' if cfg.prune else 'off'}",
        "",
    ]
    lines += ["| | output tokens/s | vs reference loop | mean positivity |", "|---|---|---|---|"]
    if ref:
        lines.append(f"| reference loop (HF, batch 1) | {ref['tokens_per_s']:.3f} | 1.00x | |")
    for r in results["sweep"]:
        vs = f"{r['vs_reference']:.2f}x" if r["vs_reference"] else "-"
        lines.append(
            f"| alignd TQ*, concurrency {r['concurrency']} | {r['tokens_per_s']:.3f} | {vs} | {r['mean_reward']:.3f} |"
        )
    lines += [
        "",
        "| concurrency | decisions (with rollouts) | rollouts per rollout decision | rollout tokens/s | "
        "B: mean rollouts in flight (nominal) | engine decode tokens/s at B | **rollout efficiency** | "
        "rollout duty | efficiency while rolling out |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["sweep"]:
        per = r["rollouts"] / r["rollout_decisions"] if r["rollout_decisions"] else 0.0
        lines.append(
            f"| {r['concurrency']} | {r['decisions']} ({r['rollout_decisions']}) | {per:.2f} | "
            f"{r['rollout_tokens_per_s']:.1f} | {r['batch']:.1f} ({r['nominal_batch']:.1f}) | "
            f"{r['capacity_tokens_per_s']:.1f} | **{r['rollout_efficiency']:.0%}** | "
            f"{r['rollout_duty']:.0%} | {r['efficiency_while_rolling_out']:.0%} |"
        )
    lines += [
        "",
        "| concurrency | rollouts in flight (sampled) | vLLM running requests (sampled) | front-end CPU (cores) | "
        "engine CPU (cores) |",
        "|---|---|---|---|---|",
    ]

    def opt(value) -> str:
        return "-" if value is None else f"{value:.1f}"

    for r in results["sweep"]:
        lines.append(
            f"| {r['concurrency']} | {opt(r['sampled_in_flight_mean'])} | {opt(r['engine_running_mean'])} | "
            f"{r['front_end_cpu_cores']:.2f} | {r['engine_cpu_cores']:.2f} |"
        )
    cap = results["capacity"]
    if cap:
        lines += [
            "",
            f"engine batched greedy decode (one rollouts call, {cfg.rollout_len} tokens each): "
            + ", ".join(
                f"B={b}: {cap[b]['tokens_per_s']:.1f} tok/s ({cap[b]['full_length']:.0%} of full length)"
                for b in sorted(cap)
            ),
        ]
    if results["variants"]:
        base = results["variants"][0]["rollout_tokens_per_output_token"]
        lines += [
            "",
            f"| variant ({cfg.variant_prompts} prompts, concurrent) | rollout tokens per output token | "
            "reduction | mean positivity | output tokens/s |",
            "|---|---|---|---|---|",
        ]
        for v in results["variants"]:
            rpt = v["rollout_tokens_per_output_token"]
            lines.append(
                f"| {v['variant']} | {rpt:.1f} | {base / max(rpt, 1e-9):.1f}x | {v['mean_reward']:.3f} | "
                f"{v['tokens_per_s']:.3f} |"
            )
    return "\n".join(lines)


async def main(args) -> dict:
    from alignd.models.factory import open_engine
    from alignd.settings import Settings

    cfg = BenchConfig(
        max_tokens=args.max_tokens,
        top_k=args.top_k,
        rollout_len=args.rollout_len,
        alpha=args.alpha,
        concurrency=args.concurrency,
        prune=args.prune,
        reference_prompts=args.reference_prompts if args.reference else 0,
        variant_prompts=args.variant_prompts,
        capacity_repeats=args.capacity_repeats,
    )
    if args.smoke:
        cfg = BenchConfig(**{**asdict(cfg), **SMOKE})
    settings = Settings()
    async with open_engine(settings) as engine:
        results = await run_all(engine, settings, cfg)
    print("\n" + report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--rollout-len", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the reference loop (HF, batch 1) for the speed-up column",
    )
    parser.add_argument("--reference-prompts", type=int, default=1)
    parser.add_argument("--variant-prompts", type=int, default=8, help="0 skips the cheaper-variants table")
    parser.add_argument("--capacity-repeats", type=int, default=3, help="timed runs per engine-capacity batch size")
    parser.add_argument(
        "--prune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip rollouts of candidates that cannot win (greedy, bounded reward: same answers)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write every number as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: checks the script, not the speed")
    asyncio.run(main(parser.parse_args()))
