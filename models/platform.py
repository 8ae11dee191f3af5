"""What the machine can run fast: the engine dtype.

vLLM's CPU backend computes bfloat16 matrix products with native kernels only where the CPU has them
(AVX-512 BF16, or AMX). Elsewhere (AVX2-only CPUs, common among cloud AMD EPYC machines) they are
emulated and decoding runs about 3x slower than in float32 (prompt log-probabilities 6x slower), so
``dtype=auto`` picks float32 there. On a GPU, bfloat16.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

# /proc/cpuinfo flags of CPUs with native bfloat16 matrix kernels
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86, Arm
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return bool(NATIVE_BF16_FLAGS & cpu_flags())


def engine_dtype(requested: str) -> str:
    """The dtype a vLLM engine is started with: ``requested`` unless it is ``auto``."""
    if requested != "auto":
        return requested
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or cpu_has_native_bf16():
        return "bfloat16"
    return "float32"
