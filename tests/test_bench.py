"""Smoke runs of the benchmark scripts: they run end to end on the real engines and report well-formed,
sane numbers. Nothing here judges the speed (the full runs in docs/BENCHMARKS.md do).

The TQ* benchmark runs in process on the session's vLLM engine; the serving benchmark points its load
generator at the session's alignd server and starts only `vllm serve` (early, so that it boots while the
other test runs).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pytest
from support import load_bench  # a bench/ script as a module (bench/ is not a package)

from alignd.settings import Settings

MIN_FREE_GIB_FOR_VLLM_SERVE = 5.0


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return math.inf


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module", autouse=True)
def vllm_serve(embedded_model_dir, cache_dir, tmp_path_factory):
    """`vllm serve` with alignd's engine settings, started when this module begins (not waited for)."""
    if available_gib() < MIN_FREE_GIB_FOR_VLLM_SERVE:
        yield None
        return
    serve_overhead = load_bench("serve_overhead")
    settings = Settings(cache_dir=cache_dir)
    proc = serve_overhead.start_vllm_server(
        str(embedded_model_dir), settings, settings.cpu_kvcache_space_gib, tmp_path_factory.mktemp("vllm-serve")
    )
    try:
        yield proc
    finally:
        proc.stop()


@pytest.mark.vllm
def test_tq_speed_smoke_on_the_session_engine(vllm_engine, embedded_settings, loop_thread):
    tq_speed = load_bench("tq_speed")
    # no pruning: every decision rolls out, so each row has rollouts to measure
    cfg = tq_speed.BenchConfig(**{**asdict(tq_speed.BenchConfig()), **tq_speed.SMOKE, "reference_prompts": 0,
                                  "prune": False})
    results = loop_thread.run(tq_speed.run_all(vllm_engine, embedded_settings, cfg), timeout=300)

    assert "rollouts" not in vars(vllm_engine)  # the tracker unwrapped the shared engine
    rows = results["sweep"]
    assert [r["concurrency"] for r in rows] == cfg.concurrency
    for r in rows:
        assert 0 < r["output_tokens"] <= r["concurrency"] * cfg.max_tokens
        for key in ("seconds", "tokens_per_s", "decisions", "rollout_decisions", "rollouts", "rollout_tokens",
                    "rollout_tokens_per_s", "batch", "nominal_batch", "capacity_tokens_per_s", "rollout_efficiency",
                    "rollout_duty", "efficiency_while_rolling_out"):
            assert finite_positive(r[key]), (key, r[key])
        assert -1.0 <= r["mean_reward"] <= 1.0  # positivity (VADER compound)
        assert r["rollout_tokens_tracked"] == r["rollout_tokens"]  # tracker and diagnostics agree
        assert r["rollouts"] <= r["rollout_decisions"] * cfg.top_k
        assert r["rollout_tokens"] <= r["rollouts"] * cfg.rollout_len
        assert 0 < r["rollout_duty"] <= 1.0
        assert r["rollout_efficiency"] == pytest.approx(r["rollout_duty"] * r["efficiency_while_rolling_out"])
        assert r["vs_reference"] is None
    assert results["reference"] is None
    for batch, cap in results["capacity"].items():
        assert cap["batch"] == batch and finite_positive(cap["tokens_per_s"]) and 0 < cap["full_length"] <= 1
    assert [v["variant"] for v in results["variants"]] == list(tq_speed.VARIANTS)
    for v in results["variants"]:
        assert finite_positive(v["tokens_per_s"]) and v["rollout_tokens_per_output_token"] >= 0
    table = tq_speed.report(results)
    assert "rollout efficiency" in table and "| TQ* block 4 |" in table


@pytest.mark.server
def test_serve_overhead_smoke_against_the_session_server(vllm_serve, server, tmp_path):
    if vllm_serve is None:
        pytest.skip(f"less than {MIN_FREE_GIB_FOR_VLLM_SERVE} GiB of memory available for `vllm serve`")
    serve_overhead = load_bench("serve_overhead")
    vllm_serve.wait_ready()
    out = tmp_path / "summary.json"
    summary = serve_overhead.main([
        "--smoke", "--warmup-prompts", "0", "--alignd-url", server.base_url, "--vllm-url", vllm_serve.base_url,
        "--work-dir", str(tmp_path), "--out", str(out),
    ])

    assert out.is_file()
    setup = summary["setup"]
    assert setup["alignd_url_given"] and setup["rounds"] == 1
    for side in ("alignd", "vllm"):
        s = summary["sides"][side]
        assert s["rounds"] == 1
        for key in serve_overhead.METRICS:
            assert finite_positive(s[key]), (side, key, s[key])
        assert 0 < s["mean_output_tokens"] <= setup["output_len"]
        run = summary["runs"][side][0]
        assert run["completed"] == setup["num_prompts"]
    cmp = summary["comparison"]
    for key in ("request_throughput_ratio", "output_throughput_ratio"):
        assert finite_positive(cmp[key])
    assert math.isfinite(cmp["median_ttft_ms_diff"]) and math.isfinite(cmp["median_itl_ms_diff"])
    assert isinstance(cmp["throughput_target_met"], bool) and isinstance(cmp["ttft_target_met"], bool)
