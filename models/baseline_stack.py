"""A baseline's decoder stack beside the SFT model's, in the folder alignd's vLLM plugin serves: TQ* with the
baseline's exact implicit Q inside vLLM's decode step (``alignd_value: "implicit"``).

For a policy trained by DPO (or IRFT) from the SFT model with coefficient beta, ``beta * (log pi_BL(z|s) -
log pi_SFT(z|s))`` is its token-level Q up to a V(s) that cancels over the candidates. The value-guided
model class (:mod:`alignd.vllm_plugin.model`) runs both stacks on the same tokens in one engine step (vLLM
gives every attention layer the model registers a KV cache: both stacks are cached) and the logits
processor applies the rule to the rows that ask, so one answer is one engine request.

The folder's ``config.json`` names the baseline under ``alignd_baseline``: the merged model folder (its
tensors are loaded under the ``alignd_baseline.`` prefix, nothing is copied), its beta, and whether the
stack may be skipped in steps where no row asks for it (alignd's own engine: its implicit requests carry a
``cache_salt`` of their own, so no other request's cached blocks, which lack the baseline's KV, are ever
read for them; a stock ``vllm serve`` folder runs both stacks always, since its clients need not salt).

This module is imported inside vLLM's worker processes (``alignd.vllm_plugin``): keep it to json.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from alignd.errors import ConfigurationError

CONFIG_BASELINE_KEY = "alignd_baseline"
BASELINE_PREFIX = "alignd_baseline"
# Request keys (``SamplingParams.extra_args``): which value source a value-guided request uses ("head", the
# default where alpha is sent without it, or "implicit"); TQ*'s alpha and top_k are value_head's keys.
VALUE_KEY = "alignd_value"
HEAD = "head"
IMPLICIT = "implicit"
# The training methods whose policy's log-ratio to the SFT model is beta times its token-level Q.
IMPLICIT_KINDS = ("dpo", "irft")
# The cache salt alignd sends with every implicit request (see the module docstring).
IMPLICIT_CACHE_SALT = "alignd-implicit"
# What the two stacks must share for their log-probabilities to be over the same tokens and positions.
MATCHING_FIELDS = (
    "architectures",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "tie_word_embeddings",
)


@dataclass(frozen=True)
class BaselineStack:
    """The baseline stack a value-guided folder names."""

    path: str  # the merged baseline's model folder (absolute)
    beta: float  # its implicit Q's scale (the adapter manifest's)
    name: str  # how messages name it (the adapter's folder or name)
    skip_unasked: bool = False  # skip the stack in steps where no row asks for it (module docstring)

    def to_config(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, entry: Any, *, model: str) -> BaselineStack:
        if not isinstance(entry, Mapping) or not {"path", "beta"} <= set(entry):
            raise ConfigurationError(
                f"{model}: its config.json's {CONFIG_BASELINE_KEY} must name the baseline's "
                "'path' and 'beta'; prepare the folder with prepare_value_guided_folder"
            )
        beta = float(entry["beta"])
        if not beta > 0:
            raise ConfigurationError(f"{model}: the baseline stack's beta must be > 0, got {beta}")
        return cls(
            path=str(entry["path"]),
            beta=beta,
            name=str(entry.get("name") or entry["path"]),
            skip_unasked=bool(entry.get("skip_unasked", False)),
        )


def check_stacks_match(sft_config: Mapping[str, Any], baseline_dir: str | Path, *, sft_name: str) -> None:
    """A baseline whose architecture, vocabulary or shape differ from the SFT model's is refused, naming both."""
    path = Path(baseline_dir) / "config.json"
    if not path.is_file():
        raise ConfigurationError(f"baseline stack {baseline_dir} is not a model folder (no config.json)")
    baseline = json.loads(path.read_text())
    for field in MATCHING_FIELDS:
        if field in sft_config and sft_config.get(field) != baseline.get(field):
            raise ConfigurationError(
                f"baseline stack {baseline_dir} has {field}={baseline.get(field)!r}, but the SFT model '{sft_name}' "
                f"has {sft_config.get(field)!r}: the baseline must be a fine-tune of this very model (a merged "
                "DPO or IRFT adapter of it)"
            )
