"""Reward throughput: one batch of 64 (prompt, response) pairs vs 64 single calls, same process.

    .venv/bin/python bench/reward_throughput.py [--pairs 64] [--repeats 3]

Rewards measured: positivity (VADER), prompted_implicit (two log-probability passes on the vLLM
engine serving the embedded SmolLM2), and a 135M classifier (SmolLM2 weights with a random
one-logit head, run by transformers) — the size of a small real reward model.
Prints a markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import tempfile
import time

from tqdm import tqdm

PROMPTS = [
    "How do I bake bread?",
    "Tell me about the moon.",
    "Why is the sky blue?",
    "Give me advice for an interview.",
    "What is a prime number?",
    "Describe a rainy day.",
    "How can I sleep better?",
    "Explain photosynthesis.",
]
RESPONSES = [
    "Mix flour, water, salt and yeast, let it rise, then bake it until golden. Enjoy the warm smell!",
    "The moon is Earth's only natural satellite; it shapes tides and lights our nights.",
    "Sunlight scatters off air molecules, and blue light scatters the most, so the sky looks blue.",
    "Prepare examples of your work, research the company, and be yourself. You will do great!",
    "A prime number has exactly two divisors: one and itself, like 2, 3, 5 and 7.",
    "Grey clouds, soft rain on the window, and a cup of tea: a calm and cozy day.",
    "Keep a regular schedule, avoid screens before bed, and keep your room cool and dark.",
    "Plants use light, water and carbon dioxide to make sugar and oxygen.",
]


def make_items(n: int, seed: int = 0):
    from alignd.rewards.base import RewardItem

    rng = random.Random(seed)
    return [RewardItem(rng.choice(RESPONSES), prompt=rng.choice(PROMPTS)) for _ in range(n)]


async def measure(reward, items, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` pairs/s for (one batched call, len(items) sequential single calls)."""
    await reward.score(items[:2])  # warm-up
    batch_best = single_best = 0.0
    for _ in tqdm(range(repeats), desc=f"{reward.name}", leave=False):
        start = time.perf_counter()
        await reward.score(items)
        batch_best = max(batch_best, len(items) / (time.perf_counter() - start))
        start = time.perf_counter()
        for item in items:
            await reward.score([item])
        single_best = max(single_best, len(items) / (time.perf_counter() - start))
    return batch_best, single_best


async def main(args) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignd.models.factory import open_engine
    from alignd.rewards.classifier import ClassifierReward
    from alignd.rewards.registry import build_rewards
    from alignd.settings import Settings

    settings = Settings()
    items = make_items(args.pairs)
    rows = []
    async with open_engine(settings) as engine:
        registry = await build_rewards(settings, engine)
        with tempfile.TemporaryDirectory() as tmp:
            model = AutoModelForSequenceClassification.from_pretrained(engine.info.model_path, num_labels=1)
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(engine.info.model_path).save_pretrained(tmp)
            classifier = ClassifierReward.from_pretrained("classifier_135m", tmp)
        for reward in (registry.get("positivity"), registry.get("prompted_implicit"), classifier):
            batch, single = await measure(reward, items, args.repeats)
            rows.append((reward.name, batch, single))
            print(
                f"{reward.name}: batch {batch:.1f} pairs/s, single {single:.1f} pairs/s, x{batch / single:.2f}",
                flush=True,
            )
    print(
        f"\n{args.pairs} pairs, best of {args.repeats}; {platform.processor() or platform.machine()}, "
        f"{__import__('os').cpu_count()} cores\n"
    )
    print("| reward | batch of 64 (pairs/s) | 64 single calls (pairs/s) | speed-up |")
    print("|---|---|---|---|")
    for name, batch, single in rows:
        print(f"| {name} | {batch:.1f} | {single:.1f} | {batch / single:.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
