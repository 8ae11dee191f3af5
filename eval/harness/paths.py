"""Where the evaluation reads its prompts and writes its results by default."""

from __future__ import annotations

from pathlib import Path

EVAL_DIR = Path(__file__).resolve().parents[1]
REPO = EVAL_DIR.parent
DEFAULT_PROMPTS = EVAL_DIR / "prompts.jsonl"
DEFAULT_OUT = EVAL_DIR / "results"
DEFAULT_PLOT = REPO / "docs" / "eval_frontier.png"
PARTIAL_LOG = "partial.jsonl"  # in --out: every finished response, for resuming
