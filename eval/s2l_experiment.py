"""S2L against random subsets and the full set, for IRFT (docs/EVALUATION.md, "S2L data selection").

    .venv/bin/python eval/s2l_experiment.py                      # the run in docs/EVALUATION.md
    .venv/bin/python eval/s2l_experiment.py --smoke --model DIR  # a tiny model: checks the harness

The demonstrations (``train/data/demonstrations.jsonl``) are split once into a training pool and a
held-out set (the last ``--heldout`` lines: the file interleaves its 15 categories, so the tail is
balanced). Each arm trains an IRFT adapter (``alignd train irft``'s own code, one round) on:

- ``full``: the whole pool;
- ``random/<seed>``: a uniform random subset of ``--budget`` of the pool (``alignd select random``);
- ``s2l/<seed>``: the S2L subset of the same size (``alignd select s2l``, the proxy being the same
  embedded model). With ``--s2l-proxy shared`` (the default) the proxy is trained once, by the first
  S2L seed's ``alignd select s2l``, and every other S2L seed re-clusters and re-samples its loss
  trajectories (K-means and the sampler seeded by <seed>): the proxy's training is most of S2L's cost
  here (about half an hour a run on one core), so the seeds vary what is cheap to vary. ``per-seed``
  trains one proxy per seed.

**The objective IRFT serves is a learned reward**, so each adapter is judged by it: on every held-out
prompt, does its implicit reward ``beta * log(pi_adapter(y|x) / pi_sft(y|x))`` rank the held-out
demonstration above the SFT model's own answer (one sample at T=1 per prompt, the same for every arm)?
Accuracy counts a tie as 1/2; the mean margin is also kept.

**Why IRFT and not DPO**: S2L selects by a target text. IRFT's examples are the demonstrations
themselves, while DPO's pairs exist only after sampling and scoring, so judging a DPO arm needs a fresh
sampling run per arm on top of training; and the learned reward's accuracy is measured by forward
passes alone, with no reward model that could be gamed.

Each arm's result is written to ``<out>/arms/<arm>.json`` when it is done, and a rerun skips finished
arms (their selections and adapters are resumed by the commands' own work folders).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from alignd.settings import Settings  # noqa: E402
from alignd.train.data import Demonstration, read_demonstrations, write_json_atomic  # noqa: E402
from alignd.train.irft import GenerationOptions, IRFTRun, generate_negatives, run_irft  # noqa: E402
from alignd.train.select import (  # noqa: E402
    SELECTION_FILE,
    SUBSET_FILE,
    TRAJECTORIES_FILE,
    Budget,
    Example,
    ProxyOptions,
    SelectionRun,
    cluster_trajectories,
    example_losses,
    run_selection,
    s2l_sample,
    tokenize_examples,
)
from alignd.train.tuning import TrainingOptions, resolve_base_model  # noqa: E402

logger = logging.getLogger("s2l_experiment")
DEFAULT_DATA = ROOT / "train" / "data" / "demonstrations.jsonl"
HELDOUT_SEED = 12_345  # the SFT answers of the held-out prompts: one sample each, the same for every arm


def write_jsonl(path: Path, demos: list[Demonstration]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": d.id, "prompt": d.prompt, "response": d.response}) + "\n" for d in demos),
        encoding="utf-8",
    )
    return path


def implicit_rewards(
    model_dir: Path,
    adapter_dir: Path,
    beta: float,
    prompts: list[str],
    answers: list[str],
    *,
    batch_size: int = 16,
    max_length: int = 512,
) -> np.ndarray:
    """``beta * (log pi_adapter(y|x) - log pi_sft(y|x))`` of each (prompt, answer), summed over the
    answer's tokens (the chat rendered as in training), from the same PEFT model with its adapter on
    and off."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    examples = [Example(str(i), p, a, i + 1) for i, (p, a) in enumerate(zip(prompts, answers, strict=False))]
    ids, starts, _ = tokenize_examples(tokenizer, examples, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = np.array([len(row) - start for row, start in zip(ids, starts, strict=False)], dtype=np.float64)
    nll_policy = example_losses(model, ids, starts, pad, batch_size)
    with model.disable_adapter():
        nll_sft = example_losses(model, ids, starts, pad, batch_size)
    return beta * (nll_sft - nll_policy) * tokens


def resample_s2l(source: Path, pool_file: Path, folder: Path, size: int, seed: int) -> Path:
    """An S2L subset from the loss trajectories of an earlier ``alignd select s2l`` run (``source``, its
    published folder), with K-means and the sampler seeded by ``seed``: the same K, the same budget.
    Writes ``subset.jsonl`` (the pool's lines, in order) and ``selection.json`` (last: it marks the
    folder complete); returns ``folder``."""
    rows = [json.loads(line) for line in (source / TRAJECTORIES_FILE).read_text().splitlines() if line.strip()]
    clusters = json.loads((source / SELECTION_FILE).read_text())["clusters"]["k"]
    labels = cluster_trajectories(np.array([r["losses"] for r in rows], dtype=np.float64), clusters, seed)
    chosen, spread = s2l_sample(labels, size, seed)
    ids = {rows[i]["id"] for i in chosen}
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        line
        for line in pool_file.read_text(encoding="utf-8").splitlines(keepends=True)
        if line.strip() and json.loads(line)["id"] in ids
    ]
    (folder / SUBSET_FILE).write_text("".join(lines), encoding="utf-8")
    selection = {
        "method": "s2l",
        "seed": seed,
        "trajectories_from": str(source),
        "clusters": {"k": clusters, "spread": spread},
        "selected": len(lines),
        "ids": sorted(ids),
    }
    write_json_atomic(folder / SELECTION_FILE, selection)
    return folder


def ranking_accuracy(demo_rewards: np.ndarray, sft_rewards: np.ndarray) -> float:
    wins = (demo_rewards > sft_rewards).sum() + 0.5 * (demo_rewards == sft_rewards).sum()
    return float(wins / len(demo_rewards))


def judge(model_dir: Path, adapter: Path, beta: float, heldout: list[Demonstration], sft_by_id: dict[str, str]) -> dict:
    """The learned reward of ``adapter`` on the held-out prompts: the accuracy of ranking each held-out
    demonstration above the SFT answer, the mean margin, and the held-out loss of the objective IRFT
    trains, ``-log sigmoid(r(demo) - r(sft))`` (continuous where the accuracy saturates); the per-prompt
    margins are kept for paired comparisons between arms."""
    prompts = [d.prompt for d in heldout]
    r_demo = implicit_rewards(model_dir, adapter, beta, prompts, [d.response for d in heldout])
    r_sft = implicit_rewards(model_dir, adapter, beta, prompts, [sft_by_id[d.id] for d in heldout])
    margins = r_demo - r_sft
    return {
        "accuracy": ranking_accuracy(r_demo, r_sft),
        "mean_margin": float(np.mean(margins)),
        "heldout_loss": float(np.mean(np.logaddexp(0.0, -margins))),
        "margins": [round(float(m), 6) for m in margins],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="embedded", help="the SFT model and S2L proxy ('embedded' or a folder)")
    parser.add_argument("--heldout", type=int, default=70, help="held-out demonstrations (the file's last lines)")
    parser.add_argument("--budget", default="0.3", help="the subset's size: a count or a fraction of the pool")
    parser.add_argument("--random-seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--s2l-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument(
        "--s2l-proxy",
        choices=["shared", "per-seed"],
        default="shared",
        help="one proxy run for every S2L seed (re-clustered and re-sampled per seed), or one per seed",
    )
    parser.add_argument("--no-full", action="store_true", help="skip the full-pool arm")
    parser.add_argument("--epochs", type=float, default=3.0, help="IRFT epochs over each arm's subset")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "s2l")
    parser.add_argument("--smoke", action="store_true", help="a few examples and steps: checks the harness")
    return parser


@dataclasses.dataclass
class Experiment:
    """What every arm shares: the pool and the held-out split, the training settings, the SFT answers."""

    out: Path
    settings: Settings
    model_dir: Path
    pool: list[Demonstration]
    heldout: list[Demonstration]
    pool_file: Path
    budget: Budget
    size: int  # the budget in examples
    generation: GenerationOptions
    proxy: ProxyOptions
    training_kw: dict
    beta: float
    s2l_seeds: list[int]
    s2l_proxy: str
    sft_by_id: dict[str, str] = dataclasses.field(default_factory=dict)  # held-out id -> SFT answer

    def selected(self, method: str, seed: int) -> Path:
        """The folder of ``alignd select <method>`` on the pool with this seed (selected now if missing)."""
        folder = self.out / "selections" / f"{method}-{seed}"
        if not (folder / SELECTION_FILE).is_file():
            run_selection(
                SelectionRun(
                    settings=self.settings.model_copy(update={"seed": seed}),
                    data_file=self.pool_file,
                    out=folder,
                    budget=Budget(count=self.size),
                    method=method,
                    proxy=dataclasses.replace(self.proxy, seed=seed),
                )
            )
        return folder

    def subset(self, method: str, seed: int | None, name: str) -> Path:
        """The demonstrations file an arm trains on: the pool, or its selection (made now if missing; a
        shared-proxy S2L seed after the first re-samples the first one's trajectories)."""
        if method == "full":
            return self.pool_file
        if method == "s2l" and self.s2l_proxy == "shared" and seed != self.s2l_seeds[0]:
            folder = self.out / "selections" / name
            if not (folder / SELECTION_FILE).is_file():
                resample_s2l(self.selected("s2l", self.s2l_seeds[0]), self.pool_file, folder, self.size, seed)
        else:
            folder = self.selected(method, seed)
        return folder / "subset.jsonl"

    def judge(self, adapter: Path) -> dict:
        return judge(self.model_dir, adapter, self.beta, self.heldout, self.sft_by_id)


def prepare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Experiment:
    """The pool and held-out files in ``--out``, the options of every arm, and the held-out SFT answers.
    ``--smoke`` trims the data and the seeds in ``args``."""
    out = args.out.expanduser().absolute()
    (out / "arms").mkdir(parents=True, exist_ok=True)
    settings = Settings(model=args.model, engine="hf", log_level="warning")
    model_dir, _ = resolve_base_model(settings)
    demos = read_demonstrations(args.data)
    if args.smoke:
        demos = demos[:16]
        args.heldout, args.random_seeds, args.s2l_seeds = 6, args.random_seeds[:2], args.s2l_seeds[:2]
    if not 0 < args.heldout < len(demos):
        parser.error(f"--heldout {args.heldout} must leave a pool: 1 to {len(demos) - 1}")
    pool, heldout = demos[: -args.heldout], demos[-args.heldout :]
    pool_file = write_jsonl(out / "pool.jsonl", pool)
    write_jsonl(out / "heldout.jsonl", heldout)
    budget = Budget.parse(args.budget)
    experiment = Experiment(
        out=out,
        settings=settings,
        model_dir=model_dir,
        pool=pool,
        heldout=heldout,
        pool_file=pool_file,
        budget=budget,
        size=budget.resolve(len(pool)),
        generation=GenerationOptions(max_new_tokens=8 if args.smoke else args.max_new_tokens),
        proxy=ProxyOptions(checkpoints=3, epochs=1, batch_size=2) if args.smoke else ProxyOptions(),
        training_kw={"max_steps": 2, "batch_size": 2} if args.smoke else {"epochs": args.epochs},
        beta=args.beta,
        s2l_seeds=args.s2l_seeds,
        s2l_proxy=args.s2l_proxy,
    )
    logger.info("pool %d, held out %d, budget %s = %d examples", len(pool), len(heldout), budget, experiment.size)
    sft_answers = generate_negatives(
        model_dir,
        None,
        heldout,
        out / "heldout_sft.jsonl",
        experiment.generation,
        HELDOUT_SEED,
        desc="held-out SFT answers",
    )
    experiment.sft_by_id = {r["id"]: r["text"] for r in sft_answers}
    return experiment


def resume_arm(experiment: Experiment, name: str, result_file: Path) -> None:
    """A finished arm: nothing to do, unless it was judged before the held-out loss was kept (then its
    adapter is judged again)."""
    result = json.loads(result_file.read_text())
    if "margins" not in result:
        result.update(experiment.judge(experiment.out / "adapters" / name))
        result_file.write_text(json.dumps(result, indent=2) + "\n")
        logger.info("%s: judged again (held-out loss %.4f)", name, result["heldout_loss"])
    else:
        logger.info("%s: done before", name)


def run_arm(experiment: Experiment, method: str, seed: int | None) -> None:
    """One arm: its subset selected, its IRFT adapter trained and judged, the result written to
    ``<out>/arms/<arm>.json`` (a finished arm is resumed)."""
    name = method if seed is None else f"{method}-{seed}"
    result_file = experiment.out / "arms" / f"{name}.json"
    if result_file.is_file():
        resume_arm(experiment, name, result_file)
        return
    started = time.perf_counter()
    arm_settings = experiment.settings.model_copy(update={"seed": seed or 0})
    t0 = time.perf_counter()
    subset = experiment.subset(method, seed, name)
    selection_s = 0.0 if method == "full" else time.perf_counter() - t0
    adapter = experiment.out / "adapters" / name
    t0 = time.perf_counter()
    if not (adapter / "alignd_adapter.json").is_file():
        run_irft(
            IRFTRun(
                settings=arm_settings,
                demonstrations_file=subset,
                out=adapter,
                rounds=1,
                generation=experiment.generation,
                training=TrainingOptions(beta=experiment.beta, seed=seed or 0, **experiment.training_kw),
            )
        )
    train_s = time.perf_counter() - t0
    result = {
        "arm": name,
        "method": method,
        "seed": seed,
        "examples": len(read_demonstrations(subset)),
        "heldout": len(experiment.heldout),
        **experiment.judge(adapter),
        "selection_s": round(selection_s, 1),
        "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    logger.info(
        "%s: accuracy %.3f, margin %.3f (%d examples, %.0f s)",
        name,
        result["accuracy"],
        result["mean_margin"],
        result["examples"],
        result["wall_s"],
    )


def summarize_arms(experiment: Experiment) -> dict:
    """Every finished arm's result, per method the spread of its metrics over seeds, and S2L against random;
    written to ``<out>/summary.json``."""
    results = [json.loads(p.read_text()) for p in sorted((experiment.out / "arms").glob("*.json"))]
    summary = {
        "pool": len(experiment.pool),
        "heldout": len(experiment.heldout),
        "budget": str(experiment.budget),
        "budget_examples": experiment.size,
        "arms": results,
        "by_method": {},
    }
    for method in ("full", "random", "s2l"):
        runs = [r for r in results if r["method"] == method]
        if runs:
            summary["by_method"][method] = {
                "runs": len(runs),
                **{
                    f"{key}_{stat}": value
                    for key in ("accuracy", "mean_margin", "heldout_loss")
                    for stat, value in spread([r[key] for r in runs if key in r]).items()
                },
            }
    summary["s2l_vs_random"] = compare(results)
    (experiment.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(summary: dict) -> None:
    """The arms' table, each method's spread over seeds and S2L against random, on stdout."""
    print("| arm | examples | held-out accuracy | mean margin | held-out loss | selection s | training s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in summary["arms"]:
        print(
            f"| {r['arm']} | {r['examples']} | {r['accuracy']:.3f} | {r['mean_margin']:.4f} | "
            f"{r.get('heldout_loss', float('nan')):.4f} | {r['selection_s']:.0f} | {r['train_s']:.0f} |"
        )
    for method, s in summary["by_method"].items():
        print(
            f"{method}: {s['runs']} runs, accuracy {s['accuracy_mean']} (sd {s['accuracy_sd']}), held-out loss "
            f"{s['heldout_loss_mean']} (sd {s['heldout_loss_sd']}), margin {s['mean_margin_mean']} "
            f"(sd {s['mean_margin_sd']})"
        )
    if summary["s2l_vs_random"]:
        print(f"S2L vs random: {json.dumps(summary['s2l_vs_random'])}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("alignd").setLevel(logging.WARNING)
    experiment = prepare(args, parser)
    arms = (
        ([] if args.no_full else [("full", None)])
        + [("random", s) for s in args.random_seeds]
        + [("s2l", s) for s in args.s2l_seeds]
    )
    for method, seed in arms:
        run_arm(experiment, method, seed)
    print_summary(summarize_arms(experiment))
    return 0


def spread(values: list[float]) -> dict:
    """Mean, standard deviation across runs (seeds), min and max of one metric."""
    if not values:
        return {"mean": None, "sd": None, "min": None, "max": None}
    return {
        "mean": round(statistics.fmean(values), 5),
        "sd": round(statistics.stdev(values), 5) if len(values) > 1 else None,
        "min": round(min(values), 5),
        "max": round(max(values), 5),
    }


def compare(results: list[dict]) -> dict:
    """S2L against random at the same budget: the difference of the arms' mean held-out loss and margin,
    against the seed-to-seed spread (sd of a random arm; the standard error of the difference of the
    two means from both arms' sds); and, per held-out prompt, in how many of them S2L's mean margin over
    its seeds beats random's."""
    s2l = [r for r in results if r["method"] == "s2l" and "margins" in r]
    rand = [r for r in results if r["method"] == "random" and "margins" in r]
    if len(s2l) < 2 or len(rand) < 2:
        return {}
    out = {}
    for key in ("heldout_loss", "mean_margin"):
        a, b = [r[key] for r in s2l], [r[key] for r in rand]
        se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
        out[key] = {
            "s2l_minus_random": round(statistics.fmean(a) - statistics.fmean(b), 5),
            "standard_error": round(se, 5),
            "random_seed_sd": round(statistics.stdev(b), 5),
        }
    per_prompt_s2l = np.mean([r["margins"] for r in s2l], axis=0)
    per_prompt_random = np.mean([r["margins"] for r in rand], axis=0)
    out["prompts_where_s2l_margin_is_larger"] = int((per_prompt_s2l > per_prompt_random).sum())
    out["prompts"] = int(len(per_prompt_s2l))
    return out


if __name__ == "__main__":
    sys.exit(main())
