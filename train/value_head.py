"""``alignd train value-head``: distil the baseline's rollout values ``Q^BL(s, z)`` into a value head.

    training prompts --(SFT engine, temperature 1)--> one answer per state slot, cut at a random length
        --> state s = (prompt, partial answer)
        --> the SFT model's top-k candidates z (Engine.top_k_next) and Q^BL(s, z) for each, from the
            rollout estimator transfer_q decoding builds (Generation.value_estimator): the same code, so the
            targets are exactly the values rollout TQ* would use at s
        --> <out>.partial/states.jsonl, one line per finished state (resumable)
    then, in transformers (float32, the same weights):
        h(s)  the final normalised hidden state at the last token of s (what the LM head reads)
        e(z)  the input embedding of each candidate
    then a ValueHead (alignd.models.value_head) fitted with Adam on a split by prompt, a learning curve
    over data sizes, and the head folder (weights + manifest + learning_curve.png).

**Why these targets.** TQ* decodes over the SFT model's top-k, so the head must rank those candidates at
the states decoding visits. The states come from the SFT model's own samples (the states rollout-free
decoding starts from and stays near at large alpha), the candidates are its top-k, and the values come
from the baseline's rollouts scored by the target reward: the estimator ALGORITHMS.md section 7 calls a
distilled value head, not the cheaper FUDGE-style regression of whole-sample rewards onto prefixes
(which would only see the tokens the baseline itself picks).

**Why this loss.** The rule ``pi_sft(z|s) * exp(Q(s,z) / alpha)`` is normalised over the candidates of one
state, so adding a constant to all of a state's values changes nothing: only differences of Q within a
state matter. The loss therefore compares within-state differences only, in units of ``sigma`` (the
spread of the centred training targets, so that one learning rate fits any reward's scale):

    loss = mean (q_c - t_c)^2 / sigma^2                                  (q_c, t_c: centred within the state)
         + w * mean_{i<j} KL( sigmoid((t_i - t_j)/sigma) || sigmoid((q_i - q_j)/sigma) )

The first term fits the size of the differences, which sampling and the alpha trade-off depend on; the
second (a soft-target RankNet term) weights every candidate pair by how clearly the rollouts order it,
which greedy decisions depend on. Both are minimised by the rollout differences themselves, so the
pairwise term changes where the errors go, not what the head converges to (a hinge or logistic ranking
loss would keep inflating the scale of Q, and alpha would then mean something else).

**Why transformers for the features.** vLLM gives no hidden states. The head will read, inside vLLM's
decode step, the rows ``LlamaForCausalLM.compute_logits(hidden_states)`` receives: vLLM's
``LlamaModel.forward`` ends with ``hidden_states, _ = self.norm(hidden_states, residual)`` (vllm 0.32,
``model_executor/models/llama.py``), so they are post-final-norm. transformers' ``LlamaModel`` also ends
with ``self.norm`` and returns that as ``last_hidden_state``, which ``LlamaForCausalLM`` feeds to
``lm_head``: the same vector (tests/test_train_value_head.py checks ``lm_head(h)`` against the model's
logits). The run also compares, per state, the top-1 of ``lm_head(h)`` with the engine's own top-1 and
records the agreement in the manifest: a state whose tokens were mangled would show up there.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from alignd.settings import NO_ADAPTER, Settings
from alignd.train.data import (
    PromptRecord,
    TrainingError,
    TrainingInputError,
    append_work_records,
    file_sha256,
    read_prompts,
    read_work_file,
    require,
)
from alignd.train.manifest import created_now, jsonable, peak_rss_mib, versions
from alignd.train.workspace import Workspace

if TYPE_CHECKING:
    import torch

    from alignd.decoding.config import DecodingConfig
    from alignd.decoding.generation import Generation
    from alignd.decoding.prompt import Prompt
    from alignd.decoding.values import ValueEstimator
    from alignd.models.value_head import ValueHead

logger = logging.getLogger(__name__)

STATES_FILE = "states.jsonl"  # one finished state per line, appended as states finish
FEATURES_FILE = "features.pt"  # h(s) and candidate embeddings, computed once after the states
ANSWERS_FILE = "answers.jsonl"  # implicit targets: one sampled answer per line (train/implicit_targets.py)
DENSE_STAMP = "dense.json"  # implicit targets: which answers the states and features were computed from
PLOT_FILE = "learning_curve.png"
MAX_HEAD_BYTES = 10 * 1024 * 1024
# The evaluation prompts the training pool must not overlap (eval/quality.py reads the same file).
DEFAULT_EVAL_PROMPTS = Path(__file__).resolve().parents[1] / "eval" / "prompts.jsonl"
KIND = "value_head"
TARGET_KINDS = ("rollouts", "implicit")
# Alphas at which the greedy-choice agreement is also reported: at large alpha the rule keeps the SFT
# choice whatever Q says, so agreement there says little about the head (the eval sweeps these).
AGREEMENT_ALPHAS = (0.1, 0.3, 1.0)


# ---------------------------------------------------------------------------- options
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


@dataclass(frozen=True)
class Shard:
    """``--shard K/N``: the states of the slots whose index is K modulo N, written to a file of their own,
    so that N processes (one per core: every vLLM engine of a process computes on one core here) make a
    run's states together; the command without ``--shard`` then merges the shards and trains."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise TrainingInputError(f"--shard {text!r} is not K/N (for example 0/2)") from None
        require([(count >= 2 and 0 <= index < count, f"--shard {text}: N must be >= 2 and K in 0..N-1")])
        return cls(index, count)

    @property
    def file(self) -> str:
        return f"states.shard-{self.index}-of-{self.count}.jsonl"

    def owns(self, slot: StateSlot) -> bool:
        return slot.index % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


SHARD_GLOB = "states.shard-*-of-*.jsonl"


@contextmanager
def _locked(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the block; yields whether it was taken
    (always, when ``wait``). A lock dies with its process, so a killed shard never blocks the merge."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def merge_shards(partial: Path) -> int:
    """Append the states of finished ``--shard`` runs to the run's states file and remove their files;
    returns the number of states added. A shard still being made (its process holds the lock on its
    file) is an error that names it, and nothing is merged: merging it now would lose what it adds later."""
    shard_files = sorted(partial.glob(SHARD_GLOB))
    with ExitStack() as locks:
        for shard_file in shard_files:
            if not locks.enter_context(_locked(shard_file, wait=False)):
                raise TrainingInputError(
                    f"{shard_file.name} is still being made by a running --shard process: wait "
                    "for it to finish (or stop it) before training"
                )
        have = {r["slot"] for r in read_work_file(partial / STATES_FILE)}
        added = 0
        for shard_file in shard_files:
            new = [r for r in read_work_file(shard_file) if r["slot"] not in have]
            if new:
                append_work_records(partial / STATES_FILE, new)
            have.update(r["slot"] for r in new)
            added += len(new)
            shard_file.unlink()
    return added


# ---------------------------------------------------------------------------- inputs
def _normalised(text: str) -> str:
    return " ".join(text.casefold().split())


def check_disjoint(prompts: list[PromptRecord], prompts_file: Path, eval_file: Path | None) -> dict:
    """Refuse a training pool that shares a prompt (same text, case and spacing aside) with the
    evaluation prompts: the head's held-out quality is measured on those. Returns what was checked."""
    if eval_file is None:
        return {"checked": False, "reason": "no evaluation prompts given"}
    eval_file = Path(eval_file).expanduser().absolute()
    if not eval_file.is_file():
        return {"checked": False, "reason": f"{eval_file} does not exist"}
    held = read_prompts(eval_file)
    texts = {_normalised(p.prompt): p for p in held}
    shared = [(p, texts[_normalised(p.prompt)]) for p in prompts if _normalised(p.prompt) in texts]
    if shared:
        mine, theirs = shared[0]
        raise TrainingInputError(
            f"{prompts_file}:{mine.line}: prompt '{mine.id}' is also evaluation prompt '{theirs.id}' of {eval_file} "
            f"({len(shared)} shared in all): the training pool must be disjoint from the evaluation prompts"
        )
    return {
        "checked": True,
        "file": str(eval_file),
        "sha256": file_sha256(eval_file),
        "prompts": len(held),
        "shared": 0,
    }


@dataclass(frozen=True)
class BaselineChoice:
    """The baseline whose rollouts give the targets, and the settings under which the server's own
    :func:`alignd.decoding.baselines.build_baselines` makes exactly it the ``default`` baseline."""

    name: str  # as given on the command line
    kind: str  # adapter | model | prompted | url
    source: str  # the folder, the system prompt, or the remote's URL (and served model name)
    weights_digest: str | None = None  # of the adapter's (or model's) tensors
    engine_updates: dict = field(default_factory=dict)
    adapter_manifest: dict = field(default_factory=dict)

    def identity(self) -> dict:
        return {"name": self.name, "kind": self.kind, "source": self.source, "weights_digest": self.weights_digest}

    def manifest_entry(self) -> dict:
        made = self.adapter_manifest
        return {
            **self.identity(),
            "reward": made.get("reward"),
            "beta": made.get("beta"),
            "trained_as": made.get("kind"),
            "base_model": made.get("base_model"),
        }


def resolve_baseline(settings: Settings, name: str, model_dir: Path) -> BaselineChoice:
    """``name``: ``default`` (the server's default baseline: ALIGND_BASELINE_URL, else
    ALIGND_BASELINE_ADAPTER or the committed adapter on the embedded model), ``prompted``, a baseline of
    ALIGND_BASELINES (an adapter, a model folder, a system prompt or a remote ``{"url"}``), or an adapter
    or model folder. Adapters are checked against the base weights here, before any engine starts; a
    remote is checked when the engine starts (its model and tokenizer, as the server does)."""
    from alignd.models.adapters import load_adapter
    from alignd.models.weights import weights_digest

    prompted = {"system_prompt": settings.baseline_system_prompt}
    if name == "prompted":
        spec: Any = prompted
    elif name == "default":
        if settings.baseline_url:
            spec = {"url": settings.baseline_url, "served_model": settings.baseline_served_model}
        elif (adapter := settings.default_adapter_dir()) is not None:
            spec = {"adapter": str(adapter)}
        elif settings.baseline_model:
            spec = {"model": settings.baseline_model}
        else:
            spec = prompted
    elif name in settings.baselines:
        spec = settings.baselines[name]
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser().absolute()
        spec = {"adapter": str(folder)} if (folder / "adapter_config.json").is_file() else {"model": str(folder)}
    else:
        known = ", ".join(["default", "prompted", *settings.baselines])
        raise TrainingInputError(
            f"unknown baseline '{name}': use one of {known} (ALIGND_BASELINES), or an adapter or model folder"
        )
    if not isinstance(spec, dict) or len({"adapter", "model", "system_prompt", "url"} & set(spec)) != 1:
        raise TrainingInputError(
            f"baseline '{name}' must be an object with exactly one of 'adapter', 'model', 'system_prompt' or 'url'"
        )
    # Every other way of naming the default baseline is unset, so that build_baselines makes this one it
    # (ALIGND_BASELINE_URL, where set, would otherwise win over the chosen adapter or prompt).
    unset = {
        "baseline_adapter": NO_ADAPTER,
        "baseline_model": None,
        "baselines": {},
        "baseline_url": None,
        "baseline_served_model": None,
    }
    if "url" in spec:
        url, served = str(spec["url"]), spec.get("served_model")
        # A remote's weights cannot be hashed from here: its identity is its URL and served model name.
        source = url if not served else f"{url} ({served})"
        return BaselineChoice(
            name, "url", source, None, {**unset, "baseline_url": url, "baseline_served_model": served}
        )
    if "system_prompt" in spec:
        prompt = str(spec["system_prompt"])
        return BaselineChoice(name, "prompted", prompt, None, {**unset, "baseline_system_prompt": prompt})
    if "adapter" in spec:
        lora = settings.engine == "vllm" and settings.adapter_serving == "lora"
        info = load_adapter(
            name,
            spec["adapter"],
            model_dir,
            max_rank=settings.max_lora_rank,
            lora_modules=settings.lora_target_modules if lora else None,
        )
        folder = info.path.absolute()
        return BaselineChoice(
            name,
            "adapter",
            str(folder),
            weights_digest(folder),
            {**unset, "baseline_adapter": str(folder)},
            info.manifest,
        )
    folder = Path(spec["model"]).expanduser().absolute()
    if not (folder / "config.json").is_file():
        raise TrainingInputError(f"baseline '{name}': {folder} is not a model folder (no config.json)")
    return BaselineChoice(name, "model", str(folder), weights_digest(folder), {**unset, "baseline_model": str(folder)})


# ---------------------------------------------------------------------------- states and targets
def _derived_seed(seed: int, slot: int, stream: int) -> int:
    # Distinct, reproducible seeds per state slot and per use (answer, cut, rollouts).
    return (seed * 1_000_003 + slot * 7919 + stream * 104_729) % (2**31)


@dataclass(frozen=True)
class StateSlot:
    """The i-th state of a run: its prompt and its seeds. Slots do not depend on the number of states,
    so a resumed run with more ``--states`` keeps the finished ones and adds new slots after them."""

    index: int
    prompt: PromptRecord
    seed: int

    @property
    def answer_seed(self) -> int:
        return _derived_seed(self.seed, self.index, 0)

    @property
    def cut_seed(self) -> int:
        return _derived_seed(self.seed, self.index, 1)

    @property
    def rollout_seed(self) -> int:
        return _derived_seed(self.seed, self.index, 2)


def state_slots(prompts: Sequence[PromptRecord], n: int, seed: int) -> list[StateSlot]:
    """``n`` slots over the prompts, round-robin in a seeded order (every prompt gets n / P states)."""
    order = random.Random(seed).sample(list(prompts), len(prompts))
    return [StateSlot(i, order[i % len(order)], seed) for i in range(n)]


@dataclass(frozen=True)
class StateTargets:
    candidates: list[int]
    sft_logprobs: list[float]
    values: list[float]
    cost: dict


class TargetMaker:
    """The targets of states: the SFT model's top-k candidates and ``Q^BL(s, z)`` from the estimator that
    transfer_q decoding itself builds (:meth:`Generation.value_estimator`), called as ``ValueGuidedDecoder`` calls it
    (its ``top_k_next`` on the SFT prefix, then ``estimate`` with the baseline's own prefix)."""

    def __init__(
        self, generation: Generation, estimator: ValueEstimator, config: DecodingConfig, options: TargetOptions
    ) -> None:
        self.generation = generation
        self.estimator = estimator
        self.config = config
        self.options = options
        self.engine = generation.engine
        self.eos = frozenset(self.engine.info.eos_token_ids)

    @classmethod
    def for_transfer_q(
        cls, generation: Generation, *, reward: str, options: TargetOptions, baseline: str = "default"
    ) -> TargetMaker:
        """The estimator of ``{"method": "transfer_q", "baseline": ..., "reward": ..., "top_k": ...,
        "num_rollouts": ..., "rollout_len": ...}``, planned and resolved as a request would be (the
        server's defaults and limits apply: rollouts are greedy for one rollout, temperature 1 else)."""
        from alignd.decoding.config import DecodingConfig

        request = DecodingConfig(
            method="transfer_q",
            baseline=baseline,
            reward=reward,
            top_k=options.top_k,
            num_rollouts=options.num_rollouts,
            rollout_len=options.rollout_len,
        )
        config, estimator = generation.value_estimator(request)
        return cls(generation, estimator, config, options)

    def policy_prefix(self, prompt: Prompt) -> list[int]:
        policy = self.estimator.policy_for_prefix()
        return policy.prefix(prompt) if policy is not None else list(prompt.token_ids)

    async def values_at(self, prompt: Prompt, generated: list[int], seed: int | None) -> StateTargets:
        """Candidates and targets at the state (``prompt``, ``generated``)."""
        top = (await self.engine.top_k_next([list(prompt.token_ids) + generated], self.config.top_k))[0]
        candidates = [t.token_id for t in top]
        values, cost = await self.estimator.estimate(prompt, self.policy_prefix(prompt), generated, candidates, seed)
        return StateTargets(
            candidates,
            [float(t.logprob) for t in top],
            [float(v) for v in values],
            {"rollouts": cost.rollouts, "rollout_tokens": cost.rollout_tokens, "reward_calls": cost.reward_calls},
        )

    async def state(self, slot: StateSlot) -> dict:
        """One state: an SFT answer to the slot's prompt (temperature ``sample_temperature``), cut at a
        seeded random length, then its targets. The answer is sampled whole and cut uniformly over its
        positions (a finished answer's last state is the one where it chose end-of-text)."""
        began = time.perf_counter()
        opts = self.options
        prompt = self.generation.render_chat(slot.prompt.chat())
        prefix = list(prompt.token_ids)
        answer = (
            await self.engine.rollouts([prefix], 1, opts.answer_len, opts.sample_temperature, seed=slot.answer_seed)
        )[0][0].token_ids
        finished = bool(answer) and answer[-1] in self.eos
        body = answer[:-1] if finished else answer
        cut = random.Random(slot.cut_seed).randint(0, min(len(body), opts.answer_len - 1))
        generated = list(body[:cut])
        seed = slot.rollout_seed if self.config.rollout_temperature > 0 else None
        targets = await self.values_at(prompt, generated, seed)
        return {
            "slot": slot.index,
            "prompt_id": slot.prompt.id,
            "tokens": prefix + generated,
            "prompt_tokens": len(prefix),
            "cut": cut,
            "answer_tokens": len(body),
            "answer_finished": finished,
            "candidates": targets.candidates,
            "sft_logprobs": targets.sft_logprobs,
            "values": targets.values,
            "cost": targets.cost,
            "seconds": round(time.perf_counter() - began, 4),
        }

    def check_context(self, prompts: Sequence[PromptRecord], prompts_file: Path) -> None:
        """Every state and its rollouts must fit the model's context."""
        context = self.engine.info.max_model_len
        need = self.options.answer_len + 1 + self.options.rollout_len
        for p in prompts:
            prompt = self.generation.render_chat(p.chat())
            longest = max(len(prompt.token_ids), len(self.policy_prefix(prompt)))
            if longest + need > context:
                raise TrainingInputError(
                    f"{prompts_file}:{p.line}: prompt '{p.id}' is {longest} tokens; with --answer-len "
                    f"{self.options.answer_len} and --rollout-len {self.options.rollout_len} it exceeds the "
                    f"model's context of {context}"
                )


def _unknown_reward(name: str, known: list[str]) -> TrainingInputError:
    return TrainingInputError(
        f"unknown reward '{name}'; known rewards: {', '.join(sorted(known))} (more through ALIGND_REWARDS)"
    )


async def _make_states(
    run: ValueHeadRun,
    engine_settings: Settings,
    prompts: list[PromptRecord],
    todo: list[StateSlot],
    total: int,
    states_file: Path,
) -> None:
    """Targets for the slots in ``todo`` on the served engine, with the server's baselines and rewards,
    ``concurrency`` states in flight; each state is appended to ``states_file`` as soon as it is done."""
    from alignd.decoding.generation import open_generation
    from alignd.errors import RewardNotFoundError
    from alignd.models.factory import open_engine

    async with (
        open_engine(engine_settings, progress=run.progress) as engine,
        open_generation(engine, engine_settings) as generation,
    ):
        try:
            generation.rewards.get(run.reward)
        except RewardNotFoundError:
            raise _unknown_reward(run.reward, generation.rewards.names()) from None
        maker = TargetMaker.for_transfer_q(generation, reward=run.reward, options=run.targets)
        maker.check_context(prompts, run.prompts_file)
        pending = iter(todo)
        bar = tqdm(
            total=total,
            initial=total - len(todo),
            unit="state",
            disable=not run.progress,
            desc=f"states: Q^BL of top-{run.targets.top_k} ({run.reward})",
        )

        async def worker() -> None:
            for slot in pending:  # one shared iterator: each slot goes to one worker
                record = await maker.state(slot)
                append_work_records(states_file, [record])
                bar.update(1)

        with bar:
            try:
                async with asyncio.TaskGroup() as group:
                    for _ in range(min(run.targets.concurrency, len(todo))):
                        group.create_task(worker())
            except BaseExceptionGroup as failed:
                raise failed.exceptions[0] from None


# ---------------------------------------------------------------------------- features
def final_hidden_states(
    model, sequences: Sequence[Sequence[int]], *, batch_size: int = 16, progress: bool = False
) -> torch.Tensor:
    """``h(s)`` [N, hidden] (float32): the last token's row of the base model's ``last_hidden_state``,
    i.e. after the final norm, the input of the LM head (see the module docstring). Sequences are
    batched by length, right-padded and masked (a causal model's real tokens never see the padding)."""
    import torch

    base = model.base_model
    device = next(model.parameters()).device
    out = torch.empty(len(sequences), model.config.get_text_config().hidden_size, dtype=torch.float32)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    with (
        torch.inference_mode(),
        tqdm(total=len(order), desc="features (h(s), transformers float32)", unit="state", disable=not progress) as bar,
    ):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            lengths = torch.tensor([len(sequences[i]) for i in rows])
            ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, i in enumerate(rows):
                ids[j, : len(sequences[i])] = torch.tensor(list(sequences[i]), dtype=torch.long)
                mask[j, : len(sequences[i])] = 1
            states = base(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            out[rows] = states[torch.arange(len(rows)), (lengths - 1).to(device)].float().cpu()
            bar.update(len(rows))
    return out


@dataclass
class Features:
    """``h(s)`` per state slot, and the input embeddings of every candidate token seen."""

    slots: list[int]
    hidden: torch.Tensor  # [S, d]
    token_ids: list[int]
    token_embeddings: torch.Tensor  # [U, d]
    hf_top1_agrees: list[bool]  # per slot: the top-1 of lm_head(h) is the engine's top-1 candidate
    logprob_gap: list[float]  # per slot: max |log-softmax(lm_head(h)) - the engine's| over the candidates

    def save(self, path: Path) -> None:
        import torch

        tmp = path.with_name(path.name + ".tmp")
        torch.save(asdict(self), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Features | None:
        import torch

        if not path.is_file():
            return None
        try:
            return cls(**torch.load(path, weights_only=True))
        except Exception:  # noqa: BLE001 - a torn or foreign file: computed again
            return None


def compute_features(model_dir: Path, records: list[dict], cache: Path, *, progress: bool = True) -> Features:
    """Features of the states in ``records``: those in ``cache`` are kept, the others computed with the
    SFT model in transformers (float32) and the cache rewritten."""
    import torch

    from alignd.train.tuning import load_sft

    known = Features.load(cache)
    have = set(known.slots) if known is not None else set()
    missing = [r for r in records if r["slot"] not in have]
    tokens_needed = sorted({z for r in records for z in r["candidates"]})
    if not missing and known is not None and set(tokens_needed) <= set(known.token_ids):
        return known
    model, _ = load_sft(model_dir)
    model.eval()
    hidden = final_hidden_states(model, [r["tokens"] for r in missing], progress=progress)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)
        embeddings = model.get_input_embeddings().weight.detach().float()[torch.tensor(tokens_needed)].clone()
    agrees = [int(logprobs[j].argmax()) == r["candidates"][0] for j, r in enumerate(missing)]
    gaps = [
        float((logprobs[j, torch.tensor(r["candidates"])] - torch.tensor(r["sft_logprobs"])).abs().max())
        for j, r in enumerate(missing)
    ]
    old = known if known is not None else Features([], torch.empty(0, hidden.shape[1]), [], torch.empty(0, 0), [], [])
    features = Features(
        slots=old.slots + [r["slot"] for r in missing],
        hidden=torch.cat([old.hidden, hidden]),
        token_ids=tokens_needed,
        token_embeddings=embeddings,
        hf_top1_agrees=old.hf_top1_agrees + agrees,
        logprob_gap=old.logprob_gap + gaps,
    )
    features.save(cache)
    del model
    gc.collect()
    return features


# ---------------------------------------------------------------------------- the head's data
@dataclass
class HeadData:
    """States as tensors: ``hidden`` [N, d], ``candidates`` [N, k] (rows of ``table``, the candidates'
    input embeddings [U, d]), ``targets`` and ``sft_logprobs`` [N, k], and each state's prompt id."""

    hidden: torch.Tensor
    candidates: torch.Tensor
    table: torch.Tensor
    targets: torch.Tensor
    sft_logprobs: torch.Tensor
    prompt_ids: list[str]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def candidate_embeddings(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        index = self.candidates if rows is None else self.candidates[rows]
        return self.table[index]

    def subset(self, rows: Sequence[int]) -> HeadData:
        import torch

        index = torch.tensor(list(rows), dtype=torch.long)
        return HeadData(
            self.hidden[index],
            self.candidates[index],
            self.table,
            self.targets[index],
            self.sft_logprobs[index],
            [self.prompt_ids[i] for i in rows],
        )


def head_data(records: list[dict], features: Features) -> HeadData:
    import torch

    row_of = {slot: i for i, slot in enumerate(features.slots)}
    column_of = {token: i for i, token in enumerate(features.token_ids)}
    k = min(len(r["candidates"]) for r in records)
    return HeadData(
        hidden=features.hidden[torch.tensor([row_of[r["slot"]] for r in records])],
        candidates=torch.tensor([[column_of[z] for z in r["candidates"][:k]] for r in records], dtype=torch.long),
        table=features.token_embeddings,
        targets=torch.tensor([r["values"][:k] for r in records], dtype=torch.float32),
        sft_logprobs=torch.tensor([r["sft_logprobs"][:k] for r in records], dtype=torch.float32),
        prompt_ids=[r["prompt_id"] for r in records],
    )


def split_by_prompt(prompt_ids: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train rows, held-out rows): a seeded ``fraction`` of the prompts (at least one, never all) and
    all their states are held out, so no prompt is on both sides."""
    unique = sorted(set(prompt_ids))
    if len(unique) < 2:
        raise TrainingError(f"the states come from {len(unique)} prompt(s): at least 2 are needed to hold some out")
    n_held = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    held = set(random.Random(seed).sample(unique, n_held))
    train = [i for i, p in enumerate(prompt_ids) if p not in held]
    heldout = [i for i, p in enumerate(prompt_ids) if p in held]
    return train, heldout


def target_scale(targets: torch.Tensor) -> float:
    """The spread of the within-state centred targets (the loss's unit)."""
    centred = targets - targets.mean(dim=-1, keepdim=True)
    return float(centred.pow(2).mean().sqrt())


# ---------------------------------------------------------------------------- loss and metrics
def head_loss(
    values: torch.Tensor, targets: torch.Tensor, scale: float, ranking_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of the module docstring for values and targets [B, k]: within-state centred squared
    error plus ``ranking_weight`` x the pairwise KL, both in units of ``scale``. Zero exactly when every
    within-state difference of ``values`` equals that of ``targets``."""
    import torch
    import torch.nn.functional as F

    centred_error = (values - values.mean(-1, keepdim=True)) - (targets - targets.mean(-1, keepdim=True))
    squared = centred_error.div(scale).pow(2).mean()
    k = values.shape[-1]
    i, j = torch.triu_indices(k, k, offset=1)
    predicted = (values[:, i] - values[:, j]) / scale
    wanted = (targets[:, i] - targets[:, j]) / scale
    p = torch.sigmoid(wanted)
    # KL(Bernoulli(p) || Bernoulli(sigmoid(predicted))) = BCE(predicted, p) - BCE(wanted, p)
    pairwise = (
        F.binary_cross_entropy_with_logits(predicted, p, reduction="none")
        - F.binary_cross_entropy_with_logits(wanted, p, reduction="none")
    ).mean()
    loss = squared + ranking_weight * pairwise
    return loss, {"squared": float(squared.detach()), "pairwise": float(pairwise.detach())}


def per_state_spearman(values, targets):
    """Spearman's rank correlation of each row of ``values`` with the same row of ``targets`` (numpy
    [N, k]): the Pearson correlation of their average ranks (scipy's ``rankdata``), which is what
    ``scipy.stats.spearmanr`` computes per row. NaN where either row is constant."""
    import numpy as np
    from scipy.stats import rankdata

    a = rankdata(values, axis=1)
    b = rankdata(targets, axis=1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=1) / denominator, np.nan)


def predict(head: ValueHead, data: HeadData) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return head(data.hidden, data.candidate_embeddings())


def evaluate(head: ValueHead, data: HeadData, *, alpha: float, scale: float, ranking_weight: float) -> dict:
    """The head against the rollout targets on ``data``: mean per-state Spearman over the candidates
    (states whose rollout values are all equal have no ranking and are left out, and counted), how
    often the rule's greedy choice ``argmax(log pi_sft + Q / alpha)`` is the same with the head's Q as
    with the rollouts' (and, for scale, how often plain SFT greedy already makes the rollouts' choice;
    also at :data:`AGREEMENT_ALPHAS`),
    the pairwise order accuracy, and the within-state centred squared error (the target variance beside
    it: an error below it means the head explains part of the differences)."""
    import numpy as np

    values = predict(head, data)
    targets = data.targets
    loss, parts = head_loss(values, targets, scale, ranking_weight)
    rho = per_state_spearman(values.numpy(), targets.numpy())
    ranked = ~np.isnan(rho)
    sft_choice = data.sft_logprobs.argmax(-1)

    def agreement(at: float) -> tuple[float, float]:
        rollout_choice = (data.sft_logprobs + targets / at).argmax(-1)
        head_choice = (data.sft_logprobs + values / at).argmax(-1)
        return (
            float((head_choice == rollout_choice).float().mean()),
            float((sft_choice == rollout_choice).float().mean()),
        )

    head_top1, sft_top1 = agreement(alpha)
    centred_error = (values - values.mean(-1, keepdim=True)) - (targets - targets.mean(-1, keepdim=True))
    centred_targets = targets - targets.mean(-1, keepdim=True)
    k = targets.shape[-1]
    i, j = np.triu_indices(k, 1)
    t_diff = (targets[:, i] - targets[:, j]).numpy()
    v_diff = (values[:, i] - values[:, j]).numpy()
    ordered = t_diff != 0
    return {
        "states": len(data),
        "spearman_mean": float(rho[ranked].mean()) if ranked.any() else None,
        "spearman_states": int(ranked.sum()),
        "top1_agreement": head_top1,
        "sft_top1_agreement": sft_top1,
        "top1_agreement_by_alpha": {
            f"{a:g}": dict(zip(("head", "sft"), agreement(a), strict=False)) for a in sorted({*AGREEMENT_ALPHAS, alpha})
        },
        "pairwise_accuracy": (
            float((np.sign(v_diff[ordered]) == np.sign(t_diff[ordered])).mean()) if ordered.any() else None
        ),
        "mse_centred": float(centred_error.pow(2).mean()),
        "target_variance_centred": float(centred_targets.pow(2).mean()),
        "loss": float(loss),
        **{f"loss_{name}": value for name, value in parts.items()},
    }


# ---------------------------------------------------------------------------- training
@dataclass
class FittedHead:
    head: ValueHead
    steps: int
    history: list[dict]
    final_train_loss: float
    seconds: float


def fit_head(
    train: HeadData,
    heldout: HeadData | None,
    opts: HeadTrainingOptions,
    *,
    steps: int,
    scale: float,
    vocab_size: int,
    eval_every: int | None = None,
) -> FittedHead:
    """A fresh :class:`ValueHead` trained with Adam for ``steps`` steps of ``batch_size`` states (the
    training states reshuffled at each pass); with ``eval_every``, the held-out metrics every so many
    steps go into the history."""
    import torch

    from alignd.models.value_head import ValueHead, ValueHeadConfig

    began = time.perf_counter()
    torch.manual_seed(opts.seed)
    head = ValueHead(ValueHeadConfig(hidden_size=train.hidden.shape[1], vocab_size=vocab_size, rank=opts.rank))
    optimizer = torch.optim.Adam(head.parameters(), lr=opts.learning_rate)
    shuffle = torch.Generator().manual_seed(opts.seed)
    queue = torch.empty(0, dtype=torch.long)
    history: list[dict] = []
    running: list[float] = []
    for step in range(1, steps + 1):
        while len(queue) < min(opts.batch_size, len(train)):
            queue = torch.cat([queue, torch.randperm(len(train), generator=shuffle)])
        rows, queue = queue[: opts.batch_size], queue[opts.batch_size :]
        head.train()
        values = head(train.hidden[rows], train.candidate_embeddings(rows))
        loss, _ = head_loss(values, train.targets[rows], scale, opts.ranking_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running.append(float(loss.detach()))
        if eval_every and heldout is not None and (step % eval_every == 0 or step == steps):
            head.eval()
            held = evaluate(head, heldout, alpha=opts.alpha, scale=scale, ranking_weight=opts.ranking_weight)
            history.append(
                {
                    "step": step,
                    "epoch": round(step * opts.batch_size / len(train), 3),
                    "train_loss": round(sum(running) / len(running), 6),
                    "heldout_loss": round(held["loss"], 6),
                    "heldout_spearman": held["spearman_mean"],
                    "heldout_top1_agreement": held["top1_agreement"],
                }
            )
            running = []
    head.eval()
    final = float(head_loss(predict(head, train), train.targets, scale, opts.ranking_weight)[0])
    return FittedHead(head, steps, history, final, time.perf_counter() - began)


def plot_learning_curve(curve: list[dict], path: Path, title: str, *, alpha: float, targets: str = "rollouts") -> None:
    """Held-out Spearman and top-1 agreement against the number of training states (a PNG)."""
    from matplotlib.figure import Figure

    def points(key: str) -> list[float]:
        return [math.nan if c["heldout"][key] is None else c["heldout"][key] for c in curve]

    sizes = [c["train_states"] for c in curve]
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.subplots()
    axes.plot(sizes, points("spearman_mean"), "o-", label=f"Spearman (head vs the {targets} targets)")
    axes.plot(sizes, points("top1_agreement"), "s-", label=f"top-1 agreement at alpha={alpha:g}")
    axes.axhline(
        curve[-1]["heldout"]["sft_top1_agreement"], color="grey", linestyle=":", label="top-1 agreement of SFT greedy"
    )
    axes.set_xscale("log")
    axes.minorticks_off()
    axes.set_xticks(sizes, [str(s) for s in sizes])
    axes.set_xlabel("training states")
    axes.set_ylabel(f"held-out ({curve[-1]['heldout']['states']} states)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=100)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread: the head's matrices are small, so thread hand-offs cost more than they save
    (7x slower with two threads on a 2-core machine shared with other work, measured)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_with_learning_curve(
    data: HeadData, train_rows: list[int], heldout_rows: list[int], opts: HeadTrainingOptions, vocab_size: int
) -> tuple[FittedHead, list[dict], dict]:
    """One head per data size (nested random subsets of the training states, ``curve_fractions`` of
    them), each trained for the same number of Adam steps (``epochs`` passes over the full training set)
    so that the sizes differ by data only. The full-data head is the result. Returns it, the curve and
    the loss's scale."""
    train, heldout = data.subset(train_rows), data.subset(heldout_rows)
    scale = target_scale(train.targets)
    if not scale > 0:
        raise TrainingError(
            "every state's candidates have the same rollout value: the reward does not tell them "
            "apart (a longer --rollout-len or another reward may)"
        )
    steps = max(1, math.ceil(opts.epochs * len(train) / opts.batch_size))
    per_epoch = max(1, math.ceil(len(train) / opts.batch_size))
    order = random.Random(opts.seed + 1).sample(range(len(train)), len(train))
    with _one_thread():
        return _fit_sizes(train, heldout, opts, vocab_size, scale=scale, steps=steps, per_epoch=per_epoch, order=order)


def _fit_sizes(
    train: HeadData,
    heldout: HeadData,
    opts: HeadTrainingOptions,
    vocab_size: int,
    *,
    scale: float,
    steps: int,
    per_epoch: int,
    order: list[int],
) -> tuple[FittedHead, list[dict], dict]:
    """The heads of :func:`train_with_learning_curve`, smallest data size first."""
    curve: list[dict] = []
    final: FittedHead | None = None
    for fraction in sorted(set(opts.curve_fractions)):
        size = max(1, math.ceil(fraction * len(train)))
        part = train.subset(sorted(order[:size]))
        full = fraction == 1.0
        fitted = fit_head(
            part, heldout, opts, steps=steps, scale=scale, vocab_size=vocab_size, eval_every=per_epoch if full else None
        )
        held = evaluate(fitted.head, heldout, alpha=opts.alpha, scale=scale, ranking_weight=opts.ranking_weight)
        curve.append(
            {
                "fraction": fraction,
                "train_states": size,
                "train_prompts": len(set(part.prompt_ids)),
                "steps": steps,
                "seconds": round(fitted.seconds, 3),
                "heldout": held,
            }
        )
        logger.info(
            "value head on %d states: held-out Spearman %s, top-1 agreement %.3f",
            size,
            held["spearman_mean"],
            held["top1_agreement"],
        )
        if full:
            final = fitted
    assert final is not None  # 1.0 is among the fractions (checked)
    return final, curve, {"scale": scale, "steps": steps, "steps_per_epoch": per_epoch}


# ---------------------------------------------------------------------------- the data cache
def data_cache(settings: Settings, inputs: dict) -> Path:
    """Where the finished states and features of runs with these inputs are kept after the head is
    published (the partial folder is removed then): a later run with the same inputs and other training
    options (--epochs, --rank, ... with --overwrite) trains again without making hours of states again."""
    key = hashlib.sha256(json.dumps(jsonable(inputs), sort_keys=True).encode()).hexdigest()[:16]
    return Path(settings.cache_dir).expanduser() / "value-head-data" / key


def restore_data(cache: Path, partial: Path) -> int:
    """Copy into the partial folder the cached states it lacks (and the cached features if it has none);
    returns the number of states restored."""
    restored = 0
    for name in (STATES_FILE, ANSWERS_FILE):  # (answers: implicit targets' sampled answers)
        have = {r["slot"] for r in read_work_file(partial / name)}
        cached = [r for r in read_work_file(cache / name) if r["slot"] not in have]
        if cached:
            append_work_records(partial / name, cached)
        restored += len(cached) if name == STATES_FILE else 0
    for name in (FEATURES_FILE, DENSE_STAMP):
        if (cache / name).is_file() and not (partial / name).exists():
            shutil.copy2(cache / name, partial / name)
    return restored


def keep_data(partial: Path, cache: Path) -> None:
    """Copy the run's states and features to the cache (each file replaced whole)."""
    cache.mkdir(parents=True, exist_ok=True)
    for name in (STATES_FILE, FEATURES_FILE, ANSWERS_FILE, DENSE_STAMP):
        if (partial / name).is_file():
            shutil.copy2(partial / name, cache / f"{name}.tmp")
            os.replace(cache / f"{name}.tmp", cache / name)


# ---------------------------------------------------------------------------- the command
def _model_shape(model_dir: Path) -> tuple[int, int]:
    """(hidden size, vocabulary size) of the model's text part."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir)).get_text_config()
    return int(config.hidden_size), int(config.vocab_size)


def _check_head_size(hidden_size: int, rank: int) -> None:
    # ValueHead's tensors: state d x r + r, token d x r, out r + 1 (float32)
    size = 4 * (2 * hidden_size * rank + 2 * rank + 1)
    if size > MAX_HEAD_BYTES - 2**20:  # a mebibyte left for the manifest and the plot
        raise TrainingInputError(
            f"--rank {rank} makes a head of {size / 2**20:.1f} MiB on hidden size {hidden_size}, "
            "above the 10 MiB a head may have: lower --rank"
        )


def _rollout_temperature(settings: Settings, options: TargetOptions) -> float:
    """The rollout temperature transfer_q resolves for these options (greedy for one rollout)."""
    from alignd.decoding.config import DecodingConfig

    request = DecodingConfig(
        method="transfer_q", num_rollouts=options.num_rollouts, rollout_len=options.rollout_len, top_k=options.top_k
    )
    return float(request.resolved(settings).rollout_temperature)


def _engine_dtype(settings: Settings) -> str:
    if settings.engine != "vllm":
        return "float32"  # the transformers engine runs float32
    from alignd.models.platform import engine_dtype

    return engine_dtype(settings.dtype)


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def _generate_states(
    run: ValueHeadRun,
    settings: Settings,
    model_dir: Path,
    baseline: BaselineChoice,
    prompts: list[PromptRecord],
    todo: list[StateSlot],
    total: int,
    states_file: Path,
) -> None:
    updates = {"model": str(model_dir), **baseline.engine_updates}
    if "value_head" in type(settings).model_fields:
        updates["value_head"] = "none"  # the targets come from rollouts: a plain SFT engine, no head in it
    engine_settings = settings.model_copy(update=updates)
    asyncio.run(_make_states(run, engine_settings, prompts, todo, total, states_file))
    # Free the engine now, while the modules its finalizers need are alive (see train/dpo.py).
    gc.collect()


@dataclass
class _RunContext:
    """What every kind of target shares: the checked inputs, the open workspace and the data cache."""

    run: ValueHeadRun
    settings: Settings
    workspace: Workspace
    prompts_file: Path
    prompts: list[PromptRecord]
    eval_check: dict
    model_dir: Path
    model_name: str
    vocab_size: int
    baseline: BaselineChoice
    digest: str
    inputs: dict
    cache: Path
    started: float


@dataclass
class _MadeData:
    """The states, their features, and what the manifest says of how they were made."""

    records: list[dict]
    features: Features
    manifest: dict  # top-level entries of the targets' kind (top_k, rollout_len, ... or beta)
    features_check: dict
    data: dict  # entries of the manifest's "data"
    notes: list[str]
    wall_s: dict


def _open_run(run: ValueHeadRun) -> _RunContext:
    """Check the inputs (before any engine starts), open the workspace, restore cached or sharded states."""
    from alignd.models.weights import weights_digest
    from alignd.train.dpo import precheck_reward
    from alignd.train.tuning import resolve_base_model

    started = time.perf_counter()
    settings = run.settings
    workspace = Workspace(run.out, overwrite=run.overwrite, restart=run.restart)
    workspace.check_output()
    run.targets.check(settings)
    run.training.check()
    require(
        [
            (
                run.shard is None or run.targets.kind == "rollouts",
                "--shard is for rollout targets: implicit targets cost one teacher-forced pass a sampled answer",
            )
        ]
    )
    prompts_file = Path(run.prompts_file).expanduser().absolute()
    prompts = read_prompts(prompts_file)
    eval_check = check_disjoint(prompts, prompts_file, run.eval_prompts_file)
    model_dir, model_name = resolve_base_model(settings, progress=run.progress)
    hidden_size, vocab_size = _model_shape(model_dir)
    _check_head_size(hidden_size, run.training.rank)
    baseline = resolve_baseline(settings, run.baseline, model_dir)
    reward = _target_reward(run, baseline)
    if run.targets.kind == "rollouts":  # (an implicit target's reward is the baseline's, not one to compute)
        precheck_reward(settings, reward)
    digest = weights_digest(model_dir)
    inputs = {
        "kind": KIND,
        "base_weights": digest,
        "prompts_sha256": file_sha256(prompts_file),
        "reward": reward,
        "reward_spec": settings.rewards.get(reward),
        "baseline": baseline.identity(),
        "engine": settings.engine,
        "dtype": _engine_dtype(settings),
        "targets": run.targets.identity(),
        "seed": run.training.seed,
    }
    cache = data_cache(settings, inputs)
    _open_workspace(run, workspace, inputs, cache)
    run = replace(run, reward=reward)
    return _RunContext(
        run,
        settings,
        workspace,
        prompts_file,
        prompts,
        eval_check,
        model_dir,
        model_name,
        vocab_size,
        baseline,
        digest,
        inputs,
        cache,
        started,
    )


def _target_reward(run: ValueHeadRun, baseline: BaselineChoice) -> str:
    """The reward the head's values are the Q of: ``--reward`` (default ALIGND_TARGET_REWARD) for rollout
    targets; for implicit targets the baseline's own, and another ``--reward`` is an error."""
    if run.targets.kind == "rollouts":
        return run.reward or run.settings.target_reward
    from alignd.train.implicit_targets import implicit_baseline

    form = implicit_baseline(baseline.name, baseline.kind, baseline.source, baseline.adapter_manifest)
    if run.reward is not None and run.reward != form.reward:
        raise TrainingInputError(
            f"--targets implicit gives the Q of the baseline's own reward, '{form.reward}', not of "
            f"'{run.reward}': leave --reward unset, or use --targets rollouts for another reward"
        )
    return form.reward


def _open_workspace(run: ValueHeadRun, workspace: Workspace, inputs: dict, cache: Path) -> None:
    training_identity = {**jsonable(asdict(run.training)), "states": run.targets.states}
    # Shards of one run open its partial folder at about the same time: one at a time.
    open_lock = workspace.partial.with_name(workspace.partial.name + ".lock")
    with _locked(open_lock):
        workspace.open(inputs, training_identity)
        if run.restart and run.shard is None:
            shutil.rmtree(cache, ignore_errors=True)
        elif restored := restore_data(cache, workspace.partial):
            workspace.notes.append(
                f"reused {restored} finished states of an earlier run with the same inputs ({cache})"
            )
        if run.shard is None and (merged := merge_shards(workspace.partial)):
            workspace.notes.append(f"merged {merged} states made by --shard runs")
    if run.shard is None:
        open_lock.unlink(missing_ok=True)  # only shards running side by side need it
    for note in workspace.notes:
        logger.warning("%s", note)


def run_value_head(run: ValueHeadRun) -> Path:
    """Make the states and targets (resumably), compute the features, train with a learning curve and
    publish the head folder at ``run.out``; returns it. With ``run.shard``: make that shard's states only
    and return the partial folder."""
    ctx = _open_run(run)
    if run.targets.kind == "implicit":
        from alignd.train.implicit_targets import make_implicit_data

        made = make_implicit_data(ctx)
    else:
        made = _rollout_data(ctx)
        if made is None:
            return ctx.workspace.partial
    return _train_and_publish(ctx, made)


def _rollout_data(ctx: _RunContext) -> _MadeData | None:
    """States cut from sampled answers and their rollout targets (resumable; a shard makes its own and
    returns None), then their features in transformers."""
    run, settings, workspace = ctx.run, ctx.settings, ctx.workspace
    states_file = workspace.partial / (STATES_FILE if run.shard is None else run.shard.file)
    slots = state_slots(ctx.prompts, run.targets.states, ctx.inputs["seed"])
    # A shard reads the merged states and its own file only: another shard's file is being written.
    finished = {r["slot"] for r in read_work_file(workspace.partial / STATES_FILE)}
    if run.shard is not None:
        finished |= {r["slot"] for r in read_work_file(states_file)}
    todo = [s for s in slots if s.index not in finished and (run.shard is None or run.shard.owns(s))]
    if run.shard is not None:
        with _locked(states_file, wait=False) as free:
            if not free:
                raise TrainingInputError(f"--shard {run.shard} is already running for {run.out}")
            if todo:  # the bar counts this shard's slots only (the others are another process's)
                owned = sum(1 for s in slots if run.shard.owns(s))
                _generate_states(run, settings, ctx.model_dir, ctx.baseline, ctx.prompts, todo, owned, states_file)
        logger.warning(
            "shard %s: its states are made (%d this process); when every shard is done, the command "
            "without --shard trains on all of them",
            run.shard,
            len(todo),
        )
        return None
    generation_s = 0.0
    if todo:
        began = time.perf_counter()
        _generate_states(run, settings, ctx.model_dir, ctx.baseline, ctx.prompts, todo, len(slots), states_file)
        generation_s = time.perf_counter() - began
    by_slot = {r["slot"]: r for r in read_work_file(states_file)}
    records = [by_slot[s.index] for s in slots]  # the first --states slots (a larger earlier run kept more)
    began = time.perf_counter()
    features = compute_features(ctx.model_dir, records, workspace.partial / FEATURES_FILE, progress=run.progress)
    row_of = {slot: i for i, slot in enumerate(features.slots)}
    check_rows = [row_of[r["slot"]] for r in records]
    costs = [r["cost"] for r in records]
    return _MadeData(
        records,
        features,
        manifest={
            "transfer": "direct",
            "targets": "rollouts",
            "top_k": run.targets.top_k,
            "rollout_len": run.targets.rollout_len,
            "num_rollouts": run.targets.num_rollouts,
            "rollout_temperature": _rollout_temperature(settings, run.targets),
        },
        features_check={
            "hf_top1_agreement": _mean([float(features.hf_top1_agrees[i]) for i in check_rows]),
            "max_logprob_gap": max((features.logprob_gap[i] for i in check_rows), default=None),
            "mean_logprob_gap": _mean([features.logprob_gap[i] for i in check_rows]),
            "meaning": "the engine's top-1 candidate vs the argmax of lm_head(h), and the largest gap between "
            "the engine's candidate log-probabilities and log-softmax(lm_head(h)) (engine dtype vs "
            "float32)",
        },
        data={
            "cost_per_state": {
                key: _mean([c[key] for c in costs]) for key in ("rollouts", "rollout_tokens", "reward_calls")
            },
            "cut": "uniform over the answer's positions",
            "cut_mean": _mean([r["cut"] for r in records]),
        },
        notes=[
            f"targets: Q^BL(s, z) from the rollout estimator of decoding method transfer_q (direct transfer), "
            f"baseline '{ctx.baseline.name}' ({ctx.baseline.kind}), for the SFT model's top-{run.targets.top_k} "
            "at states cut from its own sampled answers"
        ],
        wall_s={
            "states_this_process": round(generation_s, 3),
            "states_sum_of_per_state": round(sum(r.get("seconds", 0.0) for r in records), 3),
            "features": round(time.perf_counter() - began, 3),
        },
    )


def _train_and_publish(ctx: _RunContext, made: _MadeData) -> Path:
    from alignd.models.value_head import save_value_head

    run, opts, records = ctx.run, ctx.run.training, made.records
    data = head_data(records, made.features)
    train_rows, heldout_rows = split_by_prompt(data.prompt_ids, opts.holdout_fraction, ctx.inputs["seed"])
    began = time.perf_counter()
    fitted, curve, fit = train_with_learning_curve(data, train_rows, heldout_rows, opts, ctx.vocab_size)
    training_s = time.perf_counter() - began
    train_metrics = evaluate(
        fitted.head, data.subset(train_rows), alpha=opts.alpha, scale=fit["scale"], ranking_weight=opts.ranking_weight
    )
    split = {
        "by": "prompt",
        "holdout_fraction": opts.holdout_fraction,
        "train_states": len(train_rows),
        "heldout_states": len(heldout_rows),
        "train_prompts": len({data.prompt_ids[i] for i in train_rows}),
        "heldout_prompts": len({data.prompt_ids[i] for i in heldout_rows}),
    }
    manifest = {
        "kind": KIND,
        "created": created_now(),
        "base_model": {"name": ctx.model_name, "path": str(ctx.model_dir), "weights_digest": ctx.digest},
        "baseline": ctx.baseline.manifest_entry(),
        "reward": ctx.inputs["reward"],
        "reward_spec": ctx.inputs["reward_spec"],
        **made.manifest,
        "alpha": opts.alpha,
        "features": {
            "state": "final normalised hidden state at the last token of s (the LM head's input; vLLM's "
            "compute_logits row)",
            "candidate": "input embedding of the candidate token",
            "computed_with": "transformers, float32, the base model's weights",
            "check": made.features_check,
        },
        "data": _data_entry(ctx, made, data, split),
        "training": {
            "rank": opts.rank,
            "epochs": opts.epochs,
            "steps": fit["steps"],
            "steps_per_epoch": fit["steps_per_epoch"],
            "learning_rate": opts.learning_rate,
            "batch_size": opts.batch_size,
            "optimizer": "Adam",
            "ranking_weight": opts.ranking_weight,
            "target_scale": fit["scale"],
            "loss": "mean((q_c - t_c)^2)/scale^2 + ranking_weight * mean_{i<j} KL(sigmoid(dt/scale) || "
            "sigmoid(dq/scale)); c = centred within the state",
        },
        "metrics": {
            "heldout": curve[-1]["heldout"],
            "train": train_metrics,
            "final_train_loss": fitted.final_train_loss,
            "history": fitted.history,
        },
        "learning_curve": [_curve_point(c) for c in curve],
        "command": run.command,
        "seed": ctx.inputs["seed"],
        "versions": versions(),
        "wall_s": {
            **made.wall_s,
            "training": round(training_s, 3),
            "total_this_process": round(time.perf_counter() - ctx.started, 3),
        },
        "peak_rss_mib": peak_rss_mib(),
        "resumed": {"notes": ctx.workspace.notes},
        "notes": [
            *made.notes,
            "the head's Q is fitted up to a constant per state (the rule only uses differences within a state)",
        ],
    }
    folder = ctx.workspace.fresh_result_dir()
    plot_learning_curve(
        curve,
        folder / PLOT_FILE,
        f"{ctx.model_name}: value head for '{ctx.inputs['reward']}', "
        f"{made.manifest['targets']} targets of baseline '{ctx.baseline.name}'",
        alpha=opts.alpha,
        targets=made.manifest["targets"],
    )
    save_value_head(fitted.head, folder, jsonable(manifest))
    keep_data(ctx.workspace.partial, ctx.cache)
    size = sum(p.stat().st_size for p in folder.iterdir())
    if size > MAX_HEAD_BYTES:
        raise TrainingError(
            f"the head folder is {size / 2**20:.1f} MiB, above the 10 MiB a head may have: lower --rank"
        )
    return ctx.workspace.publish()


def _data_entry(ctx: _RunContext, made: _MadeData, data: HeadData, split: dict) -> dict:
    run, records = ctx.run, made.records
    return {
        "file": str(ctx.prompts_file),
        "sha256": ctx.inputs["prompts_sha256"],
        "prompts": len(ctx.prompts),
        "prompts_used": len(set(data.prompt_ids)),
        "eval_prompts": ctx.eval_check,
        "states": len(records),
        "sampling": {
            "engine": ctx.settings.engine,
            "dtype": ctx.inputs["dtype"],
            "answer_len": run.targets.answer_len,
            "temperature": run.targets.sample_temperature,
            "seed": ctx.inputs["seed"],
            "cut": made.data.get("cut"),
        },
        "split": split,
        **{k: v for k, v in made.data.items() if k not in ("cut",)},
        "targets": {
            "mean": float(data.targets.mean()),
            "std_within_state": target_scale(data.targets),
            "states_all_equal": int(sum(1 for r in records if len(set(r["values"])) == 1)),
        },
        "kept_in": str(ctx.cache),
    }


def _curve_point(c: dict) -> dict:
    return {
        "fraction": c["fraction"],
        "train_states": c["train_states"],
        "train_prompts": c["train_prompts"],
        "heldout_spearman": c["heldout"]["spearman_mean"],
        "heldout_top1_agreement": c["heldout"]["top1_agreement"],
        "heldout_pairwise_accuracy": c["heldout"]["pairwise_accuracy"],
        "heldout_mse_centred": c["heldout"]["mse_centred"],
    }


__all__ = [
    "BaselineChoice",
    "Features",
    "FittedHead",
    "HeadData",
    "HeadTrainingOptions",
    "Shard",
    "StateSlot",
    "TargetMaker",
    "TargetOptions",
    "ValueHeadRun",
    "check_disjoint",
    "compute_features",
    "evaluate",
    "final_hidden_states",
    "fit_head",
    "head_data",
    "head_loss",
    "merge_shards",
    "per_state_spearman",
    "plot_learning_curve",
    "resolve_baseline",
    "run_value_head",
    "split_by_prompt",
    "state_slots",
    "train_with_learning_curve",
]
