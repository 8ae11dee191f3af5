"""LoRA adapters of the served model (made by ``alignd train``): their manifests, and the checks made
before an adapter is served.

An adapter folder holds PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``, and alignd's
manifest ``alignd_adapter.json`` (what it was trained from: base model and the digest of its weights,
reward, beta, data, metrics, the command). An adapter made for another base model would run on these
weights without complaint and produce nonsense: the digest check refuses it at load, naming both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from alignd.errors import ConfigurationError

MANIFEST = "alignd_adapter.json"
PEFT_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter folder, checked: its path, LoRA rank and alignd manifest (empty for a folder PEFT made
    without alignd)."""

    name: str
    path: Path
    rank: int
    manifest: dict = field(default_factory=dict)

    @property
    def provenance(self) -> dict:
        """What a listing shows: how it was made, from what, and how well it trained."""
        keys = ("kind", "base_model", "reward", "beta", "data", "metrics", "command", "seed", "rounds", "created")
        return {k: self.manifest[k] for k in keys if k in self.manifest}


@lru_cache(maxsize=8)
def _digest(folder: str) -> str:
    from alignd.models.weights import weights_digest

    return weights_digest(folder)


WEIGHTS = "adapter_model.safetensors"


def adapter_modules(folder: Path) -> set[str]:
    """The layer names (last path part: ``q_proj``, ``lm_head``...) an adapter changes, read from its
    tensor names (PEFT's ``target_modules`` may be a regular expression or ``all-linear``; the tensors
    say what it really touches). ``modules_to_save`` copies count as changed layers."""
    from safetensors import safe_open

    modules = set()
    with safe_open(str(folder / WEIGHTS), framework="pt") as tensors:
        for key in tensors.keys():
            parts = key.split(".")
            for marker in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "modules_to_save"):
                if marker in parts:
                    modules.add(parts[parts.index(marker) - 1])
                    break
    return modules


def load_adapter(
    name: str,
    path: str | Path,
    base_model_dir: str | Path,
    *,
    max_rank: int,
    lora_modules: tuple[str, ...] | None = None,
) -> AdapterInfo:
    """Read and check the adapter at ``path`` for the model in ``base_model_dir``: a PEFT LoRA folder,
    of rank at most ``max_rank``, whose manifest (when it has one) names these base weights.
    ``lora_modules``: the layers a LoRA may change in the engine that will run it (None: merged into
    the weights, where any layer may change)."""
    folder = Path(path).expanduser()
    config_file = folder / PEFT_CONFIG
    if not config_file.is_file():
        raise ConfigurationError(f"adapter '{name}': {folder} is not an adapter folder (no {PEFT_CONFIG} in it)")
    try:
        config = json.loads(config_file.read_text())
        manifest = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).is_file() else {}
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"adapter '{name}': unreadable JSON in {folder}: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigurationError(f"adapter '{name}': only LoRA adapters are served, {folder} is {config['peft_type']}")
    rank = int(config.get("r", 0))
    if rank > max_rank:
        raise ConfigurationError(
            f"adapter '{name}' has LoRA rank {rank}, above this server's limit of {max_rank} "
            "(ALIGND_MAX_LORA_RANK: 8, 16, 32 or 64)"
        )
    if not (folder / WEIGHTS).is_file():
        raise ConfigurationError(f"adapter '{name}': {folder} has no {WEIGHTS} (save it with PEFT's safetensors)")
    if lora_modules is not None:
        outside = sorted(adapter_modules(folder) - set(lora_modules))
        if outside:
            raise ConfigurationError(
                f"adapter '{name}' changes {', '.join(outside)}, which a LoRA may not change in this server "
                f"(ALIGND_LORA_TARGET_MODULES: {', '.join(lora_modules)}): serve it with "
                "ALIGND_ADAPTER_SERVING=merged, or train it on those layers"
            )
    base = manifest.get("base_model") or {}
    expected = base.get("weights_digest")
    if expected:
        actual = _digest(str(base_model_dir))
        if actual != expected:
            raise ConfigurationError(
                f"adapter '{name}' ({folder}) was trained on base model '{base.get('name') or base.get('path')}' "
                f"(weights {expected[:12]}), but this server serves '{base_model_dir}' (weights {actual[:12]}): "
                "train the adapter for this model, or serve the model it was made for"
            )
    return AdapterInfo(name=name, path=folder, rank=rank, manifest=manifest)
