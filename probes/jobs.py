"""A small in-process job manager: long analyses run off the request path, bounded in number.

A job is an ``async`` function of its :class:`Job`; it runs as an asyncio task on the server's loop
(heavy work inside it goes to worker threads). At most ``max_running`` jobs run at once, at most
``max_queued`` wait behind them (one more is refused with :class:`JobQueueFullError`, a 429), and at
most ``max_finished`` finished jobs are kept (the oldest is forgotten first). States:

    queued -> running -> done | failed | cancelled        (queued -> cancelled as well)

Cancellation is cooperative as well as asyncio's: :meth:`JobManager.cancel` sets the job's flag and
cancels its task; work running in a thread stops at its next :meth:`Job.report` call, which raises
:class:`JobCancelled` once the flag is set. A failed job keeps its error message, a cancelled one
the reason it was given.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from alignd.errors import ClientError, NotFoundError, ServerError

logger = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
FINISHED: tuple[str, ...] = ("done", "failed", "cancelled")


class JobQueueFullError(ClientError):
    """Too many jobs wait already; retry later or cancel one."""

    status = 429
    error_type = "rate_limit_error"
    code = "job_queue_full"


class JobConflictError(ClientError):
    """The job is not in a state that allows the operation (cancel a finished job, plot a running one)."""

    status = 409
    error_type = "invalid_request_error"
    code = "job_state_conflict"


class JobManagerClosedError(ServerError):
    status = 503
    error_type = "service_unavailable"
    code = "shutting_down"


class JobCancelled(Exception):
    """Raised inside a job's work (by :meth:`Job.report`) once the job was cancelled."""


@dataclass
class Job:
    id: str
    kind: str = "job"
    status: JobStatus = "queued"
    progress: float = 0.0
    error: str | None = None
    error_code: str | None = None  # "failed", "cancelled", "timeout", "shutdown"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    artifacts: dict[str, bytes] = field(default_factory=dict)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def report(self, fraction: float) -> None:
        """Record progress (0..1, never going back); raise :class:`JobCancelled` if cancelled.
        Safe to call from worker threads."""
        if self._cancel.is_set():
            raise JobCancelled(self.error or "cancelled")
        self.progress = max(self.progress, min(1.0, max(0.0, float(fraction))))


Work = Callable[[Job], Awaitable[Any]]


class JobManager:
    def __init__(
        self,
        *,
        max_queued: int = 8,
        max_running: int = 1,
        max_finished: int = 32,
        timeout_s: float | None = None,
        id_prefix: str = "job",
        on_finish: Callable[[Job], None] | None = None,
    ) -> None:
        if max_queued < 0 or max_running < 1 or max_finished < 0:
            raise ValueError("max_queued >= 0, max_running >= 1 and max_finished >= 0 are required")
        self.max_queued = max_queued
        self.max_running = max_running
        self.max_finished = max_finished
        self.timeout_s = timeout_s
        self.id_prefix = id_prefix
        self.on_finish = on_finish
        self._jobs: dict[str, Job] = {}
        self._slots: asyncio.Semaphore | None = None  # made on first submit, on the running loop
        self._closed = False

    # ------------------------------------------------------------------ queries
    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(
                f"no job '{job_id}' (finished jobs are kept until {self.max_finished} newer ones finish); "
                "GET the job list to see the known ones",
                param="job_id",
            )
        return job

    def list(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.created_at)

    def count(self, status: str) -> int:
        return sum(1 for j in self._jobs.values() if j.status == status)

    # ------------------------------------------------------------------ commands
    def submit(self, work: Work, *, kind: str = "job", meta: dict[str, Any] | None = None) -> Job:
        """Queue ``work(job)``; it starts as soon as a running slot is free. Needs a running loop."""
        if self._closed:
            raise JobManagerClosedError("the server is shutting down; no new jobs are accepted")
        # jobs that will wait for a slot: the queued ones beyond the free running slots (a job just
        # submitted is "queued" until its task takes a free slot)
        free = max(0, self.max_running - self.count("running"))
        waiting = max(0, self.count("queued") - free)
        if waiting >= self.max_queued:
            raise JobQueueFullError(
                f"{waiting} jobs are already queued (this server's limit is {self.max_queued}); wait for one to "
                "finish or cancel one, then retry"
            )
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_running)
        job = Job(id=f"{self.id_prefix}-{uuid.uuid4().hex[:20]}", kind=kind, meta=dict(meta or {}))
        self._jobs[job.id] = job
        job._task = asyncio.get_running_loop().create_task(self._run(job, work), name=job.id)
        # bookkeeping in a done-callback: it runs even for a task cancelled before its first step
        job._task.add_done_callback(lambda _task, job=job: self._after(job))
        return job

    def cancel(self, job_id: str, reason: str | None = None) -> Job:
        """Cancel a queued or running job now; its state says ``cancelled`` with ``reason``."""
        job = self.get(job_id)
        if job.finished:
            raise JobConflictError(f"job '{job_id}' has already finished ({job.status}); nothing to cancel")
        self._mark_cancelled(job, reason or "cancelled by request", "cancelled")
        return job

    async def close(self) -> None:
        """Cancel every unfinished job (reason: shutdown) and wait for their tasks."""
        self._closed = True
        tasks = []
        for job in list(self._jobs.values()):
            if not job.finished:
                self._mark_cancelled(job, "the server shut down before the job finished", "shutdown")
            if job._task is not None:
                tasks.append(job._task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ internals
    def _mark_cancelled(self, job: Job, reason: str, code: str) -> None:
        job.error, job.error_code = reason, code
        job._cancel.set()
        job.status = "cancelled"
        job.finished_at = time.time()
        if job._task is not None and not job._task.done():
            job._task.cancel()

    def _finish(self, job: Job, status: JobStatus, error: str | None = None, code: str | None = None) -> None:
        if job.finished:  # cancelled while it ran: keep the cancellation
            return
        job.status = status
        job.error, job.error_code = error, code
        job.finished_at = time.time()
        if status == "done":
            job.progress = 1.0

    async def _run(self, job: Job, work: Work) -> None:
        assert self._slots is not None
        try:
            async with self._slots:
                if job.finished:
                    return
                job.status, job.started_at = "running", time.time()
                if self.timeout_s:
                    result = await asyncio.wait_for(work(job), self.timeout_s)
                else:
                    result = await work(job)
            job.result = result
            self._finish(job, "done")
        except (JobCancelled, asyncio.CancelledError):
            if not job.finished:
                self._mark_cancelled(job, "cancelled", "cancelled")
        except TimeoutError:
            job._cancel.set()  # stop the work's worker thread at its next progress report
            self._finish(job, "failed", f"the job ran past this server's limit of {self.timeout_s:g} s", "timeout")
        except Exception as exc:  # the job's own failure: keep its message for the client
            logger.warning("job %s failed: %s: %s", job.id, type(exc).__name__, exc)
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            self._finish(job, "failed", message, "failed")

    def _after(self, job: Job) -> None:
        if not job.finished:  # the task ended without a verdict (cannot happen; be safe)
            self._finish(job, "failed", "the job ended without a result", "failed")
        self._evict()
        if self.on_finish is not None:
            try:
                self.on_finish(job)
            except Exception:  # metrics must never break the manager
                logger.exception("on_finish hook failed for %s", job.id)

    def _evict(self) -> None:
        finished = sorted((j for j in self._jobs.values() if j.finished), key=lambda j: j.finished_at or 0.0)
        for job in finished[: max(0, len(finished) - self.max_finished)]:
            del self._jobs[job.id]
