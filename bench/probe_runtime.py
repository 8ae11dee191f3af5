"""Runtime of one probe job: N texts, every layer, on the embedded SmolLM2 (the server's code path).

    .venv/bin/python bench/probe_runtime.py                    # 500 five-shot prompts, all 31 layers
    .venv/bin/python bench/probe_runtime.py --texts 500 --shots 0 --compare-shots 5   # two conditions

The job goes through ProbeServing exactly as a POST /v1/probe/jobs would (job manager, lazy load of
the reference engine, hidden states in batches, per-layer analysis, PNG); only HTTP is left out. The
probe settings are ordinary Settings fields (ALIGND_PROBE_*), set here from the flags. Texts are
MMLU-style prompts over examples/data/fewshot_questions.jsonl (80 questions): text j asks question
j mod 80 with shots drawn with seed j // 80, so 500 texts are 500 distinct prompts. Labels: subject
and answer letter. Prints the phases (load, hidden states, analysis, plot) and a markdown row for
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=500)
    p.add_argument("--shots", type=int, default=5, help="shots per prompt (0..5; 0 gives only 80 distinct prompts)")
    p.add_argument("--compare-shots", type=int, default=None, help="a second condition with this many shots")
    p.add_argument("--layers", default="all", help="'all' or comma-separated indices")
    p.add_argument("--pooling", choices=["last", "mean"], default="last")
    p.add_argument("--site", choices=["residual", "normed"], default="residual")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    return p.parse_args()


def texts_for(items, n: int, shots: int) -> list[str]:
    from alignd.probes.fewshot import build_prompt, select_shots

    out = []
    for j in range(n):
        i = j % len(items)
        out.append(build_prompt(items[i], select_shots(items, i, shots, seed=j // len(items))))
    return out


async def run(args) -> dict:
    from alignd.models.loading import prepare_embedded_model
    from alignd.probes.fewshot import load_jsonl
    from alignd.server.probes.protocol import ProbeJobRequest
    from alignd.server.probes.serving import ProbeServing
    from alignd.settings import Settings

    settings = Settings(
        probe_batch_size=args.batch_size,
        probe_max_batch_tokens=args.max_batch_tokens,
        probe_device=args.device,
        probe_max_texts=max(args.texts, 2000),
        probe_job_timeout_s=24 * 3600.0,
    )
    model_dir = prepare_embedded_model(settings.cache_dir)
    dataset = load_jsonl(REPO / "examples" / "data" / "fewshot_questions.jsonl")
    items = [dataset[j % len(dataset)] for j in range(args.texts)]
    texts = texts_for(dataset, args.texts, args.shots)
    body = {
        "texts": texts,
        "name": f"{args.shots}-shot",
        "labels": {"subject": [it.subject for it in items], "answer": [it.answer_letter for it in items]},
        "layers": args.layers if args.layers == "all" else [int(x) for x in args.layers.split(",")],
        "pooling": args.pooling,
        "site": args.site,
    }
    if args.compare_shots is not None:
        other = texts_for(dataset, args.texts, args.compare_shots)
        body["compare"] = {"texts": other, "name": f"{args.compare_shots}-shot"}
    serving = ProbeServing(str(model_dir), settings)
    start = time.perf_counter()
    job = await serving.submit(ProbeJobRequest.model_validate(body))
    last = -1.0
    while True:
        state = serving.get(job.id)
        if state.progress - last >= 0.05:
            last = state.progress
            print(f"  {time.perf_counter() - start:7.1f} s  {state.status:9s} {100 * state.progress:5.1f}%", flush=True)
        if state.status in ("done", "failed", "cancelled"):
            break
        await asyncio.sleep(0.5)
    wall = time.perf_counter() - start
    await serving.close()
    if state.status != "done":
        raise SystemExit(f"job {state.status}: {state.error}")
    return {"wall_s": wall, "job": state, "png_bytes": len(serving.jobs.get(job.id).artifacts.get("plot.png", b""))}


def main() -> None:
    args = parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = asyncio.run(run(args))
    job = out["job"]
    timing = job.result.timing
    tokens = sum(c.tokens for c in job.request.conditions)
    n_layers = len(job.request.layers)
    conditions = " vs ".join(c.name for c in job.request.conditions)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, device {args.device}"
    )
    print(
        f"job: {job.request.n_texts} texts x {len(job.request.conditions)} condition(s) ({conditions}), "
        f"{n_layers} layers, {tokens} tokens "
        f"({tokens / max(1, job.request.n_texts * len(job.request.conditions)):.0f} per text)"
    )
    print(f"phases: {timing}  plot {out['png_bytes']} bytes")
    print(
        "\n| texts | conditions | layers | tokens | load s | hidden states s | analysis s | plot s | job s | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {job.request.n_texts} | {conditions} | {n_layers} | {tokens} | {timing.get('load_s', 0):.1f} | "
        f"{timing['hidden_states_s']:.1f} | {timing['analysis_s']:.1f} | {timing['plot_s']:.1f} | "
        f"{timing['total_s']:.1f} | {out['wall_s']:.1f} |"
    )


if __name__ == "__main__":
    main()
