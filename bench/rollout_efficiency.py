"""Rollout efficiency's two halves for bench/tq_speed.py (its docstring defines the measure): what TQ*
really ran, counted by wrapping the engine's ``rollouts`` primitive for the run (``RolloutTracker``: rollout
sequences in flight over time, the batch B they ran at), and what the engine can do at that batch
(``capacity_at``: its batched greedy decode throughput at B, through the same primitive).

    with RolloutTracker(engine) as tracker:        # inside a running event loop
        ...                                        # TQ* requests
    capacity = await capacity_at(engine, aligned, prompts, tracker.mean_in_flight, rollout_len, 3, cache)
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time


def _engine_running_gauge():
    """vLLM's own gauge of the requests running in its scheduler (None without a vLLM engine here)."""
    try:
        from prometheus_client import REGISTRY

        return REGISTRY._names_to_collectors.get("vllm:num_requests_running")
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None


def _cpu_seconds() -> tuple[float, float]:
    """CPU time used so far by this process (the asyncio front end, all threads) and by its children
    (vLLM's engine-core processes)."""
    import psutil

    me = psutil.Process()
    children = 0.0
    for child in me.children(recursive=True):
        try:
            t = child.cpu_times()
            children += t.user + t.system
        except psutil.Error:
            pass
    t = me.cpu_times()
    return t.user + t.system, children


class RolloutTracker:
    """Counts rollout sequences in flight over time by wrapping ``engine.rollouts`` on the instance.

    A call for k prefixes becomes k one-prefix calls submitted together (same requests, same seeds:
    prefix i keeps seed + i * n), so each sequence leaves the count when its own result is back.

    Diagnostics beside it: every 20 ms while rollouts are in flight, vLLM's own count of requests running
    in its scheduler (rollouts and top-k steps of all requests; absent on other engines), and the CPU
    time of this process (the front end) and of its children (the engine) over the run."""

    SAMPLE_S = 0.02

    def __init__(self, engine) -> None:
        self.engine = engine
        self.in_flight = 0
        self.busy_seconds = 0.0  # time with >= 1 sequence in flight
        self.sequence_seconds = 0.0  # time integral of the in-flight count
        self.sequences = 0
        self.tokens = 0
        self._last = time.perf_counter()
        self._gauge = _engine_running_gauge()
        self._samples = 0
        self._engine_running_sum = 0.0
        self._in_flight_sum = 0
        self._sampler: asyncio.Task | None = None
        self.wall_seconds = 0.0
        self.front_end_cpu_seconds = self.engine_cpu_seconds = float("nan")

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(self.SAMPLE_S)
            if self.in_flight and self._gauge is not None:
                self._samples += 1
                self._in_flight_sum += self.in_flight
                self._engine_running_sum += sum(s.value for m in self._gauge.collect() for s in m.samples)

    @property
    def engine_running_mean(self) -> float | None:
        """Mean of vLLM's running-requests gauge over the samples taken while rollouts were in flight."""
        return self._engine_running_sum / self._samples if self._samples else None

    @property
    def sampled_in_flight_mean(self) -> float | None:
        return self._in_flight_sum / self._samples if self._samples else None

    def _advance(self) -> None:
        now = time.perf_counter()
        if self.in_flight:
            self.busy_seconds += now - self._last
            self.sequence_seconds += self.in_flight * (now - self._last)
        self._last = now

    @property
    def mean_in_flight(self) -> float:
        return self.sequence_seconds / self.busy_seconds if self.busy_seconds else 0.0

    def __enter__(self) -> RolloutTracker:
        original = self.engine.rollouts  # the bound method of the engine's class

        async def rollouts(prefixes, n, max_tokens, temperature=1.0, seed=None):
            async def one(i, prefix):
                self._advance()
                self.in_flight += n
                try:
                    group = (
                        await original(
                            [prefix],
                            n,
                            max_tokens,
                            temperature=temperature,
                            seed=None if seed is None else seed + i * n,
                        )
                    )[0]
                finally:
                    self._advance()
                    self.in_flight -= n
                self.sequences += len(group)
                self.tokens += sum(len(r.token_ids) for r in group)
                return group

            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prefixes))))

        self.engine.rollouts = rollouts
        self._sampler = asyncio.get_running_loop().create_task(self._sample())
        self._cpu_start, self._wall_start = _cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.engine.__dict__.pop("rollouts", None)
        if self._sampler is not None:
            self._sampler.cancel()
        (front_end, engine), (front_end0, engine0) = _cpu_seconds(), self._cpu_start
        self.wall_seconds = time.perf_counter() - self._wall_start
        self.front_end_cpu_seconds, self.engine_cpu_seconds = front_end - front_end0, engine - engine0


async def capacity_prefixes(engine, aligned, prompts: list[str], batch: int) -> list[list[int]]:
    """``batch`` prefixes shaped like rollout prefixes: the prompts' prompted-baseline prefixes, each with
    one of its top next tokens appended (as a decision's candidates are)."""
    from alignd.decoding.prompt import Prompt

    bases = []
    for p in prompts:
        chat = ({"role": "user", "content": p},)
        bases.append(aligned.baseline.prefix(Prompt(tuple(engine.render_chat(list(chat))), messages=chat)))
    per_prompt = math.ceil(batch / len(bases))
    tops = await engine.top_k_next(bases, min(per_prompt, engine.info.extra.get("max_logprobs", 20)))
    prefixes = []
    for j in range(per_prompt):
        for base, top in zip(bases, tops, strict=False):
            prefixes.append(base + [top[j % len(top)].token_id])
    return prefixes[:batch]


async def decode_throughput(engine, prefixes: list[list[int]], tokens: int, repeats: int = 3) -> dict:
    """The engine's batched greedy decode through the primitive TQ* itself calls: one ``rollouts`` call
    for all prefixes (one greedy continuation of up to ``tokens`` tokens each). One untimed run (prefix
    cache, warm-up), then the median tokens/s of ``repeats`` timed runs. ``full_length`` is the share of
    the B x ``tokens`` tokens generated (1.0 = no continuation stopped early at EOS)."""

    async def once() -> tuple[float, int]:
        start = time.perf_counter()
        groups = await engine.rollouts(prefixes, n=1, max_tokens=tokens, temperature=0.0)
        return time.perf_counter() - start, sum(len(g[0].token_ids) for g in groups)

    await once()
    rates, generated = [], 0
    for _ in range(max(1, repeats)):
        seconds, generated = await once()
        rates.append(generated / seconds)
    return {
        "batch": len(prefixes),
        "tokens_per_s": statistics.median(rates),
        "runs": rates,
        "full_length": generated / (len(prefixes) * tokens),
    }


async def capacity_at(engine, aligned, prompts, batch: float, tokens: int, repeats: int, cache: dict) -> float:
    """capacity(B), linearly interpolated between the neighbouring integer batch sizes (cached)."""
    lo, hi = max(1, math.floor(batch)), max(1, math.ceil(batch))
    for b in {lo, hi}:
        if b not in cache:
            cache[b] = await decode_throughput(
                engine, await capacity_prefixes(engine, aligned, prompts, b), tokens, repeats
            )
    if lo == hi:
        return cache[lo]["tokens_per_s"]
    w = batch - lo
    return (1 - w) * cache[lo]["tokens_per_s"] + w * cache[hi]["tokens_per_s"]
