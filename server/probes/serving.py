"""Serving logic of the probe-analysis jobs.

The served engine is usually vLLM, which does not expose hidden states, so probes run on a
``transformers`` reference engine of the same model folder (:func:`alignd.models.factory.build_reference_engine`
on ``probe_device``), loaded on the first job and kept. When the served engine itself gives hidden
states (:attr:`Engine.supports_hidden_states`, as under ``ALIGND_ENGINE=hf``) probes use it, through
its ``run_on_model``, and never run at the same time as its generation. Other models to compare with
are named in ``ALIGND_PROBE_MODELS`` (``{"name": "/path/to/folder"}``); clients pick them by name,
never by path.

Every limit and default is a ``probe_*`` field of :class:`alignd.settings.Settings`, read from there
directly. The metrics (``alignd_probe_*``) are defined in :class:`alignd.server.metrics.ServerMetrics`;
this service binds the job gauge and reports finished jobs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from alignd.errors import ConfigurationError, InvalidRequestError, NotFoundError
from alignd.models.factory import build_reference_engine
from alignd.models.hf_engine import num_hidden_layers, text_config
from alignd.probes.analysis import AnalysisParams, analyse_conditions, plot_layers
from alignd.probes.fewshot import build_prompts, dataset_labels
from alignd.probes.hidden_states import Pooling, Site, layer_representations, resolve_layers
from alignd.probes.jobs import Job, JobConflictError, JobManager
from alignd.server.probes.protocol import (
    ProbeConditionInfo,
    ProbeJob,
    ProbeJobError,
    ProbeJobInfo,
    ProbeJobList,
    ProbeJobRequest,
    ProbeResult,
)

if TYPE_CHECKING:
    from alignd.models.engine import Engine
    from alignd.server.metrics import ServerMetrics
    from alignd.settings import Settings

logger = logging.getLogger(__name__)

SERVED = ""  # the key of the served model among the probe models
PLOT = "plot.png"
# Share of a job's progress bar per phase.
_HIDDEN, _ANALYSIS = 0.85, 0.13


@dataclass
class _Condition:
    name: str
    model: str  # SERVED or a name from probe_models
    texts: list[str]
    tokens: int = 0
    shots: int | None = None


@dataclass
class _Spec:
    conditions: list[_Condition]
    labels: dict[str, list[str]]
    layers: list[int]
    pooling: Pooling
    site: Site
    params: AnalysisParams


@dataclass
class _ModelMeta:
    tokenizer: Any
    num_layers: int
    max_len: int


class ProbeServing:
    def __init__(
        self, model_path: str, settings: Settings, metrics: ServerMetrics | None = None, *, engine: Engine | None = None
    ) -> None:
        """``engine``: an already open engine of ``model_path`` that gives hidden states, to reuse
        (tests, ``ALIGND_ENGINE=hf``); without one, a reference engine is loaded on the first job.
        ``metrics``: the server's metrics, whose probe-job gauge this service binds."""
        self.model_path = model_path
        self.settings = settings
        self.metrics = metrics
        self._engines: dict[str, Any] = {SERVED: engine} if engine is not None else {}
        self._meta: dict[str, _ModelMeta] = {}
        self._load_lock = asyncio.Lock()
        self._tokenize_lock = threading.Lock()  # one tokenizer call at a time (fast tokenizers are not re-entrant)
        self.jobs = JobManager(
            max_queued=settings.probe_max_queued_jobs,
            max_running=settings.probe_max_running_jobs,
            max_finished=settings.probe_max_finished_jobs,
            timeout_s=float(settings.probe_job_timeout_s) or None,  # 0 = no limit
            id_prefix="probe",
            on_finish=self._observe,
        )
        if metrics is not None:
            metrics.bind_probe_jobs(self.jobs.count)

    @classmethod
    def for_engine(cls, engine: Engine, settings: Settings, metrics: ServerMetrics | None = None) -> ProbeServing:
        """Probes of the served engine's model; reuses the engine itself when it gives hidden states. A
        remote SFT engine's model is probed in a local copy (its folder, loaded on the first probe job):
        hidden states never cross vLLM's HTTP API."""
        path = cast("str | None", engine.info.extra.get("local_model_dir")) or engine.info.model_path
        return cls(path, settings, metrics, engine=engine if engine.supports_hidden_states else None)

    async def close(self) -> None:
        await self.jobs.close()

    # ------------------------------------------------------------------ metrics
    def _observe(self, job: Job) -> None:
        if self.metrics is None:
            return
        started, finished = job.started_at, job.finished_at
        seconds = finished - started if started is not None and finished is not None else None
        self.metrics.observe_probe_job(job.status, seconds)

    # ------------------------------------------------------------------ models
    def _path(self, key: str) -> str:
        if key == SERVED:
            return self.model_path
        models = dict(self.settings.probe_models)
        if key not in models:
            known = ", ".join(sorted(models)) or "none are configured (ALIGND_PROBE_MODELS)"
            raise InvalidRequestError(f"unknown probe model '{key}'; known: {known}", param="compare.model")
        return str(models[key])

    async def _model_meta(self, key: str) -> _ModelMeta:
        """Tokenizer, depth and context length, without loading the weights (for request checks)."""
        if key not in self._meta:
            path = self._path(key)
            engine = self._engines.get(key)

            def load() -> _ModelMeta:
                from transformers import AutoConfig, AutoTokenizer

                # a tokenizer of its own: the engine's may be busy in a running job's thread
                # (no folder: only with an open engine, as in tests)
                tokenizer = AutoTokenizer.from_pretrained(path) if path else cast(Any, engine).tokenizer
                if engine is not None:  # what the open engine reports
                    layers, limit = engine.info.num_layers, engine.info.max_model_len
                else:  # the folder's config, without loading the weights
                    config = AutoConfig.from_pretrained(path)
                    layers = num_hidden_layers(config)
                    limit = int(getattr(text_config(config), "max_position_embeddings", 0) or 0) or None
                if layers is None:
                    raise ConfigurationError(f"probe model '{key or 'served'}' does not say how many layers it has")
                max_len = min(x for x in (limit, int(self.settings.max_model_len)) if x)
                return _ModelMeta(tokenizer, layers, max_len)

            self._meta[key] = await asyncio.to_thread(load)
        return self._meta[key]

    async def _engine(self, key: str):
        async with self._load_lock:
            if key not in self._engines:
                path = self._path(key)
                device = self.settings.probe_device
                logger.info("loading %s for probe analysis on %s", path, device)
                self._engines[key] = await asyncio.to_thread(build_reference_engine, path, self.settings, device=device)
            return self._engines[key]

    # ------------------------------------------------------------------ request -> job spec
    def _conditions(self, request: ProbeJobRequest) -> tuple[list[_Condition], dict[str, list[str]]]:
        labels = {name: [str(v) for v in values] for name, values in request.labels.items()}
        if request.dataset is not None:
            ds = request.dataset
            conditions = []
            for shots in ds.shots:
                try:
                    texts = build_prompts(
                        ds.items, shots, seed=ds.seed, style=ds.style, pool=ds.shot_pool, same_subject=ds.same_subject
                    )
                except ValueError as exc:
                    raise InvalidRequestError(str(exc), param="dataset.shots") from exc
                conditions.append(_Condition(f"{shots}-shot", SERVED, texts, shots=shots))
            if request.name and len(conditions) == 1:
                conditions[0].name = request.name
            labels = {**dataset_labels(ds.items), **labels}
        else:
            # ProbeJobRequest._check: 'texts' is given when 'dataset' is not
            conditions = [_Condition(request.name or "A", SERVED, list(cast("list[str]", request.texts)))]
        if request.compare is not None:
            c = request.compare
            model = c.model if c.model is not None else SERVED
            self._path(model)  # unknown names fail here
            texts = list(c.texts) if c.texts is not None else list(conditions[0].texts)
            name = cast(str, c.name or (c.model if c.texts is None else "B"))  # _something: without texts, a model
            conditions.append(_Condition(name, model, texts, shots=conditions[0].shots if c.texts is None else None))
        if len({c.name for c in conditions}) != len(conditions):
            raise InvalidRequestError(
                f"the two conditions have the same name '{conditions[0].name}'; give compare.name", param="compare.name"
            )
        return conditions, labels

    def _check_sizes(self, conditions: list[_Condition]) -> None:
        max_texts = self.settings.probe_max_texts
        max_chars = self.settings.probe_max_text_chars
        n = len(conditions[0].texts)
        if n > max_texts:
            raise InvalidRequestError(
                f"{n} texts is above this server's limit of {max_texts} per job (ALIGND_PROBE_MAX_TEXTS); "
                "split the job",
                param="texts",
            )
        for c in conditions:
            long = [i for i, t in enumerate(c.texts) if len(t) > max_chars]
            if long:
                i = long[0]
                raise InvalidRequestError(
                    f"text {i} of condition '{c.name}' has {len(c.texts[i])} characters, above this server's limit of "
                    f"{max_chars} (ALIGND_PROBE_MAX_TEXT_CHARS)",
                    param="texts",
                )

    async def _count_tokens(self, conditions: list[_Condition]) -> None:
        """Token counts per condition; texts beyond the model's context are a 400 now, not a failed job."""
        for c in conditions:
            meta = await self._model_meta(c.model)

            def lengths(texts=c.texts, tokenizer=meta.tokenizer) -> list[int]:
                with self._tokenize_lock:
                    return [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]

            counts = await asyncio.to_thread(lengths)
            long = [i for i, k in enumerate(counts) if k > meta.max_len]
            if long:
                i = long[0]
                raise InvalidRequestError(
                    f"text {i} of condition '{c.name}' has {counts[i]} tokens, above the model's context of "
                    f"{meta.max_len}; {len(long)} text(s) are too long",
                    param="texts",
                )
            c.tokens = sum(counts)
        total = sum(c.tokens for c in conditions)
        limit = self.settings.probe_max_job_tokens
        if total > limit:
            raise InvalidRequestError(
                f"this job has {total} tokens over all conditions, above this server's limit of {limit} "
                "(ALIGND_PROBE_MAX_JOB_TOKENS); send fewer or shorter texts",
                param="texts",
            )

    async def _layers(self, request: ProbeJobRequest, conditions: list[_Condition]) -> list[int]:
        depths = {c.model: (await self._model_meta(c.model)).num_layers for c in conditions}
        if len(set(depths.values())) > 1 and request.layers == "all":
            shown = ", ".join(f"{k or 'served'}: {v}" for k, v in depths.items())
            raise InvalidRequestError(
                f"the models have different depths ({shown}); list the layers to compare", param="layers"
            )
        try:
            return resolve_layers(request.layers, min(depths.values()))
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="layers") from exc

    # ------------------------------------------------------------------ endpoints
    async def submit(self, request: ProbeJobRequest) -> ProbeJob:
        conditions, labels = self._conditions(request)
        self._check_sizes(conditions)
        layers = await self._layers(request, conditions)
        await self._count_tokens(conditions)
        spec = _Spec(conditions, labels, layers, request.pooling, request.site, request.params.to_analysis())
        info = ProbeJobInfo(
            n_texts=len(conditions[0].texts),
            conditions=[
                ProbeConditionInfo(
                    name=c.name,
                    model=c.model or self._served_name(),
                    n_texts=len(c.texts),
                    tokens=c.tokens,
                    shots=c.shots,
                )
                for c in conditions
            ],
            layers=layers,
            labels=list(labels),
            pooling=request.pooling,
            site=request.site,
        )
        job = self.jobs.submit(lambda job: self._run(job, spec), kind="probe", meta={"info": info})
        return self._describe(job, with_result=False)

    def get(self, job_id: str) -> ProbeJob:
        return self._describe(self.jobs.get(job_id), with_result=True)

    def list(self) -> ProbeJobList:
        return ProbeJobList(data=[self._describe(j, with_result=False) for j in self.jobs.list()])

    def cancel(self, job_id: str, reason: str | None = None) -> ProbeJob:
        return self._describe(self.jobs.cancel(job_id, reason), with_result=False)

    def plot(self, job_id: str) -> bytes:
        job = self.jobs.get(job_id)
        if job.status != "done":
            why = f": {job.error}" if job.error else ""
            raise JobConflictError(f"job '{job_id}' is {job.status}{why}; its plot exists once it is done")
        png = job.artifacts.get(PLOT)
        if png is None:
            raise NotFoundError(f"job '{job_id}' has no plot: {job.meta.get('plot_error', 'plotting failed')}")
        return png

    # ------------------------------------------------------------------ the job itself
    async def _run(self, job: Job, spec: _Spec) -> dict:
        timing: dict[str, float] = {}
        start = time.perf_counter()
        n_cond = len(spec.conditions)
        reps = {}
        for ci, cond in enumerate(spec.conditions):
            t = time.perf_counter()
            engine = await self._engine(cond.model)
            timing["load_s"] = timing.get("load_s", 0.0) + time.perf_counter() - t
            job.report(_HIDDEN * ci / n_cond)  # raises if cancelled meanwhile
            t = time.perf_counter()

            def progress(f: float, ci: int = ci) -> None:
                job.report(_HIDDEN * (ci + f) / n_cond)

            reps[cond.name] = await layer_representations(
                engine,
                cond.texts,
                spec.layers,
                spec.pooling,
                self.settings.probe_batch_size,
                progress,
                site=spec.site,
                max_batch_tokens=self.settings.probe_max_batch_tokens,
            )
            timing["hidden_states_s"] = timing.get("hidden_states_s", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        result = await asyncio.to_thread(
            analyse_conditions, reps, spec.labels, spec.params, lambda f: job.report(_HIDDEN + _ANALYSIS * f)
        )
        timing["analysis_s"] = time.perf_counter() - t
        t = time.perf_counter()
        title = f"{self._served_name()}: " + " vs ".join(c.name for c in spec.conditions)
        try:
            job.artifacts[PLOT] = await asyncio.to_thread(plot_layers, result, title=title)
        except Exception as exc:  # the numbers stand without the picture
            logger.warning("plot of %s failed: %s", job.id, exc)
            job.meta["plot_error"] = f"{type(exc).__name__}: {exc}"
        timing["plot_s"] = time.perf_counter() - t
        timing["total_s"] = time.perf_counter() - start
        result["timing"] = {k: round(v, 3) for k, v in timing.items()}
        return result

    # ------------------------------------------------------------------ views
    def _served_name(self) -> str:
        return self.settings.model_name or self.model_path.rstrip("/").split("/")[-1] or "served"

    def _describe(self, job: Job, *, with_result: bool) -> ProbeJob:
        error = ProbeJobError(message=job.error, code=job.error_code) if job.error else None
        return ProbeJob(
            id=job.id,
            status=job.status,
            progress=round(job.progress, 4),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            error=error,
            request=job.meta["info"],
            result=ProbeResult.model_validate(job.result) if with_result and job.status == "done" else None,
            plot_url=f"/v1/probe/jobs/{job.id}/plot.png" if job.status == "done" and PLOT in job.artifacts else None,
        )
