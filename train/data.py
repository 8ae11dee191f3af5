"""Training data: the JSONL inputs (checked line by line) and the JSONL work files of a run.

Inputs are one JSON object per line: prompts ``{"id", "prompt"}`` for DPO, demonstrations
``{"id", "prompt", "response"}`` for IRFT. Any fault is a :class:`TrainingInputError` that names the
file and the line, so that ``alignd train`` can say exactly what to fix.

Work files (samples, negatives) are appended one batch at a time and may be cut short by an
interruption: :func:`read_work_file` keeps the whole lines and drops (and truncates away) a torn last
one, so a resumed run appends after the last finished batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from alignd.errors import AligndError, ClientError


class TrainingInputError(ClientError):
    """The command's input is wrong (a data file, an option, the output folder): ``alignd train`` exits
    with status 2 and this one-line message."""

    code = "invalid_training_input"


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise :class:`TrainingInputError` with the message of the first failed (ok, message) check."""
    for ok, message in checks:
        if not ok:
            raise TrainingInputError(message)


class TrainingError(AligndError):
    """The run cannot go on (e.g. every prompt's samples tied: no pair to train on); exit status 1."""

    code = "training_failed"


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    line: int  # where it came from, for messages

    def chat(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]


@dataclass(frozen=True)
class Demonstration:
    id: str
    prompt: str
    response: str
    line: int

    def chat(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_records(path: Path, fields: Sequence[str], what: str) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line of ``path``, each a JSON object whose ``fields`` are
    non-empty strings (``id`` may be an integer) and whose ids are unique."""
    if not path.is_file():
        raise TrainingInputError(f"{what} file {path} does not exist")
    out: list[tuple[int, dict]] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        try:
            lines = list(handle)
        except UnicodeDecodeError as exc:
            raise TrainingInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainingInputError(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(record, dict):
            raise TrainingInputError(f"{path}:{number}: expected a JSON object with {_listing(fields)}")
        for name in fields:
            if name not in record:
                raise TrainingInputError(
                    f"{path}:{number}: missing field '{name}' (each line needs {_listing(fields)})"
                )
            value = record[name]
            if name == "id" and isinstance(value, int) and not isinstance(value, bool):
                record[name] = value = str(value)
            if not isinstance(value, str) or not value.strip():
                raise TrainingInputError(
                    f"{path}:{number}: field '{name}' must be a non-empty string, got {value!r:.60}"
                )
        if record["id"] in seen:
            raise TrainingInputError(
                f"{path}:{number}: duplicate id '{record['id']}' (first on line {seen[record['id']]})"
            )
        seen[record["id"]] = number
        out.append((number, record))
    if not out:
        raise TrainingInputError(f"{what} file {path} holds no records")
    return out


def _listing(fields: Sequence[str]) -> str:
    return ", ".join(f'"{f}"' for f in fields)


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """The prompts of a JSONL file of ``{"id", "prompt"}`` lines (other fields are ignored)."""
    return [PromptRecord(r["id"], r["prompt"], n) for n, r in _read_records(Path(path), ("id", "prompt"), "prompts")]


def read_demonstrations(path: str | Path) -> list[Demonstration]:
    """The demonstrations of a JSONL file of ``{"id", "prompt", "response"}`` lines."""
    records = _read_records(Path(path), ("id", "prompt", "response"), "demonstrations")
    return [Demonstration(r["id"], r["prompt"], r["response"], n) for n, r in records]


# ---------------------------------------------------------------------------- work files
def append_work_records(path: Path, records: Iterable[dict]) -> None:
    """Append ``records`` as JSON lines in one write, flushed to disk: a batch is in the file whole, or
    (after a crash mid-write) as a torn last line that :func:`read_work_file` discards."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def read_work_file(path: Path) -> list[dict]:
    """The whole records of a work file (none if it does not exist). A torn last line (no newline, or
    not JSON) is cut off the file, so that the next append starts on a clean line."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    records: list[dict] = []
    good = 0  # bytes of whole, valid lines
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(good)
    return records


def write_json_atomic(path: Path, obj: object) -> None:
    """Write ``obj`` as JSON so that ``path`` is either absent, the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
