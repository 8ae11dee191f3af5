"""The vLLM engine in bfloat16 vs float32 on this machine's CPU: what ``ALIGND_DTYPE=auto`` decides.

    .venv/bin/python bench/engine_dtype.py              # both dtypes, one after the other
    .venv/bin/python bench/engine_dtype.py --smoke      # a tiny run: checks the script

Each dtype runs in its own process (one engine at a time), on the embedded model, through the engine
primitives TQ* uses: ``rollouts`` (8 prompts x 48 greedy tokens in one call: batched decoding) and
``continuation_logprobs`` (8 prompt + answer pairs: prompt log-probabilities, which implicit rewards
read). Each is timed ``--repeats`` times after one untimed run; the median is reported, and the ratio
float32 / bfloat16 of the speeds. Prints the CPU's bfloat16 flags and what ``auto`` picks here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

DTYPES = ("bfloat16", "float32")


async def measure(dtype: str, tokens: int, repeats: int) -> dict:
    from alignd.models.factory import warm_up
    from alignd.models.loading import prepare_embedded_model
    from alignd.models.vllm_engine import VLLMEngine
    from alignd.settings import Settings

    settings = Settings(dtype=dtype)
    engine = VLLMEngine.start(str(prepare_embedded_model(settings.cache_dir)), settings)
    try:
        await warm_up(engine)
        prompts = [
            engine.render_chat([{"role": "user", "content": f"Tell me about topic number {i}."}]) for i in range(8)
        ]
        answers = [engine.encode(" Rain is kind and gentle to us all, and the garden loves it.")] * len(prompts)

        async def decode() -> float:
            start = time.perf_counter()
            groups = await engine.rollouts(prompts, 1, tokens, 0.0)
            return sum(len(g[0].token_ids) for g in groups) / (time.perf_counter() - start)

        async def score() -> float:
            start = time.perf_counter()
            await engine.continuation_logprobs(prompts, answers)
            return len(prompts) / (time.perf_counter() - start)

        out = {"dtype": dtype}
        for name, fn in (("decode_tokens_per_s", decode), ("scored_pairs_per_s", score)):
            await fn()  # untimed: prefix cache and kernels warm
            out[name] = statistics.median([await fn() for _ in range(repeats)])
        return out
    finally:
        await engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--child", choices=DTYPES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.repeats = 4, 1
    if args.child:
        print(json.dumps(asyncio.run(measure(args.child, args.tokens, args.repeats))))
        return
    from alignd.models.platform import NATIVE_BF16_FLAGS, cpu_flags

    rows = []
    for dtype in DTYPES:
        out = subprocess.run(
            [sys.executable, __file__, "--child", dtype, "--tokens", str(args.tokens), "--repeats", str(args.repeats)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{dtype}: {rows[-1]}", file=sys.stderr, flush=True)
    bf16, fp32 = rows
    native = sorted(NATIVE_BF16_FLAGS & cpu_flags())
    print(
        f"CPU bfloat16 flags: {', '.join(native) or 'none'}; dtype=auto picks {'bfloat16' if native else 'float32'}\n"
    )
    print("| measured | bfloat16 | float32 | float32 / bfloat16 |\n|---|---|---|---|")
    for key, label in (
        ("decode_tokens_per_s", f"8 x {args.tokens} greedy tokens, tokens/s"),
        ("scored_pairs_per_s", "8 prompt log-probability pairs, pairs/s"),
    ):
        print(f"| {label} | {bf16[key]:.1f} | {fp32[key]:.1f} | **{fp32[key] / bf16[key]:.2f}x** |")


if __name__ == "__main__":
    main()
