"""A learned value head: ``Q(s, z)`` for the SFT model's candidate tokens, read off the SFT model itself.

Transfer Q* (ALGORITHMS.md) scores each top-k candidate ``z`` at state ``s`` with ``Q^BL(s, z)``, the
baseline's expected reward after ``z``. Estimated by rollouts, that costs k x L baseline tokens per
output token. The head distils those estimates into a function of two things the SFT engine already
has at its decode step, so that no second model runs:

    h(s)   the SFT model's final (normalised) hidden state at ``s``: the row its ``compute_logits`` reads
    e(z)   the SFT model's input embedding of the candidate token ``z``

    Q(s, z) = w . gelu(W_s LN(h(s)) + W_z LN(e(z)) + b) + c

(``LN`` is a layer norm without parameters, so the head does not depend on the scale of either input.)
It is small (2 x hidden x rank + rank + 1 numbers: 74k for SmolLM2-135M at rank 64) and is applied to
the k candidates of the rows that ask for it only.

A head is a folder: ``value_head.safetensors`` (the tensors) and ``alignd_value_head.json`` (the
manifest: the head's shape, the base model it reads and a digest of its weights, the baseline and
reward its targets came from, the data, the metrics and the exact command). :func:`load_value_head`
refuses a head made for another base model, vocabulary or hidden size, naming both sides.

This module is imported inside vLLM's worker processes (``alignd.vllm_plugin``): keep it to torch,
json and safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from alignd.errors import ConfigurationError
from alignd.models.baseline_stack import CONFIG_BASELINE_KEY, BaselineStack, check_stacks_match

HEAD_WEIGHTS = "value_head.safetensors"
HEAD_MANIFEST = "alignd_value_head.json"
HEAD_FORMAT = "alignd-value-head/1"
HEAD_ARCHITECTURE = "additive-mlp"

# The model class alignd's vLLM plugin registers: a folder whose config.json names it (and points at a
# head with ``alignd_value_head``) is served value-guided; every other model is untouched.
VALUE_GUIDED_ARCHITECTURE = "AligndValueGuidedLlamaForCausalLM"
CONFIG_HEAD_KEY = "alignd_value_head"

# Request keys (vLLM's ``SamplingParams.extra_args``, ``vllm_xargs`` over HTTP).
ALPHA_KEY = "alignd_alpha"
TOP_K_KEY = "alignd_top_k"
MAX_TOP_K = 64


@dataclass(frozen=True)
class ValueHeadConfig:
    hidden_size: int
    vocab_size: int
    rank: int = 64
    architecture: str = HEAD_ARCHITECTURE


class ValueHead(nn.Module):
    """``Q(s, z)`` from ``h(s)`` and ``e(z)``; see the module docstring."""

    def __init__(self, config: ValueHeadConfig) -> None:
        super().__init__()
        if config.architecture != HEAD_ARCHITECTURE:
            raise ConfigurationError(
                f"unknown value-head architecture {config.architecture!r} (this alignd knows {HEAD_ARCHITECTURE!r})"
            )
        self.config = config
        self.state = nn.Linear(config.hidden_size, config.rank)
        self.token = nn.Linear(config.hidden_size, config.rank, bias=False)
        self.out = nn.Linear(config.rank, 1)

    def forward(self, hidden: torch.Tensor, candidate_embeddings: torch.Tensor) -> torch.Tensor:
        """``hidden`` [N, d], ``candidate_embeddings`` [N, k, d] -> values [N, k] (float32)."""
        d = self.config.hidden_size
        h = F.layer_norm(hidden.float(), (d,))
        e = F.layer_norm(candidate_embeddings.float(), (d,))
        mixed = F.gelu(self.state(h).unsqueeze(1) + self.token(e))
        return self.out(mixed).squeeze(-1)


@dataclass
class LoadedValueHead:
    head: ValueHead
    manifest: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def reward(self) -> str | None:
        return self.manifest.get("reward")


def save_value_head(head: ValueHead, folder: str | Path, manifest: dict) -> Path:
    """Write ``head`` and its manifest to ``folder`` (the manifest's shape fields are filled in here).
    The weights go first and the manifest last, so a folder with a manifest is complete."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / HEAD_MANIFEST).unlink(missing_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in head.state_dict().items()}
    save_file(state, str(out / HEAD_WEIGHTS))
    full = {
        "format": HEAD_FORMAT,
        **manifest,
        "head": {
            "architecture": head.config.architecture,
            "hidden_size": head.config.hidden_size,
            "vocab_size": head.config.vocab_size,
            "rank": head.config.rank,
        },
    }
    (out / HEAD_MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
    return out


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder).expanduser() / HEAD_MANIFEST
    if not path.is_file():
        raise ConfigurationError(
            f"{Path(folder)} is not a value head (no {HEAD_MANIFEST} in it; make one with `alignd train value-head`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"unreadable value-head manifest {path}: {exc}") from None
    if manifest.get("format") != HEAD_FORMAT:
        raise ConfigurationError(f"{path} has format {manifest.get('format')!r}; this alignd reads {HEAD_FORMAT!r}")
    return manifest


def load_value_head(
    folder: str | Path,
    *,
    vocab_size: int | None = None,
    hidden_size: int | None = None,
    base_weights_digest: str | None = None,
    base_name: str | None = None,
) -> LoadedValueHead:
    """Read the head in ``folder`` and check it against the model that will run it: the vocabulary,
    the hidden size and (when given) the digest of the base weights must be the ones it was made for.
    Each refusal names both sides."""
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    shape = manifest.get("head") or {}
    config = ValueHeadConfig(
        hidden_size=int(shape["hidden_size"]),
        vocab_size=int(shape["vocab_size"]),
        rank=int(shape["rank"]),
        architecture=shape.get("architecture", HEAD_ARCHITECTURE),
    )
    made_for = (manifest.get("base_model") or {}).get("name") or "its base model"
    serving = base_name or "this model"
    if vocab_size is not None and vocab_size != config.vocab_size:
        raise ConfigurationError(
            f"value head {folder} was made for '{made_for}' (vocabulary of {config.vocab_size} tokens), "
            f"but '{serving}' has {vocab_size}: train a head for this model with `alignd train value-head`"
        )
    if hidden_size is not None and hidden_size != config.hidden_size:
        raise ConfigurationError(
            f"value head {folder} was made for '{made_for}' (hidden size {config.hidden_size}), "
            f"but '{serving}' has hidden size {hidden_size}: train a head for this model"
        )
    expected = (manifest.get("base_model") or {}).get("weights_digest")
    if base_weights_digest is not None and expected and expected != base_weights_digest:
        raise ConfigurationError(
            f"value head {folder} was made for '{made_for}' (weights {expected[:12]}), but '{serving}' has "
            f"weights {base_weights_digest[:12]}: train a head for this model, or serve the model it was made for"
        )
    from safetensors.torch import load_file

    weights = folder / HEAD_WEIGHTS
    if not weights.is_file():
        raise ConfigurationError(f"value head {folder} has no {HEAD_WEIGHTS}")
    head = ValueHead(config)
    try:
        head.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    except RuntimeError as exc:
        raise ConfigurationError(f"value head {folder}: weights do not match its manifest ({exc})") from None
    head.eval()
    return LoadedValueHead(head=head, manifest=manifest, path=folder)


# ---------------------------------------------------------------------------- a folder vLLM serves value-guided
VALUE_GUIDED_MARKER = "alignd_value_guided.json"
VALUE_GUIDED_FORMAT = "alignd-value-guided/1"
# vLLM model classes alignd's value-guided class extends (alignd.vllm_plugin.model subclasses vLLM's Llama)
VALUE_GUIDED_BASE_ARCHITECTURES = ("LlamaForCausalLM",)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folder_is(folder: Path, marker: dict) -> bool:
    """``folder`` is a complete value-guided folder made for exactly ``marker`` (the marker is written
    last, and the folder appears under its name only once complete)."""
    try:
        return (folder / "config.json").is_file() and json.loads((folder / VALUE_GUIDED_MARKER).read_text()) == marker
    except (OSError, json.JSONDecodeError):
        return False


def _base_config(base: Path) -> tuple[Path, dict]:
    """The path and contents of ``base``'s config.json, checked to be a model alignd's value-guided class
    extends (and not a value-guided folder already)."""
    config_path = base / "config.json"
    if not config_path.is_file():
        raise ConfigurationError(f"{base} is not a model folder (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"unreadable model config {config_path}: {exc}") from None
    architectures = list(config.get("architectures") or [])
    if architectures == [VALUE_GUIDED_ARCHITECTURE]:
        raise ConfigurationError(
            f"{base} is already a value-guided folder; prepare one from its base model "
            f"({config.get('alignd_base_model', 'named in its config.json')})"
        )
    if not architectures or not set(architectures) <= set(VALUE_GUIDED_BASE_ARCHITECTURES):
        raise ConfigurationError(
            f"{base} is a {architectures or 'model of unknown architecture'}; alignd's value head "
            f"runs inside vLLM for {', '.join(VALUE_GUIDED_BASE_ARCHITECTURES)} models only"
        )
    return config_path, config


def _check_guidance(
    base: Path, config: dict, head_path: Path | None, baseline: BaselineStack | None, base_weights_digest: str | None
) -> None:
    """There is a head or a baseline stack, and each is the base model's (a mismatch names both)."""
    if head_path is None and baseline is None:
        raise ConfigurationError("a value-guided folder needs a value head, a baseline stack, or both")
    if head_path is not None:
        load_value_head(
            head_path,
            vocab_size=config.get("vocab_size"),
            hidden_size=config.get("hidden_size"),
            base_weights_digest=base_weights_digest,
            base_name=str(base),
        )
    if baseline is not None:
        check_stacks_match(config, baseline.path, sft_name=str(base))


def _value_guided_marker(base: Path, config_path: Path, head_path: Path | None, baseline: BaselineStack | None) -> dict:
    """What a value-guided folder is made from: the base model's files it links (``linked``), digests of
    the configs and of the head's manifest. A folder whose marker equals it needs no rebuilding."""
    linked = sorted(
        entry.name
        for entry in base.iterdir()
        if entry.name not in ("config.json", VALUE_GUIDED_MARKER) and not entry.name.startswith(".")
    )
    return {
        "format": VALUE_GUIDED_FORMAT,
        "base_model": str(base),
        "base_config_sha256": _sha256(config_path),
        "linked": linked,
        "value_head": str(head_path) if head_path is not None else None,
        "value_head_manifest_sha256": _sha256(head_path / HEAD_MANIFEST) if head_path is not None else None,
        **(
            {"baseline": baseline.to_config(), "baseline_config_sha256": _sha256(Path(baseline.path) / "config.json")}
            if baseline is not None
            else {}
        ),
    }


def _build_in_place(
    out: Path, base: Path, config: dict, head_path: Path | None, baseline: BaselineStack | None, marker: dict
) -> Path:
    """Build the folder ``marker`` describes under a temporary name beside ``out``, then rename it to
    ``out`` (replacing a stale one), so that a folder under ``out``'s name is always complete."""
    import os
    import shutil
    import uuid

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        for name in marker["linked"]:
            (staging / name).symlink_to(base / name, target_is_directory=(base / name).is_dir())
        served = {**config, "architectures": [VALUE_GUIDED_ARCHITECTURE], "alignd_base_model": str(base)}
        if head_path is not None:
            served[CONFIG_HEAD_KEY] = str(head_path)
        if baseline is not None:
            served[CONFIG_BASELINE_KEY] = baseline.to_config()
        (staging / "config.json").write_text(json.dumps(served, indent=2) + "\n")
        (staging / VALUE_GUIDED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.rename(staging, out)  # atomic; fails when out exists (stale, or made concurrently)
        except OSError:
            if _folder_is(out, marker):  # another process made the same folder meanwhile
                shutil.rmtree(staging)
                return out
            retired = out.parent / f".{out.name}.retired-{uuid.uuid4().hex[:12]}"
            os.rename(out, retired)
            os.rename(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def prepare_value_guided_folder(
    base_model_dir: str | Path,
    head_dir: str | Path | None,
    out_dir: str | Path,
    *,
    base_weights_digest: str | None = None,
    baseline: BaselineStack | None = None,
) -> Path:
    """A model folder that vLLM (alignd's engine, or a stock ``vllm serve`` with alignd installed)
    serves with the value head in its decode step; returns ``out_dir``.

    It holds links to every file of ``base_model_dir`` (weights, tokenizer, generation config: nothing is
    copied) and its own ``config.json``: the base one with ``architectures`` = alignd's value-guided
    class and ``alignd_value_head`` = the head's absolute path (the head is read from there at every
    engine start, so retraining it in place needs no new folder). The head is checked against the base
    model first (vocabulary, hidden size and, when ``base_weights_digest`` is given, the weights its
    manifest names); a mismatch is refused naming both.

    Idempotent: a folder already made from the same base files and head is returned as it is. The
    folder is built under a temporary name beside ``out_dir`` and renamed into place, so a folder under
    ``out_dir``'s name is always complete. An existing ``out_dir`` that alignd did not prepare is never
    replaced.

    ``baseline`` adds a baseline's decoder stack (:mod:`alignd.models.baseline_stack`: TQ* with its implicit
    Q in the same step), checked to match the base model; ``head_dir`` may then be None (a folder with a
    baseline stack and no head)."""
    base = Path(base_model_dir).expanduser().resolve()
    head_path = Path(head_dir).expanduser().resolve() if head_dir is not None else None
    out = Path(out_dir).expanduser().absolute()
    config_path, config = _base_config(base)
    _check_guidance(base, config, head_path, baseline, base_weights_digest)
    marker = _value_guided_marker(base, config_path, head_path, baseline)
    if _folder_is(out, marker):
        return out
    if out.exists() and not (out / VALUE_GUIDED_MARKER).is_file():
        raise ConfigurationError(f"{out} exists and is not a value-guided folder alignd prepared: not replacing it")
    return _build_in_place(out, base, config, head_path, baseline, marker)
