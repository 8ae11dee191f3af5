"""The engine dtype follows the CPU: bfloat16 only where the CPU multiplies bfloat16 natively.

The other kind of CPU than the one the tests run on cannot be conjured, so its /proc/cpuinfo flags are
substituted here (the one fake of this file)."""

from __future__ import annotations

import pytest

from alignd.models import platform


@pytest.fixture
def cpu_with(monkeypatch):
    def set_flags(*flags: str) -> None:
        monkeypatch.setattr(platform, "cpu_flags", lambda: frozenset(flags))

    return set_flags


def test_auto_is_float32_on_a_cpu_without_native_bfloat16(cpu_with):
    cpu_with("sse4_2", "avx2", "fma")  # an AVX2-only EPYC
    assert platform.engine_dtype("auto") == "float32"
    cpu_with("avx2", "avx512f", "avx512_bf16")
    assert platform.engine_dtype("auto") == "bfloat16"
    cpu_with("avx2", "amx_bf16", "amx_tile")
    assert platform.engine_dtype("auto") == "bfloat16"


def test_an_explicit_dtype_is_kept(cpu_with):
    cpu_with("avx2")
    assert platform.engine_dtype("bfloat16") == "bfloat16"
    assert platform.engine_dtype("float16") == "float16"


def test_this_machines_flags_are_read():
    flags = platform.cpu_flags()
    assert flags and ("avx2" in flags or "neon" in flags or "asimd" in flags)  # a real x86 or Arm flag list
