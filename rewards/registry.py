"""Rewards by name, built from the settings.

Always present (no network needed):
  positivity          VADER sentiment of the response
  length_penalty      -0.01 per word beyond 200 words
  prompted_implicit   implicit reward of the prompted baseline (the served model with the alignment
                      system prompt) against the served model itself

More come from ``ALIGND_REWARDS``, a JSON object ``{name: spec}``; a spec's ``type`` is one of:
  {"type": "positivity"}
  {"type": "length_penalty", "per_word": 0.01, "free_words": 200}
  {"type": "callable", "path": "package.module:function", "batched": false}
  {"type": "classifier", "model": "/path/to/RewardModel", "label_index": 0, "max_length": 2048,
                         "backend": "auto" | "vllm" | "hf"}
  {"type": "classifier", "url": "http://host:port" (vllm serve <reward model> --runner pooling),
                         "served_model": its name there, "label_index": 0}
  {"type": "implicit", "adapter": "/adapter folder" | "aligned_model": "/path" | "aligned_system_prompt": "..."
                       | "url": "http://host:port" (a remote vllm serve; "served_model": its model name there),
                       "reference_model": "/path" (default: the served model), "beta": 0.1}
  {"type": "weighted_sum", "terms": {"positivity": 1.0, "length_penalty": 0.5}}
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from alignd.errors import ConfigurationError, RewardNotFoundError
from alignd.models.engine import Engine
from alignd.rewards.base import Reward
from alignd.rewards.classifier import RemoteClassifierReward, load_classifier
from alignd.rewards.implicit import ImplicitReward
from alignd.rewards.programmatic import CallableReward, LengthPenaltyReward, PositivityReward, WeightedSumReward
from alignd.settings import Settings


@dataclass(frozen=True)
class AlignedPolicy:
    """An aligned model whose implicit reward the registry offers: an engine, the system prompt it
    runs with (a prompted baseline) and the beta it was aligned with (None: the server's)."""

    engine: Engine
    system_prompt: str | None = None
    beta: float | None = None


class RewardRegistry:
    def __init__(self, rewards: dict[str, Reward], extra_engines: dict[str, Engine] | None = None) -> None:
        self._rewards = rewards
        self._extra_engines = extra_engines or {}  # by the reward that needs it (the first, where shared)

    def get(self, name: str) -> Reward:
        try:
            return self._rewards[name]
        except KeyError:
            raise RewardNotFoundError(
                f"unknown reward '{name}'; configured rewards: {', '.join(sorted(self._rewards))} (GET /v1/rewards)",
                param="reward",
            ) from None

    def names(self) -> list[str]:
        return sorted(self._rewards)

    def all(self) -> list[Reward]:
        return [self._rewards[n] for n in self.names()]

    def engines(self) -> dict[str, Engine]:
        """The engines started for rewards (extra models, remote aligned models), by reward name."""
        return dict(self._extra_engines)

    async def close(self) -> None:
        for reward in self._rewards.values():
            await reward.close()
        for engine in self._extra_engines.values():
            await engine.shutdown()


def _spec_value(name: str, spec: dict, key: str, kind: type, default: Any = None, required: bool = False):
    if key not in spec:
        if required:
            raise ConfigurationError(f"reward '{name}' needs '{key}'")
        return default
    value = spec[key]
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"reward '{name}': '{key}' must be {kind.__name__}, got {value!r}") from exc


def _default_rewards(
    settings: Settings, served: Engine, aligned_baselines: Mapping[str, AlignedPolicy] | None
) -> dict[str, Reward]:
    """The rewards present without configuration, and the implicit reward of each aligned baseline."""
    rewards: dict[str, Reward] = {
        "positivity": PositivityReward("positivity"),
        "length_penalty": LengthPenaltyReward("length_penalty", per_word=0.01, free_words=200),
        "prompted_implicit": ImplicitReward(
            "prompted_implicit",
            aligned=served,
            reference=served,
            beta=settings.implicit_beta,
            aligned_system_prompt=settings.baseline_system_prompt,
            description="implicit reward of the prompted baseline (served model + alignment system prompt) "
            f"against the served model, beta={settings.implicit_beta}",
        ),
    }
    for baseline, aligned in (aligned_baselines or {}).items():
        name = f"{baseline}_implicit"
        if name in rewards:
            continue  # prompted_implicit is built in above
        beta = aligned.beta or settings.implicit_beta
        rewards[name] = ImplicitReward(
            name,
            aligned=aligned.engine,
            reference=served,
            beta=beta,
            aligned_system_prompt=aligned.system_prompt,
            description=f"implicit reward of the baseline '{baseline}' against the served model, beta={beta}",
        )
    return rewards


@dataclass
class _RewardsBuild:
    """One run of :func:`build_rewards`: the rewards so far, the engines started for them (by the reward
    that needs each, and by model path, so that rewards on the same model share one engine), and the
    weighted sums, built last since their terms may be any other reward."""

    settings: Settings
    served: Engine
    rewards: dict[str, Reward]
    extra_engines: dict[str, Engine] = field(default_factory=dict)
    engines_by_path: dict[str, Engine] = field(default_factory=dict)
    pending_sums: dict[str, dict] = field(default_factory=dict)

    def engine_for(self, reward: str, path: str) -> Engine:
        # Extra models for rewards run on the transformers engine in this process: they only score
        # (no generation), and a second vLLM engine would compete with the serving one for memory.
        from alignd.models.factory import build_reference_engine

        if path not in self.engines_by_path:
            self.engines_by_path[path] = build_reference_engine(path, self.settings)
            self.extra_engines[reward] = self.engines_by_path[path]
        return self.engines_by_path[path]


# A builder makes the reward `name` of one `type` from its spec; None: the reward is built later.
_RewardBuilder = Callable[[_RewardsBuild, str, dict], Awaitable[Reward | None]]


async def _positivity(build: _RewardsBuild, name: str, spec: dict) -> Reward:
    return PositivityReward(name)


async def _length_penalty(build: _RewardsBuild, name: str, spec: dict) -> Reward:
    return LengthPenaltyReward(
        name,
        per_word=_spec_value(name, spec, "per_word", float, 0.01),
        free_words=_spec_value(name, spec, "free_words", int, 0),
    )


async def _callable(build: _RewardsBuild, name: str, spec: dict) -> Reward:
    return CallableReward(name, _spec_value(name, spec, "path", str, required=True), bool(spec.get("batched", False)))


async def _classifier(build: _RewardsBuild, name: str, spec: dict) -> Reward:
    """A reward model: a local folder (``model``), or on a remote vllm serve --runner pooling (``url``)."""
    if "url" not in spec:
        return load_classifier(
            name,
            _spec_value(name, spec, "model", str, required=True),
            build.settings,
            backend=_spec_value(name, spec, "backend", str, "auto"),
            label_index=_spec_value(name, spec, "label_index", int, 0),
            max_length=_spec_value(name, spec, "max_length", int, None),
        )
    if "model" in spec:
        raise ConfigurationError(f"reward '{name}': give either 'model' (a folder) or 'url', not both")
    from alignd.models.factory import build_remote_classifier

    remote = await build_remote_classifier(
        name, _spec_value(name, spec, "url", str), build.settings, model=_spec_value(name, spec, "served_model", str)
    )
    build.extra_engines[name] = remote
    return RemoteClassifierReward(name, remote, label_index=_spec_value(name, spec, "label_index", int, 0))


async def _implicit(build: _RewardsBuild, name: str, spec: dict) -> Reward:
    """The implicit reward of an aligned model (an adapter, a model folder, a remote, or the reference
    with a system prompt) against a reference (the served model unless ``reference_model``)."""
    from alignd.models.factory import build_adapter_engine, build_remote_engine

    aligned_path = _spec_value(name, spec, "aligned_model", str)
    adapter_path = _spec_value(name, spec, "adapter", str)
    system_prompt = _spec_value(name, spec, "aligned_system_prompt", str)
    url = _spec_value(name, spec, "url", str)
    if sum(x is not None for x in (aligned_path, adapter_path, system_prompt, url)) != 1:
        raise ConfigurationError(
            f"implicit reward '{name}' needs exactly one of 'adapter', 'aligned_model', 'url' or "
            "'aligned_system_prompt'"
        )
    ref_path = _spec_value(name, spec, "reference_model", str)
    if (adapter_path is not None or url is not None) and ref_path:
        raise ConfigurationError(
            f"implicit reward '{name}': the reference of an adapter or a remote aligned model is the "
            "served model (a remote must tokenize like it); drop 'reference_model'"
        )
    reference = build.engine_for(name, ref_path) if ref_path else build.served
    beta_default = build.settings.implicit_beta
    if adapter_path is not None:
        aligned, adapter, own = await build_adapter_engine(build.served, name, adapter_path, build.settings)
        if own:
            build.extra_engines[name] = aligned
        beta_default = float(adapter.manifest.get("beta") or beta_default)
    elif url is not None:  # the aligned model on a remote vllm serve ("served_model": its name there)
        aligned = await build_remote_engine(
            name, url, build.served, build.settings, model=_spec_value(name, spec, "served_model", str)
        )
        build.extra_engines[name] = aligned
    else:
        aligned = build.engine_for(name, aligned_path) if aligned_path else reference
    return ImplicitReward(
        name,
        aligned=aligned,
        reference=reference,
        beta=_spec_value(name, spec, "beta", float, beta_default),
        aligned_system_prompt=system_prompt,
    )


async def _weighted_sum(build: _RewardsBuild, name: str, spec: dict) -> None:
    build.pending_sums[name] = spec  # built by _sum_of once every other reward exists


def _sum_of(name: str, spec: dict, rewards: Mapping[str, Reward]) -> Reward:
    terms = spec.get("terms")
    if not isinstance(terms, dict) or not terms:
        raise ConfigurationError(f"weighted reward '{name}' needs 'terms': {{reward name: weight}}")
    missing = [t for t in terms if t not in rewards]
    if missing:
        raise ConfigurationError(f"weighted reward '{name}' refers to unknown rewards {missing}")
    return WeightedSumReward(name, [(float(w), rewards[t]) for t, w in terms.items()])


# The builder of each reward `type` of ALIGND_REWARDS (see the module docstring).
_BUILDERS: dict[str, _RewardBuilder] = {
    "positivity": _positivity,
    "length_penalty": _length_penalty,
    "callable": _callable,
    "classifier": _classifier,
    "implicit": _implicit,
    "weighted_sum": _weighted_sum,
}


async def build_rewards(
    settings: Settings, served: Engine, aligned_baselines: Mapping[str, AlignedPolicy] | None = None
) -> RewardRegistry:
    """Build every configured reward. ``served`` is the serving engine, reused as the reference model
    (and as the prompted baseline) so no second copy of the weights is loaded. Each of
    ``aligned_baselines`` (by baseline name) gets its implicit reward against the served model,
    ``<name>_implicit``: the r_BL of indirect transfer from that baseline."""
    build = _RewardsBuild(settings, served, _default_rewards(settings, served, aligned_baselines))
    for name, spec in settings.rewards.items():
        if not isinstance(spec, dict) or "type" not in spec:
            raise ConfigurationError(f"reward '{name}' must be an object with a 'type'")
        kind = spec["type"]
        builder = _BUILDERS.get(kind) if isinstance(kind, str) else None
        if builder is None:
            raise ConfigurationError(f"reward '{name}': unknown type '{kind}' ({', '.join(_BUILDERS)})")
        reward = await builder(build, name, spec)
        if reward is not None:
            build.rewards[name] = reward
    for name, spec in build.pending_sums.items():
        build.rewards[name] = _sum_of(name, spec, build.rewards)
    return RewardRegistry(build.rewards, build.extra_engines)
