"""Where a run keeps its work until it is done: ``<out>.partial/``, then one rename to ``<out>/``.

A run writes everything it finishes into the partial folder (samples, negatives, TRL checkpoints, the
adapters of finished rounds), so an interrupted run, started again with the same command, carries on
where it stopped. ``run.json`` in that folder records what the work was made from; a later run with
other inputs refuses to mix its work with it (``--restart`` discards it), and a run whose *training*
options alone changed keeps the expensive data (samples) and drops only the training checkpoints.

The finished adapter is assembled in ``<out>.partial/result/`` and moved to ``<out>`` by a rename, the
manifest written last inside it: a folder at ``<out>`` is always complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from alignd.train.data import TrainingInputError, write_json_atomic

RUN_FILE = "run.json"
RESULT_DIR = "result"


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class Workspace:
    """The output folder ``out`` of one ``alignd train`` command and its partial folder."""

    def __init__(self, out: str | Path, *, overwrite: bool = False, restart: bool = False) -> None:
        self.out = Path(out).expanduser().absolute()
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.overwrite = overwrite
        self.restart = restart
        self.notes: list[str] = []  # what opening the workspace did (resumed, discarded ...)

    def check_output(self) -> None:
        """Refuse an existing output folder unless ``overwrite`` (before any work is done)."""
        if self.out.exists() and not self.overwrite:
            raise TrainingInputError(f"output folder {self.out} already exists (pass --overwrite to replace it)")
        if self.out.exists() and not self.out.is_dir():
            raise TrainingInputError(f"output path {self.out} exists and is not a folder")

    def open(self, inputs: dict, training: dict, *, training_artefacts: tuple[str, ...] = ()) -> bool:
        """Create or resume the partial folder for a run made from ``inputs`` with ``training`` options
        (both JSON-able). Returns True when earlier work is resumed. Work made from other inputs is an
        error (unless ``restart``); with other training options only ``training_artefacts`` (paths in
        the partial folder) are discarded."""
        record = {"inputs": inputs, "training": training}
        run_file = self.partial / RUN_FILE
        if self.partial.exists() and self.restart:
            shutil.rmtree(self.partial)
            self.notes.append(f"discarded the earlier work in {self.partial} (--restart)")
        resumed = False
        if self.partial.exists():
            try:
                old = json.loads(run_file.read_text())
            except (OSError, json.JSONDecodeError):
                old = None  # a run stopped before it wrote run.json: nothing worth keeping
            if old is None:
                shutil.rmtree(self.partial)
            else:
                changed = _differences(old.get("inputs", {}), inputs)
                if changed:
                    raise TrainingInputError(
                        f"{self.partial} holds work of a run with other inputs ({'; '.join(changed[:3])}): run the "
                        "same command to resume it, or pass --restart to discard it"
                    )
                changed = _differences(old.get("training", {}), training)
                if changed:
                    for name in training_artefacts:
                        shutil.rmtree(self.partial / name, ignore_errors=True)
                    self.notes.append(
                        f"training options changed ({'; '.join(changed[:3])}): kept the data, restarted training"
                    )
                else:
                    self.notes.append(f"resuming the work in {self.partial}")
                resumed = True
        self.partial.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_file, record)
        return resumed

    @property
    def result_dir(self) -> Path:
        return self.partial / RESULT_DIR

    def fresh_result_dir(self) -> Path:
        """An empty folder in which to assemble the finished adapter."""
        shutil.rmtree(self.result_dir, ignore_errors=True)
        self.result_dir.mkdir(parents=True)
        return self.result_dir

    def publish_adapter(self, adapter_dir: Path, manifest: dict, files: tuple[str, ...]) -> Path:
        """Assemble the finished adapter (``files`` of ``adapter_dir`` and the manifest) and publish it."""
        from alignd.train.manifest import write_manifest

        folder = self.fresh_result_dir()
        for name in files:
            shutil.copy2(adapter_dir / name, folder / name)
        write_manifest(folder, manifest)
        return self.publish()

    def publish(self) -> Path:
        """Move the assembled adapter to ``out`` (replacing an old one only with ``overwrite``) and
        remove the partial folder. Returns ``out``."""
        self.check_output()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if self.out.exists():
            old = self.out.with_name(f"{self.out.name}.replaced-{os.getpid()}")
            os.rename(self.out, old)
        os.rename(self.result_dir, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.partial, ignore_errors=True)
        return self.out
