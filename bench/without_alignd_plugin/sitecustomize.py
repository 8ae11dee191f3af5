"""Hides alignd's vLLM entry points from every Python process started with this folder first on
``PYTHONPATH`` (``bench/plugin_overhead.py``'s "without" side): vLLM then starts as in an environment
where alignd is not installed, while everything else (vLLM, torch, the model) is the same installation.

vLLM loads ``vllm.logits_processors`` entry points with no switch to leave one out (``VLLM_PLUGINS``
filters ``vllm.general_plugins`` only), and a second virtual environment without alignd would differ in
more than the plugin; so this stand-in, which exists for that benchmark only, filters
``importlib.metadata.entry_points``. vLLM's engine-core processes inherit the environment, so they see
the same filter. Python imports ``sitecustomize`` once at start-up, from the first folder on the path
that has one.
"""

from __future__ import annotations

import importlib.metadata as _metadata

HIDDEN_GROUPS = ("vllm.general_plugins", "vllm.logits_processors")
_entry_points = _metadata.entry_points


def _entry_points_without_alignd(**params):
    found = _entry_points(**params)
    if params.get("group") in HIDDEN_GROUPS:
        return _metadata.EntryPoints(ep for ep in found if not ep.value.startswith("alignd."))
    return found


_metadata.entry_points = _entry_points_without_alignd
