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
  checkpoint in batched forward passes (examples sorted by length, so a batch pads little). The proxy
  and its losses are train/s2l_proxy.py; the set, the budget, the sampler and the command are here.
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
from alignd.train.s2l_proxy import ProxyOptions, proxy_trajectories
from alignd.train.s2l_proxy import example_losses as example_losses  # re-exported: eval/, tests/
from alignd.train.s2l_proxy import tokenize_examples as tokenize_examples  # re-exported: eval/, tests/
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
    selection = _selection_record(run, data, budget, data_sha)
    clustered: _Clustered | None = None
    if run.method == "random":
        chosen = random_sample(size, budget, seed)
        workspace.open({"kind": "select-random", "data_sha256": data_sha}, {})
    else:
        chosen, clustered = _select_s2l(run, workspace, data, budget, data_sha, selection)
    selection["selected"] = int(len(chosen))
    selection["ids"] = [data.examples[i].id for i in chosen]
    selection["metrics"] = {
        "wall_s_this_process": round(time.perf_counter() - started, 3),
        "peak_rss_mib": peak_rss_mib(),
    }
    _write_selection(workspace.fresh_result_dir(), data, chosen, clustered, selection)
    return workspace.publish()


def _selection_record(run: SelectionRun, data: SelectionSet, budget: int, data_sha: str) -> dict:
    """What selection.json says of every selection: the method, the set, the budget and the provenance."""
    return {
        "format": 1,
        "method": run.method,
        "created": created_now(),
        "data": {
            "file": str(data.path),
            "sha256": data_sha,
            "kind": data.kind,
            "examples": len(data.examples),
            "target": "response" if data.kind == "demonstrations" else "chosen",
        },
        "budget": {"given": str(run.budget), "examples": budget},
        "seed": run.proxy.seed,
        "command": run.command,
        "versions": versions(),
    }


@dataclass(frozen=True)
class _Clustered:
    """The proxy's loss trajectories (examples x checkpoints), their clusters and the checkpoint steps."""

    trajectories: np.ndarray
    labels: np.ndarray
    steps: list[int]


def _select_s2l(
    run: SelectionRun, workspace: Workspace, data: SelectionSet, budget: int, data_sha: str, selection: dict
) -> tuple[np.ndarray, _Clustered]:
    """S2L: the proxy trained (resumably, in the workspace), its trajectories clustered, the budget spread
    over the clusters; ``selection`` gets the proxy's and the clusters' entries."""
    from alignd.models.weights import weights_digest
    from alignd.train.tuning import resolve_base_model

    size, seed = len(data.examples), run.proxy.seed
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
    selection["clusters"] = {"k": clusters, "algorithm": "scikit-learn KMeans (k-means++, n_init=10)", "spread": spread}
    return chosen, _Clustered(trajectories, labels, steps)


def _write_selection(
    folder: Path, data: SelectionSet, chosen: np.ndarray, clustered: _Clustered | None, selection: dict
) -> None:
    """The selection's files in ``folder``: the subset, the trajectories and their plot (S2L), the report,
    and selection.json last (a folder with it is complete)."""
    keep = {data.examples[i].line for i in chosen}
    lines = data.path.read_text(encoding="utf-8").splitlines(keepends=True)
    with open(folder / SUBSET_FILE, "w", encoding="utf-8") as handle:
        for number, line in enumerate(lines, start=1):
            if number in keep:
                handle.write(line if line.endswith("\n") else line + "\n")
    if clustered is not None:
        with open(folder / TRAJECTORIES_FILE, "w", encoding="utf-8") as handle:
            for e, row, label in zip(data.examples, clustered.trajectories, clustered.labels, strict=False):
                handle.write(
                    json.dumps({"id": e.id, "cluster": int(label), "losses": [round(float(v), 5) for v in row]}) + "\n"
                )
        _plot(
            folder / PLOT_FILE,
            clustered.trajectories,
            clustered.labels,
            clustered.steps,
            selection["clusters"]["spread"],
        )
    (folder / REPORT_FILE).write_text(_report(selection), encoding="utf-8")
    write_json_atomic(folder / SELECTION_FILE, jsonable(selection))  # last: a folder with it is complete


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
