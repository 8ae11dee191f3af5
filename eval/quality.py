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


# The code is in the sibling package eval/harness/, one module per job; this script is its command line and
# its façade: ``import quality`` (with eval/ on sys.path) gives every name the tests and other scripts use.

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

EVAL_DIR = Path(__file__).resolve().parent
if str(EVAL_DIR) not in sys.path:  # eval/ is a folder of scripts, not a package: its helpers import by name
    sys.path.insert(0, str(EVAL_DIR))

from harness import cli  # noqa: E402
from harness.combine import combine_results  # noqa: E402
from harness.evaluation import evaluate  # noqa: E402
from harness.metrics import (  # noqa: E402
    AFINN_MAX_VALENCE,
    LOOP_REPETITION,
    add_text_metrics,
    afinn_score,
    best_of_n_kl,
    coherences,
    diversity,
    loop_share,
    ngram_repetition,
    repetition,
    summarize,
    truncation_kl,
    value_guidance,
    win_rate,
    win_tie_rate,
)
from harness.partial_log import Partial, load_partial, open_partial_log, run_signature  # noqa: E402
from harness.paths import DEFAULT_OUT, DEFAULT_PLOT, DEFAULT_PROMPTS, PARTIAL_LOG, REPO  # noqa: E402
from harness.plan import (  # noqa: E402
    ASSUMED_KINDS,
    BASELINE_READABLE,
    SWEEP_FAMILIES,
    MethodRun,
    Plan,
    baseline_readable,
    cd_partner,
    implicit_reward_name,
    load_prompts,
    method_family,
)
from harness.plots import plot_frontier, plot_main_rows  # noqa: E402
from harness.provenance import (  # noqa: E402
    PROMPTED_BASELINE_TEXT,
    default_baseline_text,
    environment,
    server_settings,
)
from harness.replay import HeadReplay, ImplicitReplay  # noqa: E402
from harness.report import TABLE_COLUMNS, markdown_table, replot, sweep_table, write_outputs  # noqa: E402
from harness.runner import Runner  # noqa: E402

_Runner = Runner  # the name the tests know the runner by

__all__ = [
    "AFINN_MAX_VALENCE",
    "ASSUMED_KINDS",
    "BASELINE_READABLE",
    "DEFAULT_OUT",
    "DEFAULT_PLOT",
    "DEFAULT_PROMPTS",
    "EVAL_DIR",
    "LOOP_REPETITION",
    "PARTIAL_LOG",
    "PROMPTED_BASELINE_TEXT",
    "REPO",
    "SWEEP_FAMILIES",
    "TABLE_COLUMNS",
    "HeadReplay",
    "ImplicitReplay",
    "MethodRun",
    "Partial",
    "Plan",
    "Runner",
    "add_text_metrics",
    "afinn_score",
    "baseline_readable",
    "best_of_n_kl",
    "cd_partner",
    "coherences",
    "combine_results",
    "default_baseline_text",
    "diversity",
    "environment",
    "evaluate",
    "implicit_reward_name",
    "load_partial",
    "load_prompts",
    "loop_share",
    "main",
    "markdown_table",
    "method_family",
    "ngram_repetition",
    "open_partial_log",
    "plot_frontier",
    "plot_main_rows",
    "repetition",
    "replot",
    "run_signature",
    "server_settings",
    "summarize",
    "sweep_table",
    "truncation_kl",
    "value_guidance",
    "win_rate",
    "win_tie_rate",
    "write_outputs",
]


def main(argv: Sequence[str] | None = None) -> None:
    """The command line, with this docstring as its ``--help`` text."""
    cli.main(argv, description=__doc__)


if __name__ == "__main__":
    main()
