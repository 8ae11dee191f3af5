"""``GET /v1/methods``: the registered methods and value sources, with this server's defaults and limits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from alignd.decoding import registry
from alignd.decoding.config import DecodingConfig, parameter_limits
from alignd.errors import InvalidRequestError
from alignd.protocol.native import MethodCard, MethodList, MethodParameter, ValueSourceCard

if TYPE_CHECKING:
    from alignd.decoding.generation import Generation


def describe_methods(generation: Generation) -> MethodList:
    methods = registry.methods()
    sources = registry.value_sources()
    cards = [
        MethodCard(
            name=spec.name,
            summary=spec.summary,
            family=spec.family,
            needs_reward=spec.needs_reward,
            needs_baseline=spec.needs_baseline,
            value_sources=list(sources) if spec.takes_value_source else None,
            parameters=_parameters(generation, spec.parameters, method=spec.name),
        )
        for spec in methods.values()
    ]
    value_method = next((m.name for m in methods.values() if m.takes_value_source), None)
    source_cards = []
    for source in sources.values():
        reason = source.unavailable(generation)
        source_cards.append(
            ValueSourceCard(
                name=source.name,
                summary=source.summary,
                family=source.family,
                in_engine=source.in_engine,
                available=reason is None,
                unavailable_reason=reason,
                parameters=_parameters(generation, source.parameters, method=value_method, value=source.name),
            )
        )
    return MethodList(data=cards, value_sources=source_cards)


def _parameters(generation: Generation, names: tuple[str, ...], **request: Any) -> list[MethodParameter]:
    settings = generation.settings
    schema = DecodingConfig.model_json_schema()["properties"]
    defaults = _bare_request(generation, request) if request.get("method") else None
    limits = parameter_limits(settings)
    return [
        MethodParameter(
            name=name,
            description=DecodingConfig.model_fields[name].description,
            default=getattr(defaults, name, None),
            limit=limits.get(name),
            json_schema=_field_schema(schema[name]),
        )
        for name in names
    ]


def _bare_request(generation: Generation, request: dict[str, Any]) -> DecodingConfig | None:
    """What a request of just these fields resolves to on this server, planned as a request is (the value source
    a bare transfer_q request gets, the implicit source's alpha = beta, ...); where this server cannot serve it
    (a value head it does not have), the settings' defaults; None where neither resolves."""
    try:
        config = DecodingConfig(**request)
    except ValidationError:
        return None
    for resolve in (generation.plan_decoding, lambda c: c.resolved(generation.settings)):
        try:
            return resolve(config)
        except InvalidRequestError:
            continue
    return None


def _field_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A field's JSON schema without its prose, and an optional field's (``anyOf [T, null]``) as T's, nullable."""
    out = {k: v for k, v in schema.items() if k not in ("description", "title", "anyOf")}
    branches = [b for b in schema.get("anyOf", []) if b.get("type") != "null"]
    if len(branches) == 1:
        out.update(branches[0], nullable=True)
    return out
