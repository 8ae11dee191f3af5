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

import json
from pathlib import Path

import torch
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.utils import maybe_prefix
from vllm.utils.torch_utils import set_default_torch_dtype

from alignd.errors import ConfigurationError
from alignd.models.baseline_stack import BASELINE_PREFIX, CONFIG_BASELINE_KEY, BaselineStack, check_stacks_match
from alignd.models.value_head import CONFIG_HEAD_KEY, VALUE_GUIDED_ARCHITECTURE, LoadedValueHead, load_value_head
from alignd.vllm_plugin.scoring import NEEDS_V1_RUNNER, BaselineScoring, ValueGuidedScoring, register_scoring


def refuse_unsupported_engines(vllm_config: VllmConfig) -> None:
    """The engine settings under which the kept rows would not be the sampled rows, refused by name."""
    if getattr(vllm_config, "use_v2_model_runner", False):
        raise ConfigurationError(NEEDS_V1_RUNNER)
    if vllm_config.speculative_config is not None:
        # vLLM then samples draft rows with its rejection sampler and loads no plugin logits processor
        raise ConfigurationError(
            "alignd's value-guided model does not run with speculative decoding: "
            "start the engine without a speculative config"
        )
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        # the candidates' embeddings are read from the full embedding table of one worker
        raise ConfigurationError(
            "alignd's value-guided model runs on one device per engine (tensor_parallel_size and "
            f"pipeline_parallel_size 1; got {parallel.tensor_parallel_size} and {parallel.pipeline_parallel_size})"
        )


def load_head_for(vllm_config: VllmConfig) -> LoadedValueHead:
    """The head the served folder's config.json names, checked against the served model: a head made for
    another vocabulary or hidden size is refused, naming both."""
    model_config = vllm_config.model_config
    config = model_config.hf_config
    head_dir = getattr(config, CONFIG_HEAD_KEY, None)
    if not head_dir:
        raise ConfigurationError(
            f"{model_config.model}: its config.json names {VALUE_GUIDED_ARCHITECTURE} but no value head "
            f"({CONFIG_HEAD_KEY}); prepare the folder with alignd.models.value_head.prepare_value_guided_folder"
        )
    # vLLM builds the model under the serving dtype (often bfloat16); the head's numbers stay float32.
    with set_default_torch_dtype(torch.float32):
        return load_value_head(
            head_dir, vocab_size=config.vocab_size, hidden_size=config.hidden_size, base_name=str(model_config.model)
        )


def baseline_stack_for(vllm_config: VllmConfig) -> BaselineStack | None:
    """The baseline stack the served folder's config.json names (None: none), checked against the model."""
    model_config = vllm_config.model_config
    entry = getattr(model_config.hf_config, CONFIG_BASELINE_KEY, None)
    if entry is None:
        return None
    stack = BaselineStack.from_config(entry, model=str(model_config.model))
    # the base model's own config (the served one names alignd's class): the folder it was prepared from
    config = model_config.hf_config.to_dict()
    base = Path(str(config.get("alignd_base_model") or "")) / "config.json"
    sft_config = (
        json.loads(base.read_text()) if base.is_file() else {k: v for k, v in config.items() if k != "architectures"}
    )
    check_stacks_match(sft_config, stack.path, sft_name=str(model_config.model))
    return stack


class AligndValueGuidedLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama plus alignd's value head (named by ``alignd_value_head`` in the model's config.json) and/or
    a baseline's decoder stack (``alignd_baseline``: :mod:`alignd.models.baseline_stack`); see
    ``prepare_value_guided_folder``. Requests that ask for neither decode as plain Llama."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        refuse_unsupported_engines(vllm_config)
        config = vllm_config.model_config.hf_config
        # before the weights: a wrong head or baseline fails the start at once
        loaded = load_head_for(vllm_config) if getattr(config, CONFIG_HEAD_KEY, None) else None
        stack = baseline_stack_for(vllm_config)
        if loaded is None and stack is None:
            load_head_for(vllm_config)  # says what the folder lacks
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        embed_tokens = self.model.embed_tokens
        head = None if loaded is None else loaded.head.to(device=embed_tokens.weight.device, dtype=torch.float32).eval()
        # A plain attribute, not a submodule: vLLM's weight loader checks every parameter of the module
        # tree against the checkpoint, and the head's weights are not in it.
        self.alignd_scoring = ValueGuidedScoring(
            head=head, embed_tokens=embed_tokens, reward=None if loaded is None else loaded.reward
        )
        self.alignd_baseline: LlamaForCausalLM | None = None
        if stack is not None:
            # A submodule: its attention layers get KV caches of their own (vLLM caches every layer a model
            # registers), and its tensors come from the merged baseline's folder under its prefix (vLLM's
            # loader reads ``secondary_weights`` after the served folder's, and checks every parameter).
            self.alignd_baseline = LlamaForCausalLM(
                vllm_config=vllm_config, prefix=maybe_prefix(prefix, BASELINE_PREFIX)
            )
            self.secondary_weights = [DefaultModelLoader.Source(stack.path, None, prefix=f"{BASELINE_PREFIX}.")]
            self.alignd_scoring.baseline = BaselineScoring(stack.beta, self.alignd_baseline, stack.skip_unasked)
        register_scoring(vllm_config, self.alignd_scoring)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        hidden = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        baseline = self.alignd_scoring.baseline
        if baseline is None or not baseline.runs_this_step():
            return hidden
        # Both stacks' final hidden states side by side: the runner only selects rows of what forward returns
        # before compute_logits (gpu_model_runner.py: hidden_states[logits_indices], the prompt-logprob
        # rows, the warm-up's rows), which splits them again.
        baseline_hidden = baseline.module.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        return torch.cat([hidden, baseline_hidden], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        size = self.config.hidden_size
        baseline = self.alignd_scoring.baseline
        if baseline is not None:
            # [rows, 2 x hidden] where the baseline stack ran this step; its half kept for the processor
            baseline.hidden_states = hidden_states[:, size:] if hidden_states.shape[-1] == 2 * size else None
            hidden_states = hidden_states[:, :size]
        # Kept by reference (no copy): read by the logits processor within this step (module docstring).
        self.alignd_scoring.hidden_states = hidden_states
        return super().compute_logits(hidden_states)


if AligndValueGuidedLlamaForCausalLM.__name__ != VALUE_GUIDED_ARCHITECTURE:  # the registry finds it by this name
    raise ImportError(f"the value-guided class must be named {VALUE_GUIDED_ARCHITECTURE}")
