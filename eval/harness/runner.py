"""Decoding every prompt through one method, as the server decodes it: the runner behind the evaluation,
with its response cache, the resolved baselines and value head of each run's signature, the transformers
replays, and the partial log it resumes from and appends to."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

from tqdm import tqdm

from harness.metrics import truncation_kl, value_guidance
from harness.partial_log import load_partial, open_partial_log, run_signature
from harness.plan import MethodRun, Plan
from harness.replay import HeadReplay, ImplicitReplay


def _decoding_config(decoding: dict):
    from alignd.decoding.config import DecodingConfig

    return DecodingConfig(**decoding)


class Runner:
    """Runs the plan's methods on one engine through the server's own stack (:func:`open_generation`): each
    prompt's response with its diagnostics (or a replay where the engine keeps them), shared between runs of
    the same signature, logged to the partial log and resumed from it."""

    def __init__(self, engine, settings, plan: Plan, progress: bool, partial_path: str | Path | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.plan = plan
        self.progress = progress
        self.aligned = None
        self.registry = None
        self.baselines = None
        # Runs of identical (settings, prompt, seed) are shared between the main table and the sweep.
        self.cache: dict[tuple[str, str], dict] = {}
        self.timings: dict[str, dict] = {}
        self.partial_path = Path(partial_path) if partial_path is not None else None
        self._log_file = None
        self._head_replay: HeadReplay | None = None
        self._implicit_replay: ImplicitReplay | None = None
        self._head_digest: str | None = None
        self._stack = AsyncExitStack()

    async def start(self) -> None:
        from alignd.decoding.generation import open_generation

        # The server's own stack: its baselines ("default": the trained adapter where there is one;
        # "prompted"), and the rewards that come with them (an adapter's implicit reward, for indirect
        # transfer from it), wired as the server wires them.
        self._stack = AsyncExitStack()
        self.aligned = await self._stack.enter_async_context(open_generation(self.engine, self.settings))
        self.baselines, self.registry = self.aligned.baselines, self.aligned.rewards

    async def close(self) -> None:
        """What start opened, as the server closes it (the baselines' own engines, then the rewards');
        and the partial log."""
        try:
            await self._stack.aclose()
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    # ------------------------------------------------------------------ baselines
    def baseline_kinds(self) -> dict[str, str] | None:
        """Baseline name -> kind (adapter, model, prompted) of the running server's baselines."""
        if self.baselines is None:
            return None
        return {name: self.baselines.get(name).kind for name in self.baselines.names()}

    def resolved_decoding(self, decoding: dict) -> dict:
        """``decoding`` with the baseline that actually runs in place of the name asked for: without a
        trained adapter "default" *is* the prompted baseline (the runs then share their responses), and
        another adapter folder is another run (resume must not reuse the old one's responses)."""
        if decoding.get("value") == "head":  # another head (retrained, or another folder) is another run
            return {**decoding, "value_head_digest": self.head_digest}
        if decoding["method"] not in ("baseline", "transfer_q") or self.baselines is None:
            return decoding
        baseline = self.baselines.get(decoding.get("baseline"))
        resolved = {**decoding, "baseline": baseline.name, "baseline_source": baseline.source}
        if decoding.get("value") == "implicit" and self.implicit_in_engine(_decoding_config(decoding)):
            resolved["in_engine"] = True  # another engine's arithmetic (bfloat16 may take a near-tie otherwise)
        return resolved

    @property
    def head_digest(self) -> str | None:
        """The weights digest of the engine's value head (None: it has none), read once: every run
        signature of a head row carries it."""
        if self._head_digest is None and self.aligned is not None and self.aligned.value_head:
            from alignd.models.weights import weights_digest

            self._head_digest = weights_digest(self.aligned.value_head["path"])
        return self._head_digest

    def head_replay(self) -> HeadReplay:
        if self._head_replay is None:
            from alignd.models.loading import resolve_model_path

            # the SFT weights themselves: the engine serves a prepared folder whose config names alignd's class
            self._head_replay = HeadReplay(
                resolve_model_path(self.settings, progress=False), Path(self.aligned.value_head["path"])
            )
        return self._head_replay

    def implicit_in_engine(self, config) -> bool:
        """This implicit row can decode in the engine's step (its baseline stack holds the row's baseline) and
        be replayed for its KL, instead of alignd's step loop, which the diagnostics would otherwise need."""
        from alignd.decoding.catalogue import implicit_in_engine

        if config.value != "implicit" or self.aligned is None:
            return False
        return implicit_in_engine(self.aligned, config.model_copy(update={"diagnostics": False}))

    def implicit_replay(self) -> ImplicitReplay:
        if self._implicit_replay is None:
            from alignd.models.loading import merge_adapter, resolve_model_path

            stack = self.engine.info.extra["baseline_stack"]
            model_dir = resolve_model_path(self.settings, progress=False)
            merged = merge_adapter(
                model_dir, stack["adapter"], Path(self.settings.cache_dir).expanduser(), progress=False
            )  # the folder the engine's stack was loaded from (cached)
            self._implicit_replay = ImplicitReplay(model_dir, merged, float(stack["beta"]))
        return self._implicit_replay

    def signature(self, run: MethodRun) -> str:
        return run_signature(self.resolved_decoding(run.decoding), run.temperature, self.plan.max_tokens)

    # ------------------------------------------------------------------ resume
    def plan_fields(self) -> dict:
        """What a logged response depends on besides its run signature and prompt."""
        return {
            "max_tokens": self.plan.max_tokens,
            "seed": self.plan.seed,
            "model": self.settings.model_name,
            "target_reward": self.settings.target_reward,
        }

    def resume(self, runs: Sequence[MethodRun], fresh: bool = False) -> int:
        """Load the partial log's responses of ``runs`` into the cache (``fresh``: discard the log), then
        keep logging every new one to it. Returns how many responses were loaded."""
        if self.partial_path is None:
            return 0
        if fresh:
            self.partial_path.unlink(missing_ok=True)
        partial = load_partial(self.partial_path, self.plan_fields(), {self.signature(run) for run in runs})
        self.cache.update(partial.records)
        for signature, logged in partial.timings.items():
            timing = self.timings.setdefault(signature, {"seconds": 0.0, "output_tokens": 0, "prompts": 0})
            for k in timing:
                timing[k] += logged[k]
        if partial.records:
            print(f"resumed {len(partial.records)} responses from {self.partial_path}", file=sys.stderr, flush=True)
        self._log_file = open_partial_log(self.partial_path)
        return len(partial.records)

    def _log(self, kind: str, signature: str, **payload) -> None:
        """One line to the partial log, flushed: a run killed after it keeps it."""
        if self._log_file is None:
            return
        entry = {"kind": kind, "signature": signature, **self.plan_fields(), **payload}
        self._log_file.write(json.dumps(entry) + "\n")
        self._log_file.flush()

    def _cached(self, signature: str, prompt_row: dict) -> dict | None:
        """The response already there (this run, or a resumed one of the same prompt text)."""
        record = self.cache.get((signature, prompt_row["id"]))
        return record if record is not None and record.get("prompt") == prompt_row["prompt"] else None

    # ------------------------------------------------------------------ decoding
    async def _one_implicit_in_engine(self, run: MethodRun, config, prompt, prompt_row: dict, params) -> dict:
        """An implicit row decoded in the engine's step (no diagnostics: one engine request), its reward scored
        here and its KL, steering and agreement replayed in transformers (:class:`ImplicitReplay`)."""
        plain = config.model_copy(update={"diagnostics": False})
        token_ids: list[int] = []
        text, finish = "", None
        started = time.perf_counter()
        plan = self.aligned.plan(prompt, params, plain)
        async for delta in self.aligned.stream(plan, f"eval-{run.key}-{prompt_row['id']}"):
            token_ids += delta.token_ids
            text += delta.text
            finish = delta.finish_reason or finish
        seconds = time.perf_counter() - started
        resolved = plan.decoding
        reward = (await self.registry.get(resolved.reward).score([prompt.reward_item(text)], truncate=True))[0].value
        replay = await asyncio.to_thread(
            self.implicit_replay(), prompt.token_ids, token_ids, resolved.alpha, resolved.top_k
        )
        return {
            "method": run.key,
            "label": run.label,
            "prompt_id": prompt_row["id"],
            "category": prompt_row.get("category"),
            "prompt": prompt_row["prompt"],
            "response": text,
            "output_tokens": len(token_ids),
            "finish_reason": finish,
            "reward": reward,
            "kl": replay["kl"],
            "kl_truncation": replay["kl_truncation"],
            "guidance": replay["guidance"],
            "baseline_kind": "adapter",
            "cost": {"decisions": len(token_ids), "gated": 0, "rollouts": 0, "rollout_tokens": 0, "reward_calls": 0},
            "seconds": seconds,
            "replay_agreement": replay["agreement"],
            "replay_kl_truncation": replay["kl_truncation"],
            "in_engine": True,
        }

    async def _one(self, run: MethodRun, config, prompt_row: dict, seed: int) -> dict:
        from alignd.decoding.prompt import Prompt
        from alignd.models.engine import GenerationParams

        chat = ({"role": "user", "content": prompt_row["prompt"]},)
        prompt = Prompt(tuple(self.engine.render_chat(list(chat))), messages=chat)
        params = GenerationParams(max_tokens=self.plan.max_tokens, temperature=run.temperature, seed=seed)
        if self.implicit_in_engine(config):
            return await self._one_implicit_in_engine(run, config, prompt, prompt_row, params)
        token_ids: list[int] = []
        text, alignment, finish = "", None, None
        started = time.perf_counter()
        async for delta in self.aligned.stream(
            self.aligned.plan(prompt, params, config), f"eval-{run.key}-{prompt_row['id']}"
        ):
            token_ids += delta.token_ids
            text += delta.text
            alignment = delta.alignment.model_dump() if delta.alignment is not None else alignment
            finish = delta.finish_reason or finish
        if alignment is None:
            raise RuntimeError(f"{run.key}: no diagnostics in the response to {prompt_row['id']}")
        seconds = time.perf_counter() - started
        replay = {}
        if config.values_in_engine:  # the KL the engine cannot report, replayed in transformers
            replay = await asyncio.to_thread(
                self.head_replay(), prompt.token_ids, token_ids, config.alpha, config.top_k
            )
            alignment["kl"] = replay["kl"]
        return {
            "method": run.key,
            "label": run.label,
            "prompt_id": prompt_row["id"],
            "category": prompt_row.get("category"),
            "prompt": prompt_row["prompt"],
            "response": text,
            "output_tokens": len(token_ids),
            "finish_reason": finish,
            "reward": alignment["reward"],
            "kl": alignment["kl"],
            "kl_truncation": truncation_kl(alignment["steps"]),
            "cost": alignment["cost"],
            "guidance": value_guidance(alignment["steps"]),
            # what kind of baseline ran (adapter, model, prompted), where the diagnostics say: baseline rows, TQ*
            "baseline_kind": alignment.get("baseline_kind"),
            "seconds": seconds,
            **(
                {"replay_agreement": replay["agreement"], "replay_kl_truncation": replay["kl_truncation"]}
                if replay
                else {}
            ),
        }

    async def run_method(self, run: MethodRun, prompts: list[dict], bar_position: int = 1) -> list[dict]:
        """Every prompt through one method, ``concurrency`` at a time; cached ones are not re-run."""
        from alignd.decoding.config import DecodingConfig

        config = DecodingConfig(**run.decoding, diagnostics=True)
        signature = self.signature(run)
        todo = [(p, i) for i, p in enumerate(prompts) if self._cached(signature, p) is None]
        semaphore = asyncio.Semaphore(self.plan.concurrency)
        bar = tqdm(
            total=len(todo),
            desc=f"  {run.key}",
            position=bar_position,
            leave=False,
            disable=not self.progress or not todo,
            unit="prompt",
        )

        async def guarded(p: dict, i: int) -> None:
            async with semaphore:
                seed = None if self.plan.seed is None else self.plan.seed + i
                record = await self._one(run, config, p, seed)
            record["seed"] = seed
            self.cache[(signature, p["id"])] = record
            self._log("record", signature, prompt_id=p["id"], record=record)
            bar.update(1)

        started = time.perf_counter()
        try:
            await asyncio.gather(*(guarded(p, i) for p, i in todo))
        finally:
            bar.close()
        if todo:
            done = {
                "seconds": time.perf_counter() - started,
                "prompts": len(todo),
                "output_tokens": sum(self.cache[(signature, p["id"])]["output_tokens"] for p, _ in todo),
            }
            timing = self.timings.setdefault(signature, {"seconds": 0.0, "output_tokens": 0, "prompts": 0})
            for k in timing:
                timing[k] += done[k]
            self._log("timing", signature, **done)
        return [dict(self.cache[(signature, p["id"])], method=run.key, label=run.label) for p in prompts]

    def timing(self, run: MethodRun) -> dict:
        timing = self.timings.get(self.signature(run), {"seconds": 0.0, "output_tokens": 0, "prompts": 0})
        tps = timing["output_tokens"] / timing["seconds"] if timing["seconds"] > 0 else float("nan")
        return {"tokens_per_s": tps, "seconds": timing["seconds"]}
