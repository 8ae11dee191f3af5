"""What the value-guided model hands to the logits processor of the same vLLM worker.

vLLM's logits processors see logits only; TQ* with a value head also needs each row's hidden state
(and the candidates' input embeddings). The model class (:mod:`alignd.vllm_plugin.model`) keeps, at
every ``compute_logits``, the hidden states of the rows it scores in a :class:`ValueGuidedScoring`, and
registers that object here under its engine's id; the processor, built by the model runner before
the model exists, finds it on first use. Both run in the same worker process, in one thread.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from alignd.models.value_head import ValueHead

# Said by the model and the processor when they find themselves under Model Runner V2 (the default of
# vLLM's recent GPU builds): V2 has its own logits-processor interface, applies custom processors after
# the penalties, and its row bookkeeping differs; the plugin is written and tested for V1.
NEEDS_V1_RUNNER = (
    "alignd's value-guided model runs in vLLM's V1 model runner only, and this engine uses Model Runner V2: "
    "start it with the environment variable VLLM_USE_V2_MODEL_RUNNER=0"
)


@dataclass(eq=False)
class BaselineScoring:
    """The baseline's decoder stack (``alignd.models.baseline_stack``) and its hidden states of the rows last
    scored; whether a row of the current batch asks for it (set by the processor before the forward)."""

    beta: float
    module: nn.Module  # vLLM's LlamaForCausalLM of the baseline (a submodule of the served model)
    skip_unasked: bool = False
    asked: bool = False
    hidden_states: torch.Tensor | None = None

    def runs_this_step(self) -> bool:
        return self.asked or not self.skip_unasked

    def logprobs(self, rows: torch.Tensor) -> torch.Tensor:
        """The baseline's log-probabilities at the batch rows ``rows`` [n] -> [n, vocab] float32."""
        hidden = self.hidden_states
        if hidden is None:
            raise RuntimeError("alignd baseline stack: it did not run in this step, though a row asks for it")
        logits = self.module.compute_logits(hidden.index_select(0, rows))
        return torch.log_softmax(logits.float(), dim=-1)


@dataclass(eq=False)
class ValueGuidedScoring:
    """The head, the model's input embedding and the hidden states of the rows last scored; the baseline
    stack where the folder has one."""

    head: ValueHead | None
    embed_tokens: nn.Module  # the model's own (its ``weight`` is read: [vocab (padded), hidden])
    reward: str | None = None  # the reward the head was trained for (its manifest)
    # The rows of the latest compute_logits: set by the model, read by the processor in the same step.
    hidden_states: torch.Tensor | None = None
    baseline: BaselineScoring | None = None

    def values(self, rows: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        """Q of ``candidate_ids`` [n, k] at the batch rows ``rows`` [n] -> [n, k] float32."""
        hidden = self.hidden_states
        if self.head is None:
            raise RuntimeError("alignd value head: this model has no value head (its folder has a baseline stack only)")
        if hidden is None:
            raise RuntimeError(
                "alignd value head: no hidden states were kept before sampling "
                "(the model's compute_logits did not run in this step)"
            )
        embeddings = F.embedding(candidate_ids, self.embed_tokens.weight)
        return self.head(hidden.index_select(0, rows), embeddings)


# Engine id -> its model's scoring. Weak: the model owns it, and an engine shut down in this process
# (vLLM's in-process mode) leaves nothing behind.
_BY_ENGINE: weakref.WeakValueDictionary[str, ValueGuidedScoring] = weakref.WeakValueDictionary()


def _engine_key(vllm_config: VllmConfig) -> str:
    # The model and the processor get the same config (the worker's); its instance id names the engine
    # even if one of them was handed a copy.
    return vllm_config.instance_id or f"config-{id(vllm_config)}"


def register_scoring(vllm_config: VllmConfig, scoring: ValueGuidedScoring) -> None:
    _BY_ENGINE[_engine_key(vllm_config)] = scoring


def find_scoring(vllm_config: VllmConfig) -> ValueGuidedScoring | None:
    return _BY_ENGINE.get(_engine_key(vllm_config))
