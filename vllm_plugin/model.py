"""The value-guided model class: vLLM's Llama that keeps, for the logits processor, the hidden state of
every row it scores.

``hidden_states`` given to ``compute_logits`` are the final (normed) hidden states of the rows about to
be sampled, exactly the ``h(s)`` the value head reads (``alignd.models.value_head``). Why the kept rows
are the sampled rows when the processor reads them: in vLLM's V1 model runner (``gpu_model_runner.py``,
which ``cpu_model_runner.py`` inherits for this), one engine step runs, in this order and in one
thread of the worker,

1. ``execute_model``: the forward pass, then ``compute_logits(hidden_states[logits_indices])``: one row
   per request of the persistent batch, in batch order (kept here);
2. ``sample_tokens``: the grammar bitmask, then the sampler, which applies the logits processors to
   those logits (the processor reads the rows kept in 1: row i of the logits is row i kept);
3. after sampling, ``_bookkeeping_sync`` -> ``_get_prompt_logprobs_dict``: ``compute_logits`` again on
   the *prompt* hidden states of requests that asked for prompt log-probabilities (overwrites what is
   kept, but the sampler of this step is done, and the next step's 1 overwrites it again before its
   sampler).

``execute_model`` refuses to run while a step's ``sample_tokens`` is pending, so 1 and 2 of two steps
do not interleave, async scheduling included. Warm-up (``_dummy_sampler_run``) calls ``compute_logits``
on random rows and samples them with no logits processor at all. Speculative decoding (rejection
sampling over draft rows) and Model Runner V2 are refused at start.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.utils.torch_utils import set_default_torch_dtype

from alignd.errors import ConfigurationError
from alignd.models.value_head import CONFIG_HEAD_KEY, VALUE_GUIDED_ARCHITECTURE, LoadedValueHead, load_value_head
from alignd.vllm_plugin.scoring import NEEDS_V1_RUNNER, ValueGuidedScoring, register_scoring


def refuse_unsupported_engines(vllm_config: VllmConfig) -> None:
    """The engine settings under which the kept rows would not be the sampled rows, refused by name."""
    if getattr(vllm_config, "use_v2_model_runner", False):
        raise ConfigurationError(NEEDS_V1_RUNNER)
    if vllm_config.speculative_config is not None:
        # vLLM then samples draft rows with its rejection sampler and loads no plugin logits processor
        raise ConfigurationError("alignd's value-guided model does not run with speculative decoding: "
                                 "start the engine without a speculative config")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        # the candidates' embeddings are read from the full embedding table of one worker
        raise ConfigurationError(
            "alignd's value-guided model runs on one device per engine (tensor_parallel_size and "
            f"pipeline_parallel_size 1; got {parallel.tensor_parallel_size} and {parallel.pipeline_parallel_size})")


def load_head_for(vllm_config: VllmConfig) -> LoadedValueHead:
    """The head the served folder's config.json names, checked against the served model: a head made for
    another vocabulary or hidden size is refused, naming both."""
    model_config = vllm_config.model_config
    config = model_config.hf_config
    head_dir = getattr(config, CONFIG_HEAD_KEY, None)
    if not head_dir:
        raise ConfigurationError(
            f"{model_config.model}: its config.json names {VALUE_GUIDED_ARCHITECTURE} but no value head "
            f"({CONFIG_HEAD_KEY}); prepare the folder with alignd.models.value_head.prepare_value_guided_folder")
    # vLLM builds the model under the serving dtype (often bfloat16); the head's numbers stay float32.
    with set_default_torch_dtype(torch.float32):
        return load_value_head(head_dir, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                               base_name=str(model_config.model))


class AligndValueGuidedLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama plus alignd's value head (named by ``alignd_value_head`` in the model's config.json;
    see ``prepare_value_guided_folder``). Requests that do not ask for the head decode as plain Llama."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        refuse_unsupported_engines(vllm_config)
        loaded = load_head_for(vllm_config)  # before the weights: a wrong head fails the start at once
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        embed_tokens = self.model.embed_tokens
        head = loaded.head.to(device=embed_tokens.weight.device, dtype=torch.float32).eval()
        # A plain attribute, not a submodule: vLLM's weight loader checks every parameter of the module
        # tree against the checkpoint, and the head's weights are not in it.
        self.alignd_scoring = ValueGuidedScoring(head=head, embed_tokens=embed_tokens, reward=loaded.reward)
        register_scoring(vllm_config, self.alignd_scoring)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        # Kept by reference (no copy): read by the logits processor within this step (module docstring).
        self.alignd_scoring.hidden_states = hidden_states
        return super().compute_logits(hidden_states)


if AligndValueGuidedLlamaForCausalLM.__name__ != VALUE_GUIDED_ARCHITECTURE:  # the registry finds it by this name
    raise ImportError(f"the value-guided class must be named {VALUE_GUIDED_ARCHITECTURE}")
