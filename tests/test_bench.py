"""Smoke runs of the benchmark scripts: they run end to end on the real engines and report well-formed,
sane numbers. Nothing here judges the speed (the full runs in docs/BENCHMARKS.md do).

The TQ* benchmark runs in process on the session's vLLM engine; the serving benchmark points its load
generator at the session's alignd server and the session's stock `vllm serve` (conftest's `stock_vllm_serve`:
the value-guided folder, where plain requests decode as plain Llama).
"""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
from support import load_bench  # a bench/ script as a module (bench/ is not a package)


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.vllm
def test_tq_speed_smoke_on_the_session_engine(vllm_engine, embedded_settings, loop_thread):
    tq_speed = load_bench("tq_speed")
    # no pruning: every decision rolls out, so each row has rollouts to measure
    cfg = tq_speed.BenchConfig(
        **{**asdict(tq_speed.BenchConfig()), **tq_speed.SMOKE, "reference_prompts": 0, "prune": False}
    )
    results = loop_thread.run(tq_speed.run_all(vllm_engine, embedded_settings, cfg), timeout=300)

    assert "rollouts" not in vars(vllm_engine)  # the tracker unwrapped the shared engine
    rows = results["sweep"]
    assert [r["concurrency"] for r in rows] == cfg.concurrency
    for r in rows:
        assert 0 < r["output_tokens"] <= r["concurrency"] * cfg.max_tokens
        for key in (
            "seconds",
            "tokens_per_s",
            "decisions",
            "rollout_decisions",
            "rollouts",
            "rollout_tokens",
            "rollout_tokens_per_s",
            "batch",
            "nominal_batch",
            "capacity_tokens_per_s",
            "rollout_efficiency",
            "rollout_duty",
            "efficiency_while_rolling_out",
        ):
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
def test_serve_overhead_smoke_against_the_session_server(stock_vllm_serve, server, tmp_path):
    serve_overhead = load_bench("serve_overhead")
    out = tmp_path / "summary.json"
    summary = serve_overhead.main(
        [
            "--smoke",
            "--warmup-prompts",
            "0",
            "--alignd-url",
            server.base_url,
            "--vllm-url",
            stock_vllm_serve.base_url,
            "--work-dir",
            str(tmp_path),
            "--out",
            str(out),
        ]
    )

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


ENTRY_POINTS_SCRIPT = """
import json
from importlib.metadata import entry_points
groups = ("vllm.general_plugins", "vllm.logits_processors")
print(json.dumps({g: [e.value for e in entry_points(group=g)] for g in groups}))
"""


def test_plugin_overhead_without_side_hides_alignds_entry_points_only():
    """bench/plugin_overhead.py's "without" side: the same interpreter and packages, alignd's two vLLM
    entry points hidden (vLLM's own plugins stay); the "with" side sees them."""
    import json
    import os
    import subprocess
    import sys

    bench = load_bench("plugin_overhead")

    def groups(extra_env: dict[str, str]) -> dict[str, list[str]]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | extra_env
        out = subprocess.run(
            [sys.executable, "-c", ENTRY_POINTS_SCRIPT], env=env, capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout)

    with_plugin, without_plugin = groups({}), groups(bench.without_plugin_env())
    assert "alignd.vllm_plugin:register" in with_plugin["vllm.general_plugins"]
    assert with_plugin["vllm.logits_processors"] == ["alignd.vllm_plugin.logits_processor:ValueGuidedLogitsProcessor"]
    assert without_plugin["vllm.logits_processors"] == []
    assert without_plugin["vllm.general_plugins"] == [
        v for v in with_plugin["vllm.general_plugins"] if not v.startswith("alignd.")
    ]
    assert without_plugin["vllm.general_plugins"]  # vLLM's own (LoRA resolvers) are still there


def test_plugin_overhead_summary_pairs_each_round():
    bench = load_bench("plugin_overhead")

    def result(tps: float, itl: float, texts: list[str]) -> dict:
        return {
            "output_throughput": tps,
            "median_ttft_ms": 50.0,
            "median_itl_ms": itl,
            "mean_output_tokens": 64.0,
            "generated_texts": texts,
        }

    runs = {
        8: {
            "without": [result(100, 10, ["a", "b"]), result(80, 12, ["c", "d"]), result(90, 11, ["e", "f"])],
            "with": [result(99, 10.5, ["a", "b"]), result(84, 12, ["c", "x"]), result(90, 11.5, ["e", "f"])],
        }
    }
    row = bench.summarize(runs)["8"]
    assert row["ratio_per_round"] == pytest.approx([0.99, 1.05, 1.0])
    assert row["ratio"] == pytest.approx(1.0)  # the median of the paired ratios, not the ratio of medians
    assert row["itl_diff_ms"] == pytest.approx(0.5)
    assert row["same_answers"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert row["within_noise"]
    runs[8]["with"] = [result(85, 12, ["a", "b"]), result(70, 14, ["c", "d"]), result(80, 13, ["e", "f"])]
    slower = bench.summarize(runs)["8"]
    assert slower["ratio"] == pytest.approx(70 / 80) and not slower["within_noise"]
    assert "with / without within 1 +- 0.03 at every concurrency: NO" in bench.markdown({"8": slower})


def test_chunked_prefill_summary_takes_medians_and_on_over_off_ratios():
    """bench/chunked_prefill.py's report (its runs need two full alignd servers: not in the suite)."""
    bench = load_bench("chunked_prefill")

    def run(scale: float) -> dict:
        return {metric: scale * (i + 1) for i, metric in enumerate(bench.METRICS)}

    summary = bench.summarize({"off": [run(1.0), run(3.0)], "on": [run(1.0), run(2.0), run(6.0)]})
    assert summary["sides"]["off"]["median_ttft_ms"] == 2.0 and summary["sides"]["on"]["median_ttft_ms"] == 2.0
    assert summary["on_over_off"]["p99_itl_ms"] == pytest.approx(1.0)
    assert summary["sides"]["on"]["output_throughput"] == 2.0 * (bench.METRICS.index("output_throughput") + 1)
    assert "| median_ttft_ms | 2.0 | 2.0 | 1.00 |" in bench.markdown(summary)
    env = bench.side_env("on", bench.parse_args(["--batched-tokens", "256"]))
    assert env["ALIGND_ENABLE_CHUNKED_PREFILL"] == "true" and env["ALIGND_MAX_NUM_BATCHED_TOKENS"] == "256"
    assert bench.side_env("off", bench.parse_args([]))["ALIGND_ENABLE_CHUNKED_PREFILL"] == "false"
