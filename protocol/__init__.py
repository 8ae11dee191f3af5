"""Wire models shared by the server and the typed client: what alignd's APIs return.

Pure pydantic, importing nothing else of alignd, so that ``alignd.clients`` can use the same models as
the server without installing or reading any of the server (the layering contract in pyproject.toml
checks it).
"""

from alignd.protocol.common import ChatMessage, TextContentPart, UsageInfo
from alignd.protocol.diagnostics import (
    AlignmentSummary,
    BaselineStep,
    BestOfNStep,
    BlockCandidate,
    BlockStep,
    DecodingCost,
    SampleCandidate,
    StepCost,
    TokenCandidate,
    ValueGuidedStep,
)
from alignd.protocol.native import (
    EngineHealthCard,
    GenerateChoice,
    GeneratedTokenOut,
    GenerateResponse,
    GenerateStreamEvent,
    HealthResponse,
    TokenLogprobOut,
)

__all__ = [
    "AlignmentSummary",
    "BaselineStep",
    "BestOfNStep",
    "BlockCandidate",
    "BlockStep",
    "ChatMessage",
    "DecodingCost",
    "EngineHealthCard",
    "GenerateChoice",
    "GenerateResponse",
    "GenerateStreamEvent",
    "GeneratedTokenOut",
    "HealthResponse",
    "SampleCandidate",
    "StepCost",
    "TextContentPart",
    "TokenCandidate",
    "TokenLogprobOut",
    "UsageInfo",
    "ValueGuidedStep",
]
