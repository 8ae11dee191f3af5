"""Thin routes of the reward endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from alignd.server.errors import ERROR_RESPONSES
from alignd.server.rewards.protocol import CompareRequest, CompareResponse, RewardList, RewardRequest, RewardResponse
from alignd.server.rewards.serving import RewardServing

router = APIRouter(tags=["rewards"], responses=ERROR_RESPONSES)


def get_reward_serving(request: Request) -> RewardServing:
    return request.app.state.reward_serving


@router.get("/v1/rewards", response_model=RewardList)
async def list_rewards(serving: RewardServing = Depends(get_reward_serving)):
    return serving.list()


@router.post("/v1/rewards", response_model=RewardResponse, response_model_exclude_none=True)
async def score(body: RewardRequest, serving: RewardServing = Depends(get_reward_serving)):
    return await serving.score(body)


@router.post("/v1/rewards/compare", response_model=CompareResponse)
async def compare(body: CompareRequest, serving: RewardServing = Depends(get_reward_serving)):
    return await serving.compare(body)
