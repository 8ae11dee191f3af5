"""``alignd select s2l``: S2L (SmallToLarge) data selection for alignd's trainers (ALGORITHMS.md 5).

Train a small proxy model on the whole set, record every example's loss at C checkpoints of that
training (its *loss trajectory*), cluster the trajectories with K-means, and spend the budget evenly
across the clusters, smallest cluster first: examples that the proxy learns in the same way are
redundant with one another, so each way of being learned gets its share, and rare ones are kept whole.

- **The set**: demonstrations ``{"id", "prompt", "response"}`` (what ``alignd train irft`` reads) or
  preference pairs ``{"id", "prompt", "chosen", "rejected"}`` (selected by their chosen answer). The
  target of an example is the text its loss is measured on.
- **The proxy**: a LoRA adapter of the proxy model trained with TRL's ``SFTTrainer`` (loss on the
  answer only, the chat rendered by the proxy's own template). The paper fine-tunes all of a small
  model's weights; an adapter keeps each of the C checkpoints at a few MB instead of the whole model and
  its optimizer state, and still records how fast each example is learned, which is what the
  trajectories are for.
- **The losses**: each example's mean token loss of its target given its prompt, computed at every
  checkpoint in batched forward passes (examples sorted by length, so a batch pads little).
- **The clusters**: scikit-learn's ``KMeans`` (k-means++, several restarts, seeded). The trajectories
  are C numbers per example and the sets alignd trains on are thousands of examples, where scikit-learn
  takes seconds; faiss would pay off only on millions of rows, and is one more native dependency.

Work is kept in ``<out>.partial/`` (TRL's checkpoints, one losses file per checkpoint) and resumed by
the same command; the finished selection is moved to ``<out>/`` in one rename:

    selection.json     ids, per-cluster counts, options, provenance (what ``--select`` records)
    subset.jsonl       the selected lines of the input file, in its order
    trajectories.jsonl every example's trajectory and cluster
    clusters.png       each cluster's mean trajectory (the report's picture)
    report.md          cluster sizes and how the budget was spread
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from alignd.settings import Settings
from alignd.train.data import (
    TrainingError,
    TrainingInputError,
    _read_records,
    file_sha256,
    require,
    write_json_atomic,
)
from alignd.train.manifest import created_now, jsonable, peak_rss_mib, versions
from alignd.train.workspace import Workspace

logger = logging.getLogger(__name__)

SELECTION_FILE = "selection.json"
SUBSET_FILE = "subset.jsonl"
TRAJECTORIES_FILE = "trajectories.jsonl"
PLOT_FILE = "clusters.png"
REPORT_FILE = "report.md"
PAPER_CLUSTERS = 100  # K of the S2L paper (on MathInstruct's 262k examples)


# ---------------------------------------------------------------------------- the set
@dataclass(frozen=True)
class Example:
    """One example of the set: ``target`` is the text its loss is measured on."""

    id: str
    prompt: str
    target: str
    line: int


@dataclass(frozen=True)
class SelectionSet:
    path: Path
    kind: str  # "demonstrations" or "pairs"
    examples: list[Example]

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.examples]


def read_selection_set(path: str | Path) -> SelectionSet:
    """Demonstrations or preference pairs, told apart by the first record's fields; every line must
    then have the same kind's fields (ids unique: a duplicate is an error naming both lines)."""
    path = Path(path).expanduser().absolute()
    first = _read_records(path, ("id", "prompt"), "training set")[0][1]
    if "response" in first:
        kind, fields, target = "demonstrations", ("id", "prompt", "response"), "response"
    elif "chosen" in first:
        kind, fields, target = "pairs", ("id", "prompt", "chosen", "rejected"), "chosen"
    else:
        raise TrainingInputError(
            f'{path}: lines must be demonstrations {{"id", "prompt", "response"}} or preference pairs '
            f'{{"id", "prompt", "chosen", "rejected"}}; the first line has {sorted(first)}'
        )
    records = _read_records(path, fields, kind)
    return SelectionSet(path, kind, [Example(r["id"], r["prompt"], r[target], n) for n, r in records])


# ---------------------------------------------------------------------------- budget
@dataclass(frozen=True)
class Budget:
    """How many examples to select: a count (``300``) or a fraction of the set (``0.3``, ``30%``)."""

    count: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str) -> Budget:
        raw = str(text).strip()
        try:
            if raw.endswith("%"):
                return cls(fraction=float(raw[:-1]) / 100)
            if re.fullmatch(r"[+-]?\d+", raw):
                return cls(count=int(raw))
            return cls(fraction=float(raw))
        except ValueError:
            raise TrainingInputError(
                f"budget {text!r} is not a number: give a count (300), a fraction (0.3) or a percentage (30%)"
            ) from None

    def resolve(self, size: int) -> int:
        """The number of examples for a set of ``size``; an error when it is zero or above the set."""
        if self.count is not None:
            n = self.count
            require(
                [
                    (n > 0, f"budget {n} selects nothing: give a count of at least 1"),
                    (
                        n <= size,
                        f"budget {n} is larger than the set ({size} examples): give at most {size}, "
                        "or a fraction such as 0.3",
                    ),
                ]
            )
            return n
        f = self.fraction
        require(
            [
                (
                    f is not None and math.isfinite(f) and 0 < f <= 1,
                    f"budget fraction {f} is out of range: give a fraction in (0, 1], e.g. 0.3, or a count",
                )
            ]
        )
        n = round(f * size)
        require([(n > 0, f"budget {f} of {size} examples rounds to 0: give a larger fraction or a count")])
        return n

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.fraction:g}"


def parse_select_option(text: str) -> tuple[str, Budget]:
    """``--select s2l:<budget>`` or ``random:<budget>`` of ``alignd train``."""
    method, sep, budget = str(text).partition(":")
    method = method.strip().lower()
    if not sep or method not in ("s2l", "random") or not budget.strip():
        raise TrainingInputError(
            f"--select {text!r}: expected s2l:<budget> or random:<budget>, e.g. s2l:0.3 or random:300"
        )
    return method, Budget.parse(budget)


# ---------------------------------------------------------------------------- clustering and sampling
def default_clusters(size: int) -> int:
    """K when none is given: the paper's 100 where the set is large, else about ten examples per
    cluster (100 clusters of 2 on a set of 200 would spread the budget as uniform sampling does)."""
    return max(1, min(PAPER_CLUSTERS, size // 10))


def cluster_trajectories(trajectories: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """K-means labels (0..K-1) of the rows of ``trajectories`` (examples x checkpoints)."""
    from sklearn.cluster import KMeans

    n = len(trajectories)
    require([(1 <= clusters <= n, f"--clusters {clusters} is out of range: 1 to the number of examples ({n})")])
    x = np.asarray(trajectories, dtype=np.float64)
    distinct = len(np.unique(x, axis=0))
    if distinct < clusters:
        raise TrainingError(
            f"only {distinct} distinct loss trajectories for {clusters} clusters: use --clusters {distinct} or fewer"
        )
    model = KMeans(n_clusters=clusters, n_init=10, random_state=seed)
    return model.fit_predict(x).astype(np.int64)


def s2l_sample(labels: np.ndarray, budget: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """The S2L sampler: clusters from smallest to largest, each taking an equal share of what is left
    of the budget (all of it when it is smaller than its share), uniformly at random within it.
    Returns the chosen indices (sorted) and one record per cluster: label, size, selected. Ties in size
    go by label, so the result depends on ``labels``, ``budget`` and ``seed`` only."""
    labels = np.asarray(labels)
    require([(0 < budget <= len(labels), f"budget {budget} must be 1 to {len(labels)}")])
    rng = np.random.default_rng(seed)
    names, sizes = np.unique(labels, return_counts=True)
    order = sorted(range(len(names)), key=lambda i: (sizes[i], names[i]))
    left, chosen, spread = budget, [], []
    for rank, i in enumerate(order):
        members = np.flatnonzero(labels == names[i])
        take = min(len(members), left // (len(order) - rank))
        picked = rng.choice(members, size=take, replace=False) if take else np.empty(0, dtype=np.int64)
        chosen.extend(int(p) for p in picked)
        left -= take
        spread.append({"cluster": int(names[i]), "size": int(sizes[i]), "selected": int(take)})
    return np.array(sorted(chosen), dtype=np.int64), spread


def random_sample(size: int, budget: int, seed: int) -> np.ndarray:
    """A uniform random subset of ``budget`` of ``size`` indices (sorted): the baseline S2L is measured
    against."""
    require([(0 < budget <= size, f"budget {budget} must be 1 to {size}")])
    return np.sort(np.random.default_rng(seed).choice(size, size=budget, replace=False)).astype(np.int64)


# ---------------------------------------------------------------------------- the proxy's losses
@dataclass(frozen=True)
class ProxyOptions:
    """How the proxy is trained and its losses taken (TRL ``SFTConfig`` / PEFT ``LoraConfig``)."""

    checkpoints: int = 5
    epochs: float = 3.0
    learning_rate: float = 2e-4
    batch_size: int = 8
    lora_rank: int = 16
    max_length: int = 512
    loss_batch_size: int = 16
    seed: int = 0

    def check(self) -> None:
        require(
            [
                (
                    self.checkpoints >= 2,
                    f"--checkpoints must be >= 2 (a trajectory needs two points), got {self.checkpoints}",
                ),
                (self.epochs > 0, f"--proxy-epochs must be > 0, got {self.epochs}"),
                (self.learning_rate > 0, f"--proxy-learning-rate must be > 0, got {self.learning_rate}"),
                (self.batch_size >= 1, f"--proxy-batch-size must be >= 1, got {self.batch_size}"),
                (self.lora_rank >= 1, f"--proxy-lora-rank must be >= 1, got {self.lora_rank}"),
                (self.max_length >= 16, f"--max-length must be >= 16, got {self.max_length}"),
                (self.loss_batch_size >= 1, f"--loss-batch-size must be >= 1, got {self.loss_batch_size}"),
            ]
        )

    def total_steps(self, size: int) -> int:
        return max(1, math.ceil(math.ceil(size / self.batch_size) * self.epochs))

    def checkpoint_steps(self, size: int) -> list[int]:
        """C optimizer steps, evenly spaced over the proxy's training, the last at its end."""
        total = self.total_steps(size)
        if total < self.checkpoints:
            raise TrainingInputError(
                f"the proxy trains for only {total} steps ({size} examples, batch {self.batch_size}, {self.epochs:g} "
                f"epochs), fewer than --checkpoints {self.checkpoints}: lower --checkpoints or --proxy-batch-size, "
                "or raise --proxy-epochs"
            )
        return sorted({round(total * (i + 1) / self.checkpoints) for i in range(self.checkpoints)})


def tokenize_examples(tokenizer, examples: list[Example], max_length: int) -> tuple[list[list[int]], list[int], int]:
    """(prompt + target token ids, where the target starts, how many were cut to ``max_length``) of each
    example, the chat rendered as TRL renders a prompt-completion example for training. A target that
    the tokenizer cannot encode (unknown tokens, or text that does not come back when decoded) is an
    error naming the example."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise TrainingInputError("the proxy's tokenizer has no chat template: give a chat model as --proxy")
    unk = tokenizer.unk_token_id
    ids, starts, truncated = [], [], 0
    for e in examples:
        user = [{"role": "user", "content": e.prompt}]
        prompt_text = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": e.target}], tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        start = len(prompt_ids)
        if full_ids[:start] != prompt_ids:  # a template whose prompt is not a prefix: the common prefix
            start = next(
                (i for i, (a, b) in enumerate(zip(full_ids, prompt_ids, strict=False)) if a != b),
                min(len(full_ids), start),
            )
        target_ids = tokenizer(e.target, add_special_tokens=False)["input_ids"]
        if unk is not None and (unk in target_ids or unk in prompt_ids):
            raise TrainingInputError(
                f"line {e.line} (id '{e.id}'): the proxy's tokenizer cannot encode this example (unknown tokens): "
                "use a proxy whose tokenizer covers the set's text"
            )
        if " ".join(tokenizer.decode(target_ids, skip_special_tokens=True).split()) != " ".join(e.target.split()):
            raise TrainingInputError(
                f"line {e.line} (id '{e.id}'): the proxy's tokenizer does not encode this example's answer faithfully "
                "(decoding it gives other text): use a proxy whose tokenizer covers the set's text"
            )
        if start >= max_length:
            raise TrainingInputError(
                f"line {e.line} (id '{e.id}'): the prompt alone is {start} tokens, at least --max-length {max_length}: "
                "raise --max-length or shorten the prompt"
            )
        if len(full_ids) > max_length:
            truncated += 1
            full_ids = full_ids[:max_length]
        ids.append(full_ids)
        starts.append(start)
    return ids, starts, truncated


def example_losses(
    model, token_ids: list[list[int]], starts: list[int], pad_id: int, batch_size: int, *, progress=None
) -> np.ndarray:
    """Each example's mean token loss (nats) of its target (tokens from ``starts[i]`` on) given what comes
    before, in batched forward passes over examples sorted by length (right-padded)."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    out = np.empty(len(token_ids), dtype=np.float64)
    model.eval()
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            width = max(len(token_ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            target = torch.zeros((len(rows), width), dtype=torch.bool)
            for r, i in enumerate(rows):
                n = len(token_ids[i])
                input_ids[r, :n] = torch.tensor(token_ids[i])
                mask[r, :n] = 1
                target[r, starts[i] : n] = True
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
            # token t is predicted at position t - 1
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = logprobs.gather(-1, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            weight = target[:, 1:].to(device)
            nll = -(picked * weight).sum(-1) / weight.sum(-1).clamp(min=1)
            out[rows] = nll.cpu().numpy()
            if progress is not None:
                progress.update(len(rows))
    return out


def _sft_trainer(model_dir: Path, examples: list[Example], opts: ProxyOptions, output_dir: Path, schedule: list[int]):
    """TRL's ``SFTTrainer`` for a LoRA adapter of the proxy on the set (prompt-completion, loss on the
    completion only), saving a checkpoint at each step of ``schedule``."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from alignd.train.tuning import DEFAULT_TARGET_MODULES

    steps = set(schedule)

    class SaveAtSchedule(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in steps:
                control.should_save = True
            return control

    cuda = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=str(output_dir),
        max_steps=schedule[-1],
        learning_rate=opts.learning_rate,
        per_device_train_batch_size=opts.batch_size,
        seed=opts.seed,
        data_seed=opts.seed,
        max_length=opts.max_length,
        completion_only_loss=True,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        logging_steps=max(1, schedule[-1] // 20),
        save_strategy="steps",
        save_steps=schedule[-1] + 1,  # never by itself: the callback saves at the schedule's steps
        save_total_limit=None,  # every checkpoint is a point of the trajectories
        report_to="none",
        dataloader_pin_memory=cuda,
        lr_scheduler_type="constant",  # the trajectories show the data, not a decaying learning rate
    )
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": e.prompt}],
                "completion": [{"role": "assistant", "content": e.target}],
            }
            for e in examples
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lora = LoraConfig(
        r=opts.lora_rank,
        lora_alpha=2 * opts.lora_rank,
        lora_dropout=0.0,
        target_modules=list(DEFAULT_TARGET_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[SaveAtSchedule()],
    )


def proxy_trajectories(
    model_dir: Path, examples: list[Example], opts: ProxyOptions, work: Path, *, progress: bool = True
) -> tuple[np.ndarray, list[int], dict]:
    """Train the proxy (resuming TRL's last checkpoint) and take every example's loss at each checkpoint
    (each checkpoint's losses written to ``work/losses/step-<n>.json`` and reused). Returns the
    trajectories (examples x checkpoints), the checkpoint steps and the proxy's metrics."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    schedule = opts.checkpoint_steps(len(examples))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    token_ids, starts, truncated = tokenize_examples(tokenizer, examples, opts.max_length)
    losses_dir = work / "losses"
    losses_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = work / "proxy"
    metrics: dict = {"checkpoint_steps": schedule, "truncated_examples": truncated}
    done_file = work / "proxy.json"
    if not done_file.is_file():
        from alignd.train.tuning import _last_checkpoint

        trainer = _sft_trainer(model_dir, examples, opts, checkpoints, schedule)
        resume = _last_checkpoint(checkpoints)
        if resume:
            logger.info("resuming the proxy's training from %s", resume)
        started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=resume)
        logged = [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]
        write_json_atomic(
            done_file,
            {
                "train_wall_s": round(time.perf_counter() - started, 3),
                "train_loss_mean": output.training_loss,
                "log": logged,
                "resumed_from": resume,
            },
        )
        del trainer
        gc.collect()
    metrics.update(json.loads(done_file.read_text()))

    missing = [s for s in schedule if not (losses_dir / f"step-{s}.json").is_file()]
    started = time.perf_counter()
    if missing:
        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        model = None
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with tqdm(
            total=len(missing) * len(examples), desc="losses at the checkpoints", unit="example", disable=not progress
        ) as bar:
            for step in missing:
                ckpt = checkpoints / f"checkpoint-{step}"
                if not (ckpt / "adapter_model.safetensors").is_file():
                    raise TrainingError(f"the proxy's checkpoint {ckpt} is missing: run with --restart")
                if model is None:
                    model = PeftModel.from_pretrained(base, str(ckpt))
                else:
                    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
                values = example_losses(model, token_ids, starts, pad_id, opts.loss_batch_size, progress=bar)
                write_json_atomic(
                    losses_dir / f"step-{step}.json",
                    {"step": step, "ids": [e.id for e in examples], "losses": values.tolist()},
                )
        del model, base
        gc.collect()
    metrics["loss_wall_s_this_process"] = round(time.perf_counter() - started, 3)
    columns = []
    for step in schedule:
        record = json.loads((losses_dir / f"step-{step}.json").read_text())
        if record["ids"] != [e.id for e in examples]:
            raise TrainingError(f"{losses_dir}/step-{step}.json holds other examples: run with --restart")
        columns.append(record["losses"])
    return np.array(columns, dtype=np.float64).T, schedule, metrics


# ---------------------------------------------------------------------------- the command
@dataclass
class SelectionRun:
    settings: Settings
    data_file: Path
    out: Path
    budget: Budget
    method: str = "s2l"  # or "random"
    clusters: int | None = None  # None: default_clusters(size)
    proxy: ProxyOptions = field(default_factory=ProxyOptions)
    overwrite: bool = False
    restart: bool = False
    command: list[str] = field(default_factory=list)
    progress: bool = True


def _plot(path: Path, trajectories: np.ndarray, labels: np.ndarray, steps: list[int], spread: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    cmap = plt.get_cmap("viridis")
    shown = sorted(spread, key=lambda c: -c["size"])[:20]  # a legend of more than 20 lines says nothing
    for n, c in enumerate(shown):
        rows = trajectories[labels == c["cluster"]]
        ax.plot(
            steps,
            rows.mean(axis=0),
            marker="o",
            lw=1.2 + 2 * c["size"] / len(labels),
            color=cmap(n / max(1, len(shown) - 1)),
            label=f"cluster {c['cluster']}: {c['size']} ex, {c['selected']} selected",
        )
    ax.set_xlabel("proxy training step (checkpoint)")
    ax.set_ylabel("mean token loss of the answer (nats)")
    title = f"S2L: mean loss trajectory per cluster ({len(spread)} clusters"
    ax.set_title(title + (", 20 largest shown)" if len(spread) > 20 else ")"))
    ax.legend(fontsize=7, ncol=2 if len(shown) > 8 else 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(selection: dict) -> str:
    lines = [
        f"# {selection['method'].upper()} selection of {Path(selection['data']['file']).name}",
        "",
        f"{selection['selected']} of {selection['data']['examples']} examples (budget {selection['budget']['given']}), "
        f"seed {selection['seed']}.",
    ]
    if selection["method"] == "s2l":
        proxy = selection["proxy"]
        lines += [
            f"Proxy: {proxy['model']['name']} with a LoRA adapter (rank {proxy['options']['lora_rank']}), "
            f"{proxy['options']['epochs']:g} epochs; losses at steps {proxy['checkpoint_steps']}.",
            f"{selection['clusters']['k']} K-means clusters of the loss trajectories; the budget spread smallest "
            "cluster first (![mean trajectories](clusters.png)).",
            "",
            "| cluster | size | selected | mean trajectory |",
            "|---:|---:|---:|---|",
        ]
        for c in selection["clusters"]["spread"]:
            traj = ", ".join(f"{v:.3f}" for v in c["mean_trajectory"])
            lines.append(f"| {c['cluster']} | {c['size']} | {c['selected']} | {traj} |")
    return "\n".join(lines) + "\n"


def run_selection(run: SelectionRun) -> Path:
    """Select a subset of the set of ``run.data_file``; return the output folder."""
    started = time.perf_counter()
    require([(run.method in ("s2l", "random"), f"unknown selection method {run.method!r}: s2l or random")])
    workspace = Workspace(run.out, overwrite=run.overwrite, restart=run.restart)
    workspace.check_output()
    data = read_selection_set(run.data_file)
    size = len(data.examples)
    budget = run.budget.resolve(size)
    seed = run.proxy.seed
    data_sha = file_sha256(data.path)
    selection: dict = {
        "format": 1,
        "method": run.method,
        "created": created_now(),
        "data": {
            "file": str(data.path),
            "sha256": data_sha,
            "kind": data.kind,
            "examples": size,
            "target": "response" if data.kind == "demonstrations" else "chosen",
        },
        "budget": {"given": str(run.budget), "examples": budget},
        "seed": seed,
        "command": run.command,
        "versions": versions(),
    }
    labels = trajectories = steps = None
    if run.method == "random":
        chosen = random_sample(size, budget, seed)
        workspace.open({"kind": "select-random", "data_sha256": data_sha}, {})
    else:
        from alignd.train.tuning import resolve_base_model

        clusters = run.clusters if run.clusters is not None else default_clusters(size)
        require(
            [
                (
                    1 <= clusters <= size,
                    f"--clusters {clusters} is more than the set's {size} examples: give at most {size} (default: "
                    f"{default_clusters(size)})",
                )
            ]
        )
        run.proxy.check()
        run.proxy.checkpoint_steps(size)  # the schedule fits, before any work
        from alignd.models.weights import weights_digest

        model_dir, model_name = resolve_base_model(run.settings, progress=run.progress)
        digest = weights_digest(model_dir)
        proxy_identity = {k: v for k, v in asdict(run.proxy).items() if k != "loss_batch_size"}
        workspace.open(
            {"kind": "select-s2l", "data_sha256": data_sha, "proxy_weights": digest, "proxy": proxy_identity}, {}
        )
        for note in workspace.notes:
            logger.warning("%s", note)
        trajectories, steps, proxy_metrics = proxy_trajectories(
            model_dir, data.examples, run.proxy, workspace.partial, progress=run.progress
        )
        t0 = time.perf_counter()
        labels = cluster_trajectories(trajectories, clusters, seed)
        chosen, spread = s2l_sample(labels, budget, seed)
        proxy_metrics["cluster_and_sample_s"] = round(time.perf_counter() - t0, 3)
        for c in spread:
            c["mean_trajectory"] = [round(float(v), 4) for v in trajectories[labels == c["cluster"]].mean(axis=0)]
        selection["proxy"] = {
            "model": {"name": model_name, "path": str(model_dir), "weights_digest": digest},
            "options": asdict(run.proxy),
            "checkpoint_steps": steps,
            "trainer": "TRL SFTTrainer, LoRA (PEFT), loss on the answer only",
            "metrics": proxy_metrics,
        }
        selection["clusters"] = {
            "k": clusters,
            "algorithm": "scikit-learn KMeans (k-means++, n_init=10)",
            "spread": spread,
        }
    selection["selected"] = int(len(chosen))
    selection["ids"] = [data.examples[i].id for i in chosen]
    selection["metrics"] = {
        "wall_s_this_process": round(time.perf_counter() - started, 3),
        "peak_rss_mib": peak_rss_mib(),
    }

    folder = workspace.fresh_result_dir()
    keep = {data.examples[i].line for i in chosen}
    lines = data.path.read_text(encoding="utf-8").splitlines(keepends=True)
    with open(folder / SUBSET_FILE, "w", encoding="utf-8") as handle:
        for number, line in enumerate(lines, start=1):
            if number in keep:
                handle.write(line if line.endswith("\n") else line + "\n")
    if trajectories is not None:
        with open(folder / TRAJECTORIES_FILE, "w", encoding="utf-8") as handle:
            for e, row, label in zip(data.examples, trajectories, labels, strict=False):
                handle.write(
                    json.dumps({"id": e.id, "cluster": int(label), "losses": [round(float(v), 5) for v in row]}) + "\n"
                )
        _plot(folder / PLOT_FILE, trajectories, labels, steps, selection["clusters"]["spread"])
    (folder / REPORT_FILE).write_text(_report(selection), encoding="utf-8")
    write_json_atomic(folder / SELECTION_FILE, jsonable(selection))  # last: a folder with it is complete
    return workspace.publish()


def read_selection(folder: str | Path) -> dict:
    """A finished selection's ``selection.json``."""
    path = Path(folder) / SELECTION_FILE
    if not path.is_file():
        raise TrainingInputError(f"{folder} is not a finished selection (no {SELECTION_FILE} in it)")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------- --select on alignd train
def select_for_training(
    settings: Settings, data_file: Path, spec: tuple[str, Budget], work_dir: Path, *, seed: int, progress: bool = True
) -> tuple[list[str], dict]:
    """Run (or reuse, when ``work_dir/selection`` holds the same selection of the same file) the
    selection ``spec`` of ``alignd train --select`` over ``data_file``, the proxy being the model the
    run trains. Returns the selected ids and the record the adapter's manifest keeps."""
    import shutil

    method, budget = spec
    out = work_dir / "selection"
    data_sha = file_sha256(data_file)
    selection = None
    if (out / SELECTION_FILE).is_file():
        old = read_selection(out)
        if (old["data"]["sha256"], old["method"], old["budget"]["given"], old["seed"]) == (
            data_sha,
            method,
            str(budget),
            seed,
        ):
            selection = old
        else:
            shutil.rmtree(out)
    if selection is None:
        run_selection(
            SelectionRun(
                settings=settings,
                data_file=data_file,
                out=out,
                budget=budget,
                method=method,
                proxy=ProxyOptions(seed=seed),
                progress=progress,
            )
        )
        selection = read_selection(out)
    record = {
        "method": method,
        "budget": selection["budget"]["given"],
        "selected": selection["selected"],
        "of": selection["data"]["examples"],
        "selected_from": {"file": selection["data"]["file"], "sha256": data_sha, "target": selection["data"]["target"]},
        "seed": seed,
        "ids": selection["ids"],
    }
    if method == "s2l":
        record["proxy"] = {k: selection["proxy"][k] for k in ("model", "options", "checkpoint_steps", "trainer")}
        record["clusters"] = {
            "k": selection["clusters"]["k"],
            "algorithm": selection["clusters"]["algorithm"],
            "spread": [{k: c[k] for k in ("cluster", "size", "selected")} for c in selection["clusters"]["spread"]],
        }
    return selection["ids"], record
