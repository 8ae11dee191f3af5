"""The options of ``alignd train value-head``: how the states and targets are made (:class:`TargetOptions`),
how the head is fitted (:class:`HeadTrainingOptions`), the whole run (:class:`ValueHeadRun`), and the names
of the files a run keeps in its partial folder and publishes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from alignd.settings import Settings
from alignd.train.data import require

if TYPE_CHECKING:
    from alignd.train.value_head.shards import Shard

STATES_FILE = "states.jsonl"  # one finished state per line, appended as states finish
FEATURES_FILE = "features.pt"  # h(s) and candidate embeddings, computed once after the states
ANSWERS_FILE = "answers.jsonl"  # implicit targets: one sampled answer per line (train/implicit_targets.py)
DENSE_STAMP = "dense.json"  # implicit targets: which answers the states and features were computed from
PLOT_FILE = "learning_curve.png"
MAX_HEAD_BYTES = 10 * 1024 * 1024
# The evaluation prompts the training pool must not overlap (eval/quality.py reads the same file).
DEFAULT_EVAL_PROMPTS = Path(__file__).resolve().parents[2] / "eval" / "prompts.jsonl"
KIND = "value_head"
TARGET_KINDS = ("rollouts", "implicit")
# Alphas at which the greedy-choice agreement is also reported: at large alpha the rule keeps the SFT
# choice whatever Q says, so agreement there says little about the head (the eval sweeps these).
AGREEMENT_ALPHAS = (0.1, 0.3, 1.0)


@dataclass(frozen=True)
class TargetOptions:
    """How the training states and their targets are made (all of it is an input of the run's data,
    except ``states``, which may grow on a resumed run, and ``concurrency``)."""

    states: int | None = 2000  # implicit: None = every state of the answers
    top_k: int = 10
    kind: str = "rollouts"  # rollouts | implicit (train/implicit_targets.py)
    answers: int | None = None  # implicit: SFT answers to sample (None: one per training prompt)
    rollout_len: int = 20
    num_rollouts: int = 1
    answer_len: int = 48  # longest sampled SFT answer; states are cut from it
    sample_temperature: float = 1.0
    concurrency: int = 16  # states in flight at once (their engine calls batch together)

    def check(self, settings: Settings) -> None:
        checks = [
            (
                (self.states is None and self.kind == "implicit") or (self.states is not None and self.states >= 4),
                f"--states must be >= 4 (some to train on, some held out), got {self.states}",
            ),
            (
                1 <= self.top_k <= settings.max_top_k,
                f"--top-k {self.top_k} is out of range: 1 to {settings.max_top_k} (ALIGND_MAX_TOP_K, at most "
                "ALIGND_MAX_LOGPROBS, the most log-probabilities the engine reports)",
            ),
            (self.top_k >= 2, "--top-k must be >= 2: a value head ranks candidates"),
            (
                0 <= self.rollout_len <= settings.max_rollout_len,
                f"--rollout-len {self.rollout_len} is out of range: 0 to {settings.max_rollout_len} "
                "(ALIGND_MAX_ROLLOUT_LEN)",
            ),
            (
                1 <= self.num_rollouts <= settings.max_num_rollouts,
                f"--num-rollouts {self.num_rollouts} is out of range: 1 to {settings.max_num_rollouts} "
                "(ALIGND_MAX_NUM_ROLLOUTS)",
            ),
            (self.answer_len >= 1, f"--answer-len must be >= 1, got {self.answer_len}"),
            (self.sample_temperature > 0, f"--sample-temperature must be > 0, got {self.sample_temperature}"),
            (self.concurrency >= 1, f"--concurrency must be >= 1, got {self.concurrency}"),
            (self.kind in TARGET_KINDS, f"--targets must be one of {', '.join(TARGET_KINDS)}, got {self.kind!r}"),
            (self.answers is None or self.answers >= 2, f"--answers must be >= 2, got {self.answers}"),
            (
                self.answers is None or self.kind == "implicit",
                "--answers is for --targets implicit (rollout targets cut one state from each answer: --states)",
            ),
        ]
        require(checks)

    def identity(self) -> dict:
        """What the states depend on (``states``, ``answers`` and ``concurrency`` do not change a finished
        state); the rollout fields mean nothing to implicit targets."""
        unused = {"states", "answers", "concurrency"}
        # ("kind" is left out for rollouts, so that runs made before implicit targets existed keep their identity)
        unused |= {"rollout_len", "num_rollouts"} if self.kind == "implicit" else {"kind"}
        return {k: v for k, v in asdict(self).items() if k not in unused}


@dataclass(frozen=True)
class HeadTrainingOptions:
    rank: int = 64
    epochs: float = 30.0
    learning_rate: float = 1e-3
    batch_size: int = 64  # states per Adam step
    ranking_weight: float = 1.0  # weight of the pairwise term of the loss
    holdout_fraction: float = 0.1  # of the prompts: their states are held out
    curve_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    alpha: float = 1.0  # recorded, and the alpha of the top-1 agreement metric
    seed: int = 0

    def check(self) -> None:
        checks = [
            (self.rank >= 1, f"--rank must be >= 1, got {self.rank}"),
            (self.epochs > 0, f"--epochs must be > 0, got {self.epochs}"),
            (self.learning_rate > 0, f"--learning-rate must be > 0, got {self.learning_rate}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.ranking_weight >= 0, f"--ranking-weight must be >= 0, got {self.ranking_weight}"),
            (0 < self.holdout_fraction < 1, f"--holdout-fraction must be in (0, 1), got {self.holdout_fraction}"),
            (self.alpha > 0, f"--alpha must be > 0, got {self.alpha}"),
            (
                len(self.curve_fractions) >= 3
                and all(0 < f <= 1 for f in self.curve_fractions)
                and 1.0 in self.curve_fractions,
                f"--curve-fractions needs at least three fractions in (0, 1], 1 among them, got "
                f"{','.join(f'{f:g}' for f in self.curve_fractions)}",
            ),
        ]
        require(checks)


@dataclass
class ValueHeadRun:
    settings: Settings
    prompts_file: Path
    reward: str | None  # None: ALIGND_TARGET_REWARD (rollouts), the baseline's own (implicit)
    out: Path
    baseline: str = "default"
    targets: TargetOptions = field(default_factory=TargetOptions)
    training: HeadTrainingOptions = field(default_factory=HeadTrainingOptions)
    eval_prompts_file: Path | None = DEFAULT_EVAL_PROMPTS
    overwrite: bool = False
    restart: bool = False
    command: list[str] = field(default_factory=list)
    progress: bool = True
    shard: Shard | None = None  # make only this shard's states, then stop (no training)
