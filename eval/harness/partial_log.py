"""The resumable log of finished responses (``<out>/partial.jsonl``): one flushed JSON line per response
and per method's decode timing, keyed by the run signature, so that a killed run resumes where it stopped."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path


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
