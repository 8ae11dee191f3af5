"""Greedy TQ* on the two engine paths: does the Hugging Face path (float32) choose the same tokens as
the vLLM path (bfloat16) for the same settings?

    .venv/bin/python bench/engine_agreement.py [--prompts 8] [--max-tokens 24]

For each prompt it reports the first position where the answers differ, and at that position the
gap between the two best re-weighted candidates on the HF path (a near-tie explains a divergence:
bfloat16 moves log-probabilities by a few hundredths of a nat). Settings: prompted baseline,
positivity, alpha 1, top_k 10, one greedy 20-token rollout per candidate.
"""

from __future__ import annotations

import argparse
import asyncio

from tqdm import tqdm

PROMPTS = [
    "Tell me about your weekend.",
    "What do you think of Mondays?",
    "Describe the weather today.",
    "How was your commute?",
    "What is your opinion of homework?",
    "Tell me about traffic jams.",
    "What do you think about rainy days?",
    "Describe a long queue at the bank.",
]


async def decode(aligned, engine, prompt_text, config, max_tokens):
    from alignd.decoding.prompt import Prompt
    from alignd.models.engine import GenerationParams

    chat = ({"role": "user", "content": prompt_text},)
    prompt = Prompt(tuple(engine.render_chat(list(chat))), messages=chat)
    tokens, alignment = [], None
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
    async for delta in aligned.stream(aligned.plan(prompt, params, config), "agree"):
        tokens += delta.token_ids
        alignment = delta.alignment.model_dump() if delta.alignment is not None else alignment
    return tokens, alignment


async def main(args) -> None:
    from contextlib import AsyncExitStack

    from alignd.decoding.config import DecodingConfig
    from alignd.decoding.generation import open_generation
    from alignd.models.factory import build_reference_engine, open_engine
    from alignd.settings import Settings

    settings = Settings()
    config_args = dict(method="transfer_q", alpha=1.0, top_k=10, rollout_len=20, diagnostics=True)
    async with open_engine(settings) as vllm_engine, AsyncExitStack() as stack:
        hf_engine = build_reference_engine(vllm_engine.info.model_path, settings)
        paths = {}
        for name, engine in (("vllm", vllm_engine), ("hf", hf_engine)):
            aligned = await stack.enter_async_context(open_generation(engine, settings, configured_baselines=False))
            paths[name] = (aligned, engine, DecodingConfig(**config_args))
        same = total = identical = 0
        print("| prompt | identical | first divergence | top-2 gap there (HF, nats) |\n|---|---|---|---|")
        for p in tqdm(PROMPTS[: args.prompts], desc="prompts"):
            v_tokens, _ = await decode(*paths["vllm"][:2], p, paths["vllm"][2], args.max_tokens)
            h_tokens, h_align = await decode(*paths["hf"][:2], p, paths["hf"][2], args.max_tokens)
            n = min(len(v_tokens), len(h_tokens))
            first = next((i for i in range(n) if v_tokens[i] != h_tokens[i]), None)
            if first is None and len(v_tokens) == len(h_tokens):
                identical += 1
                same += n
                total += n
                print(f"| {p} | yes | - | - |")
                continue
            first = n if first is None else first
            same += first
            total += max(len(v_tokens), len(h_tokens))
            gap = "-"
            if first < len(h_align["steps"]):
                lps = sorted((c["logprob"] for c in h_align["steps"][first]["candidates"]), reverse=True)
                gap = f"{lps[0] - lps[1]:.3f}"
            print(f"| {p} | no | token {first} | {gap} |")
        print(
            f"\nidentical answers: {identical}/{args.prompts}; tokens agreeing before the first divergence: "
            f"{same}/{total} ({same / max(total, 1):.0%})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    asyncio.run(main(parser.parse_args()))
