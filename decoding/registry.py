"""The one registry of decoding methods and of TQ*'s value sources.

A method is a :class:`MethodSpec`: what it needs (a reward, a baseline, a value source), which admission
family it is costed as, which request fields it reads, how a request for it is planned (defaults the
served stack knows better than the settings; what it refuses), and how one choice's decoder is built.
A value source (how ``transfer_q`` estimates ``Q(s, z)``) is a :class:`ValueSourceSpec` of the same kind.

The routing points (``Generation.plan``/``build``, the plan's family, the metrics label, the request
schema's enums, ``GET /v1/methods``) read these specs; nothing else compares method names. Adding a
method or a value source is one :func:`register_method` / :func:`register_value_source` call and its
decoder: the built-in ones are registered in :mod:`alignd.decoding.catalogue`, loaded on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from alignd.decoding.config import DecodingConfig
    from alignd.decoding.generation import Generation
    from alignd.decoding.methods import Decoder
    from alignd.decoding.values import ValueEstimator
    from alignd.models.engine import GenerationParams

# Admission families: a plain request is one engine request per answer; an aligned one costs many
# engine calls per answer (top-k, rollouts, rewards). Each family has its own slots (server/admission.py).
Family = Literal["plain", "aligned"]
PLAIN: Family = "plain"
ALIGNED: Family = "aligned"

# What a method or a value source does to a request before it is resolved (defaults from the served
# stack, refusals that need it), what it refuses about the engine parameters, and how it builds.
Prepare = Callable[["Generation", "DecodingConfig"], "DecodingConfig"]
CheckParams = Callable[["DecodingConfig", "GenerationParams"], None]
BuildDecoder = Callable[["Generation", "DecodingConfig", "GenerationParams"], "Decoder"]
BuildEstimator = Callable[["Generation", "DecodingConfig"], "ValueEstimator"]
NamedBaseline = Callable[["Generation", "DecodingConfig"], "tuple[str | None, str | None]"]


def _unchanged(generation: Generation, config: DecodingConfig) -> DecodingConfig:
    return config


def _no_check(config: DecodingConfig, params: GenerationParams) -> None:
    return None


def _no_baseline(generation: Generation, config: DecodingConfig) -> tuple[str | None, str | None]:
    return None, None


@dataclass(frozen=True)
class ValueSourceSpec:
    """How ``transfer_q`` estimates ``Q(s, z)``: ``decoding.value=<name>``."""

    name: str
    summary: str
    family: Family
    parameters: tuple[str, ...]
    build: BuildDecoder
    # values computed inside the engine's decode step: the engine reports no per-step values nor KL
    in_engine: bool = False
    # the estimator (for training targets; None where the values never leave the engine)
    estimator: BuildEstimator | None = None
    # what it refuses in the request alone (raises ValueError: the request's 400)
    check_config: Callable[[DecodingConfig], None] = lambda config: None
    prepare: Prepare = _unchanged
    check_params: CheckParams = _no_check
    # the baseline the values come from, as the diagnostics name it: (name, kind)
    named_baseline: NamedBaseline = _no_baseline
    # its own metrics series (None: the method's)
    metric_label: str | None = None
    # why this server cannot serve it (None: it can), for GET /v1/methods and the request's 400
    unavailable: Callable[[Generation], str | None] = lambda generation: None
    # top_k 0 (every token of the vocabulary a candidate) is valid, and exempt from ALIGND_MAX_TOP_K
    whole_vocabulary: bool = False
    # the admission family of a planned request where the served stack decides it (None: ``family``)
    family_of: Callable[[Generation, DecodingConfig], Family] | None = None


@dataclass(frozen=True)
class MethodSpec:
    """A decoding method: ``decoding.method=<name>``."""

    name: str
    summary: str
    family: Family
    parameters: tuple[str, ...]
    build: BuildDecoder
    needs_reward: bool = False
    needs_baseline: bool = False
    # the request's ``decoding.value`` picks how Q is estimated (then family, parameters, build and the
    # rest come from the value source)
    takes_value_source: bool = False
    prepare: Prepare = _unchanged
    check_params: CheckParams = _no_check
    named_baseline: NamedBaseline = _no_baseline
    # a plain request (no diagnostics) is served by the engine's own sampler, without a decoder
    is_engine_sampler: bool = False


_METHODS: dict[str, MethodSpec] = {}
_VALUE_SOURCES: dict[str, ValueSourceSpec] = {}
_BUILTINS = "alignd.decoding.catalogue"


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add (or replace, by name) a method; returns it."""
    _METHODS[spec.name] = spec
    return spec


def register_value_source(spec: ValueSourceSpec) -> ValueSourceSpec:
    """Add (or replace, by name) a value source of ``transfer_q``; returns it."""
    _VALUE_SOURCES[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)


def unregister_value_source(name: str) -> None:
    _VALUE_SOURCES.pop(name, None)


def methods() -> dict[str, MethodSpec]:
    """Every registered method, by name (the built-in ones first)."""
    importlib.import_module(_BUILTINS)  # registers the built-ins once, on first use
    return _METHODS


def value_sources() -> dict[str, ValueSourceSpec]:
    """Every registered value source, by name."""
    importlib.import_module(_BUILTINS)
    return _VALUE_SOURCES
