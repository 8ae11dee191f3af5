"""The data cache: the finished states and features of runs with the same inputs, kept after the head is
published, so that training again with other options does not make them again."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from alignd.settings import Settings
from alignd.train.data import append_work_records, read_work_file
from alignd.train.manifest import jsonable
from alignd.train.value_head.options import ANSWERS_FILE, DENSE_STAMP, FEATURES_FILE, STATES_FILE


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
