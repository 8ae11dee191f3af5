"""Time and memory of ``alignd select s2l`` against the set's size (docs/BENCHMARKS.md, "S2L selection").

    flock /tmp/alignd-heavy.lock .venv/bin/python bench/s2l_selection.py            # 135, 270, 540 examples
    flock /tmp/alignd-heavy.lock .venv/bin/python bench/s2l_selection.py --proxy-epochs 1  # the run in BENCHMARKS
    .venv/bin/python bench/s2l_selection.py --sizes 8 16 --model DIR --fast         # a tiny model: checks it

Each size is one ``alignd select s2l`` command in its own process (so its peak memory is its own), on a
set cut from or repeated out of ``train/data/demonstrations.jsonl`` (a repeat gets new ids: the text
is the same, so the times are those of real demonstration lengths). Reported per size: the wall time
of the whole command and of its phases (the proxy's training, the losses at the checkpoints, K-means
and the sampler), from the command's own ``selection.json``, and the process's peak resident memory.
The same options for every size (``--budget 0.3``, the defaults otherwise), so the times grow with
the size as the proxy's steps and the forward passes do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMOS = ROOT / "train" / "data" / "demonstrations.jsonl"


def make_set(path: Path, size: int) -> Path:
    rows = [json.loads(line) for line in DEMOS.read_text().splitlines() if line.strip()]
    out = []
    for i in range(size):
        row = dict(rows[i % len(rows)])
        row["id"] = f"{row['id']}-r{i // len(rows)}"
        out.append(json.dumps(row))
    path.write_text("\n".join(out) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[135, 270, 540])
    parser.add_argument("--model", default="embedded")
    parser.add_argument(
        "--proxy-epochs",
        type=float,
        help="the proxy's epochs (default: the command's own, 3); its training time is linear in them",
    )
    parser.add_argument("--fast", action="store_true", help="tiny proxy settings (harness check)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "s2l_selection.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="s2l-bench-"))
    results = []
    try:
        for size in args.sizes:
            data = make_set(work / f"set-{size}.jsonl", size)
            out = work / f"sel-{size}"
            cmd = [
                sys.executable,
                "-m",
                "alignd.cli",
                "select",
                "s2l",
                "--model",
                args.model,
                "--data",
                str(data),
                "--budget",
                "0.3",
                "--out",
                str(out),
            ]
            if args.fast:
                cmd += ["--checkpoints", "2", "--proxy-epochs", "1", "--proxy-batch-size", "4"]
            elif args.proxy_epochs is not None:
                cmd += ["--proxy-epochs", str(args.proxy_epochs)]
            env = {**os.environ, "TQDM_DISABLE": "1", "ALIGND_LOG_LEVEL": "warning"}
            print(f"[s2l bench] {size} examples ...", flush=True)
            started = time.perf_counter()
            # /usr/bin/time is not everywhere; the command's own getrusage peak is in selection.json
            subprocess.run(cmd, check=True, env=env, cwd=ROOT)
            wall = time.perf_counter() - started
            selection = json.loads((out / "selection.json").read_text())
            proxy = selection["proxy"]["metrics"]
            row = {
                "examples": size,
                "selected": selection["selected"],
                "clusters": selection["clusters"]["k"],
                "checkpoint_steps": selection["proxy"]["checkpoint_steps"],
                "wall_s": round(wall, 1),
                "proxy_train_s": proxy.get("train_wall_s"),
                "losses_s": proxy.get("loss_wall_s_this_process"),
                "cluster_and_sample_s": proxy.get("cluster_and_sample_s"),
                "peak_rss_mib": selection["metrics"]["peak_rss_mib"]["self"],
            }
            results.append(row)
            print(f"[s2l bench] {json.dumps(row)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"model": args.model, "nproc": os.cpu_count(), "proxy_epochs": args.proxy_epochs, "results": results},
            indent=2,
        )
        + "\n"
    )
    print(
        "| examples | clusters | proxy steps | wall s | proxy training s | losses s | K-means + sampler s "
        "| peak RSS MiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['examples']} | {r['clusters']} | {r['checkpoint_steps'][-1]} | {r['wall_s']} | {r['proxy_train_s']} "
            f"| {r['losses_s']} | {r['cluster_and_sample_s']} | {r['peak_rss_mib']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
