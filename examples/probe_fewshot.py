"""0-shot vs 5-shot representation landscape of the embedded SmolLM2, layer by layer.

    .venv/bin/python examples/probe_fewshot.py                      # in-process, writes docs/probe_fewshot.png
    .venv/bin/python examples/probe_fewshot.py --server http://127.0.0.1:8000   # the same job via the API

Builds MMLU-style prompts for the 80 questions of examples/data/fewshot_questions.jsonl (5 subjects,
answer letters balanced) with 0 and 5 shots of the same subject, reads the last prompt token's hidden
state at the input of every block, and runs the paper's per-layer analysis: GRIDE intrinsic dimension,
ADP density peaks (Z = 1.6) and core fraction, ARI of the clusters vs subject and vs answer letter,
label overlap, and the neighbourhood overlap between the 0-shot and 5-shot representations of the
same questions. Prints a table and saves the four-panel plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "fewshot_questions.jsonl"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA, help="JSON-lines items: question, choices, answer, subject")
    p.add_argument("--shots", type=int, nargs=2, default=[0, 5], metavar=("A", "B"), help="two shot counts to compare")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    p.add_argument("--pooling", choices=["last", "mean"], default="last")
    p.add_argument("--site", choices=["residual", "normed"], default="residual")
    p.add_argument("--seed", type=int, default=0, help="seed of the shot choice")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "probe_fewshot.png", help="where the PNG goes")
    p.add_argument("--json", type=Path, default=None, help="also write the whole result as JSON here")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--server", default=None, help="run the job through a running alignd server at this URL")
    return p.parse_args()


def layers_arg(text: str):
    return "all" if text == "all" else [int(x) for x in text.split(",")]


def run_in_process(args, items) -> dict:
    import torch

    from alignd.models.factory import build_reference_engine
    from alignd.models.loading import prepare_embedded_model
    from alignd.probes.analysis import analyse_conditions
    from alignd.probes.fewshot import build_prompts, dataset_labels
    from alignd.probes.hidden_states import layer_representations
    from alignd.settings import Settings

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(max_model_len=2048)  # the cache folder from ALIGND_CACHE_DIR, as the server
    engine = build_reference_engine(prepare_embedded_model(settings.cache_dir), settings)
    conditions = {f"{k}-shot": build_prompts(items, k, seed=args.seed) for k in args.shots}
    timing, reps = {}, {}
    for name, texts in conditions.items():
        start = time.perf_counter()
        reps[name] = asyncio.run(
            layer_representations(engine, texts, layers_arg(args.layers), args.pooling, site=args.site)
        )
        tokens = sum(len(engine.encode(t)) for t in texts)
        timing[f"hidden_states_{name}_s"] = time.perf_counter() - start
        print(
            f"{name}: {len(texts)} prompts, {tokens / len(texts):.0f} tokens on average, "
            f"hidden states in {timing[f'hidden_states_{name}_s']:.1f} s"
        )
    start = time.perf_counter()
    result = analyse_conditions(reps, dataset_labels(items))
    timing["analysis_s"] = time.perf_counter() - start
    result["timing"] = {k: round(v, 2) for k, v in timing.items()}
    return result


def run_via_server(args, items) -> tuple[dict, bytes]:
    body = {
        "dataset": {"items": [it.model_dump() for it in items], "shots": args.shots, "seed": args.seed},
        "layers": layers_arg(args.layers),
        "pooling": args.pooling,
        "site": args.site,
    }
    with httpx.Client(base_url=args.server, timeout=120) as client:
        answer = client.post("/v1/probe/jobs", json=body)
        answer.raise_for_status()
        job_id = answer.json()["id"]
        while True:
            job = client.get(f"/v1/probe/jobs/{job_id}").json()
            print(f"\r{job['status']} {100 * job['progress']:.0f}%", end="", flush=True)
            if job["status"] in ("done", "failed", "cancelled"):
                print()
                break
            time.sleep(2)
        if job["status"] != "done":
            raise SystemExit(f"job {job['status']}: {job['error']}")
        return job["result"], client.get(job["plot_url"]).content


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(result: dict) -> None:
    a, b = result["condition"], result["compare"]["condition"]
    labels = list(result["layers"][0]["ari"])
    head = ["layer", f"ID {a}", f"ID {b}", f"peaks {a}", f"peaks {b}"]
    head += [f"ARI {n} {c}" for n in labels for c in (a, b)] + [f"overlap {a}/{b}"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for ea, eb in zip(result["layers"], result["compare"]["layers"], strict=False):
        row = [
            str(ea["layer"]),
            fmt(ea["intrinsic_dimension"], ".1f"),
            fmt(eb["intrinsic_dimension"], ".1f"),
            fmt(ea["num_peaks"], "d"),
            fmt(eb["num_peaks"], "d"),
        ]
        row += [fmt(e["ari"][n]) for n in labels for e in (ea, eb)]
        row += [fmt(ea["neighbourhood_overlap"])]
        print("| " + " | ".join(row) + " |")


def main() -> None:
    from alignd.probes.analysis import plot_layers
    from alignd.probes.fewshot import load_jsonl

    args = parse_args()
    items = load_jsonl(args.data)
    start = time.perf_counter()
    if args.server:
        result, png = run_via_server(args, items)
        args.out.write_bytes(png)
    else:
        result = run_in_process(args, items)
        plot_layers(
            result,
            args.out,
            title=f"SmolLM2-135M-Instruct, {len(items)} questions: " + " vs ".join(result["conditions"]),
        )
    print_table(result)
    print(f"\nplot: {args.out}   total {time.perf_counter() - start:.1f} s   timing {result.get('timing')}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
