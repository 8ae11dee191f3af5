"""Thin routes of the probe-analysis jobs."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response

from alignd.errors import EngineNotReadyError
from alignd.server.errors import ERROR_RESPONSES, ErrorResponse
from alignd.server.probes.protocol import ProbeJob, ProbeJobList, ProbeJobRequest
from alignd.server.probes.serving import ProbeServing

router = APIRouter(
    tags=["probes"],
    responses={
        **ERROR_RESPONSES,
        409: {"model": ErrorResponse, "description": "The job is not in a state that allows this"},
        429: {"model": ErrorResponse, "description": "Too many jobs queued"},
    },
)


def get_probe_serving(request: Request) -> ProbeServing:
    serving = getattr(request.app.state, "probe_serving", None)
    if serving is None:
        raise EngineNotReadyError("probe analysis is not ready on this server yet")
    return serving


@router.post("/v1/probe/jobs", response_model=ProbeJob, status_code=202)
async def submit_job(body: ProbeJobRequest, serving: ProbeServing = Depends(get_probe_serving)):
    """Queue a probe job; poll ``GET /v1/probe/jobs/{id}`` for its progress and result."""
    return await serving.submit(body)


@router.get("/v1/probe/jobs", response_model=ProbeJobList)
async def list_jobs(serving: ProbeServing = Depends(get_probe_serving)):
    return serving.list()


@router.get("/v1/probe/jobs/{job_id}", response_model=ProbeJob)
async def get_job(job_id: str, serving: ProbeServing = Depends(get_probe_serving)):
    return serving.get(job_id)


@router.delete("/v1/probe/jobs/{job_id}", response_model=ProbeJob)
async def cancel_job(
    job_id: str,
    reason: str | None = Query(None, max_length=500, description="Kept as the job's error message."),
    serving: ProbeServing = Depends(get_probe_serving),
):
    """Cancel a queued or running job (409 if it has finished)."""
    return serving.cancel(job_id, reason)


@router.get(
    "/v1/probe/jobs/{job_id}/plot.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "Per-layer curves (ID, peaks, ARI, overlaps)"}},
)
async def job_plot(job_id: str, serving: ProbeServing = Depends(get_probe_serving)):
    return Response(serving.plot(job_id), media_type="image/png")
