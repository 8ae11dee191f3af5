"""Transfer Q* speed: alignd (vLLM engine, batched) vs a faithful re-implementation of the reference
loop (Hugging Face, batch size 1), same settings, same script, same machine.

    .venv/bin/python bench/tq_speed.py                 # k=10, 20-token rollouts, 1 rollout, greedy, 64 tokens
    .venv/bin/python bench/tq_speed.py --smoke         # a tiny run (used by the test suite)

Settings (both sides): SFT = embedded SmolLM2, baseline = prompted SmolLM2 (alignment system prompt),
target reward = positivity (VADER), alpha = 1, top_k = 10, 1 greedy rollout of 20 tokens per
candidate, greedy decoding, 64 new tokens.

alignd prunes candidates that cannot win (greedy, bounded reward: the same answers, fewer rollouts)
unless --no-prune is given.

Measured:
  * reference loop: output tokens/s for one request (it cannot serve two at once);
  * alignd TQ*: aggregate output tokens/s at concurrency 1, 4, 8 (different prompts at once);
  * alignd TQ* with block-wise decisions (block_size 4) and confidence gating (0.5): rollout tokens
    per output token and mean reward, against plain TQ* on the same prompts.
Prints markdown tables for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time

import torch
from tqdm import tqdm

PROMPTS = [
    "Tell me about your weekend.", "What do you think of Mondays?", "Describe the weather today.",
    "How was your commute?", "What is your opinion of homework?", "Tell me about traffic jams.",
    "What do you think about rainy days?", "Describe a long queue at the bank.",
]


# ---------------------------------------------------------------------------- the reference loop
class ReferenceTQ:
    """The authors' algorithm as their code runs it: one request at a time, a Hugging Face model, every
    step recomputes the whole prefix (no KV cache across steps); the k candidates' rollouts go to
    ``generate`` as one batch (they share the prefix length, so no padding), greedy, fixed length, no
    EOS stop; each rollout is scored on its own. (Batching the candidates is what makes the orientation
    figure of about 3 s per token on these machines; one generate call per candidate is ~5x slower.)"""

    def __init__(self, model_path: str, system_prompt: str, reward_fn, top_k: int, rollout_len: int, alpha: float):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.system_prompt = system_prompt
        self.reward_fn = reward_fn
        self.top_k, self.rollout_len, self.alpha = top_k, rollout_len, alpha

    def _ids(self, messages) -> list[int]:
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tok.encode(text, add_special_tokens=False)

    @torch.inference_mode()
    def generate(self, prompt: str, max_tokens: int) -> list[int]:
        sft_ids = self._ids([{"role": "user", "content": prompt}])
        bl_ids = self._ids([{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}])
        out: list[int] = []
        for _ in range(max_tokens):
            logits = self.model(torch.tensor([sft_ids + out])).logits[0, -1]
            top = logits.topk(self.top_k)
            batch = torch.tensor([bl_ids + out + [z] for z in top.indices.tolist()])
            rollouts = self.model.generate(
                batch, attention_mask=torch.ones_like(batch), max_new_tokens=self.rollout_len, do_sample=False,
                min_new_tokens=self.rollout_len, pad_token_id=self.tok.eos_token_id,
            )[:, len(bl_ids) :].tolist()
            scores = []
            for logit, rollout in zip(top.values.tolist(), rollouts):
                q = self.reward_fn(prompt, self.tok.decode(rollout, skip_special_tokens=True))
                scores.append(logit + q / self.alpha)  # logit + w * Q, w = 1 / alpha
            out.append(top.indices[max(range(len(scores)), key=scores.__getitem__)].item())
            if out[-1] == self.tok.eos_token_id:
                break
        return out


# ---------------------------------------------------------------------------- alignd
async def run_alignd(aligned, engine, prompts, config, max_tokens) -> tuple[float, list[dict]]:
    from alignd.decoding.values import Prompt
    from alignd.models.engine import GenerationParams

    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)

    async def one(p):
        chat = ({"role": "user", "content": p},)
        prompt = Prompt(tuple(engine.render_chat(list(chat))), messages=chat)
        alignment, tokens = None, 0
        async for delta in aligned.stream(prompt, params, config, "bench"):
            tokens += len(delta.token_ids)
            alignment = delta.alignment or alignment
        return {"tokens": tokens, **(alignment or {})}

    start = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - start, results


async def main(args) -> None:
    from alignd.decoding.config import DecodingConfig
    from alignd.decoding.service import AlignedDecoding
    from alignd.models.factory import open_engine
    from alignd.rewards.registry import build_rewards
    from alignd.settings import Settings

    settings = Settings()
    tq = dict(method="transfer_q", alpha=args.alpha, top_k=args.top_k, num_rollouts=1, rollout_len=args.rollout_len,
              diagnostics=True, prune=args.prune)
    rows, cheap_rows = [], []
    async with open_engine(settings) as engine:
        registry = await build_rewards(settings, engine)
        aligned = AlignedDecoding(engine, registry, settings)
        positivity = registry.get("positivity")

        def reward_fn(prompt, text):
            from alignd.rewards.base import RewardItem

            return asyncio.run_coroutine_threadsafe(positivity.score([RewardItem(text, prompt=prompt)]), loop).result()[0].value

        loop = asyncio.get_running_loop()
        # reference loop (runs in a thread: its reward calls go through the same reward object)
        ref = ReferenceTQ(engine.info.model_path, settings.baseline_system_prompt, reward_fn, args.top_k,
                          args.rollout_len, args.alpha)
        ref_tokens = ref_seconds = 0.0
        for p in tqdm(PROMPTS[: args.reference_prompts], desc="reference loop (HF, batch 1)"):
            start = time.perf_counter()
            ref_tokens += len(await asyncio.to_thread(ref.generate, p, args.max_tokens))
            ref_seconds += time.perf_counter() - start
        ref_tps = ref_tokens / ref_seconds
        print(f"reference loop: {ref_tps:.3f} tokens/s ({ref_seconds / ref_tokens:.2f} s/token)", flush=True)

        config = aligned.resolve(DecodingConfig(**tq))
        await run_alignd(aligned, engine, PROMPTS[:1], config, 4)  # warm-up
        for c in tqdm(args.concurrency, desc="alignd TQ* concurrency sweep"):
            seconds, results = await run_alignd(aligned, engine, PROMPTS[:c], config, args.max_tokens)
            tokens = sum(r["tokens"] for r in results)
            rows.append((c, tokens / seconds, tokens / seconds / ref_tps, statistics.mean(r["reward"] for r in results)))
            print(f"alignd c={c}: {tokens / seconds:.3f} tokens/s aggregate, x{tokens / seconds / ref_tps:.2f}", flush=True)

        variants = {
            "TQ* every token": {},
            "TQ* block 4": {"block_size": 4},
            "TQ* gate 0.5": {"confidence_threshold": 0.5},
            "TQ* block 4 + gate 0.5": {"block_size": 4, "confidence_threshold": 0.5},
        }
        for name, extra in tqdm(variants.items() if args.variant_prompts else [], desc="cheaper variants"):
            cfg = aligned.resolve(DecodingConfig(**tq, **extra))
            seconds, results = await run_alignd(aligned, engine, PROMPTS[: args.variant_prompts], cfg, args.max_tokens)
            tokens = sum(r["tokens"] for r in results)
            rollout_tokens = sum(r["cost"]["rollout_tokens"] for r in results)
            cheap_rows.append((name, rollout_tokens / tokens, statistics.mean(r["reward"] for r in results), tokens / seconds))

    print(f"\n{platform.machine()}, {os.cpu_count()} cores; k={args.top_k}, rollout_len={args.rollout_len}, 1 rollout, "
          f"greedy, alpha={args.alpha}, {args.max_tokens} new tokens; reference: {args.reference_prompts} prompt(s); "
          f"pruning {'on' if args.prune else 'off'}\n")
    print(f"| | output tokens/s | vs reference loop | mean positivity |\n|---|---|---|---|")
    print(f"| reference loop (HF, batch 1) | {ref_tps:.3f} | 1.00x | |")
    for c, tps, ratio, reward in rows:
        print(f"| alignd TQ*, concurrency {c} | {tps:.3f} | {ratio:.2f}x | {reward:.3f} |")
    if not cheap_rows:
        return
    base = cheap_rows[0][1]
    print(f"\n| variant ({args.variant_prompts} prompts, concurrent) | rollout tokens per output token | reduction | "
          f"mean positivity | output tokens/s |\n|---|---|---|---|---|")
    for name, rpt, reward, tps in cheap_rows:
        print(f"| {name} | {rpt:.1f} | {base / max(rpt, 1e-9):.1f}x | {reward:.3f} | {tps:.3f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--rollout-len", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--reference-prompts", type=int, default=1)
    parser.add_argument("--variant-prompts", type=int, default=8)
    parser.add_argument("--prune", action=argparse.BooleanOptionalAction, default=True,
                        help="skip rollouts of candidates that cannot win (greedy, bounded reward: same answers)")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: checks the script, not the speed")
    args = parser.parse_args()
    if args.smoke:
        args.max_tokens, args.top_k, args.rollout_len, args.concurrency, args.variant_prompts = 3, 3, 4, [1, 2], 2
    asyncio.run(main(args))
