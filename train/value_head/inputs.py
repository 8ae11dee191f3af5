"""The run's inputs checked before any engine starts: the training pool is disjoint from the evaluation
prompts, and the baseline named on the command line is resolved (and its weights identified)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignd.settings import NO_ADAPTER, Settings
from alignd.train.data import PromptRecord, TrainingInputError, file_sha256, read_prompts


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
