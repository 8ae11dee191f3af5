"""The baselines Transfer Q* transfers from: already aligned policies, by name.

    default    ALIGND_BASELINE_ADAPTER (a LoRA adapter trained by ``alignd train``; the committed one for
               the embedded model), else ALIGND_BASELINE_MODEL (a model folder on a second engine), else
               the prompted baseline
    prompted   the served model with ALIGND_BASELINE_SYSTEM_PROMPT (shares the served engine)
    <name>     each entry of ALIGND_BASELINES: {"adapter": folder}, {"model": folder}, {"system_prompt": ...}
               or {"url": "http://host:port"} (a remote ``vllm serve``; "served_model" names its model where
               it serves several)

ALIGND_BASELINE_URL makes ``default`` a remote ``vllm serve`` (before any adapter or model folder).

A request picks one with ``decoding.baseline`` (default: ``default``); ``GET /v1/baselines`` lists them
with where they come from (an adapter's manifest: reward, beta, data, metrics, the command).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from alignd.decoding.prompt import Policy
from alignd.errors import ConfigurationError, NotFoundError
from alignd.models.baseline_stack import IMPLICIT_KINDS
from alignd.models.engine import Engine
from alignd.models.factory import build_adapter_engine, build_model_engine, build_remote_engine
from alignd.rewards.registry import AlignedPolicy
from alignd.settings import Settings

if TYPE_CHECKING:
    from alignd.models.remote_engine import RemoteVLLMEngine

DEFAULT = "default"
PROMPTED = "prompted"

BaselineKind = Literal["adapter", "model", "prompted", "remote"]
SPEC_KEYS = ("adapter", "model", "system_prompt", "url")


@dataclass(frozen=True)
class ImplicitForm:
    """A baseline's exact token-level Q: ``beta * (log pi_BL - log pi_SFT)``, the Q of ``reward``."""

    beta: float
    reward: str  # the reward it was trained for (its manifest's), or its own implicit reward
    trained_by: str  # dpo | irft


@dataclass
class Baseline:
    name: str
    kind: BaselineKind
    policy: Policy
    source: str  # the adapter or model folder, or the system prompt
    provenance: dict = field(default_factory=dict)  # an adapter's manifest (how it was made)
    beta: float | None = None  # the KL coefficient it was trained with (its implicit reward's beta)

    @property
    def implicit_reward(self) -> str:
        """The name of its implicit reward against the served model (the reward registry offers it): the
        r_BL of indirect transfer from this baseline."""
        return f"{PROMPTED if self.policy.name == PROMPTED else self.name}_implicit"

    def aligned_policy(self) -> AlignedPolicy:
        return AlignedPolicy(self.policy.engine, self.policy.system_prompt, self.beta)

    def implicit_form(self) -> ImplicitForm | str:
        """Its exact token-level Q (decoding.value='implicit'), or why it has none: only a policy trained by
        DPO or IRFT from the served SFT model, with its beta, has one (``alignd_adapter.json``: ``kind``,
        ``beta``, and the base model's weights digest, which the adapter's load checked against the
        served weights)."""
        use = "use decoding.value='rollouts'"
        if self.kind == "prompted":
            return (
                f"baseline '{self.name}' is the SFT model with a system prompt, not a policy trained by DPO or "
                f"IRFT: it has no implicit Q; {use}"
            )
        if self.kind != "adapter":
            return (
                f"baseline '{self.name}' is a {self.kind} without alignd's adapter manifest: nothing says it is "
                f"a DPO or IRFT policy of the served model, or with which beta; {use}"
            )
        trained_by = self.provenance.get("kind")
        if trained_by not in IMPLICIT_KINDS:
            return (
                f"adapter '{self.name}' was not trained by DPO or IRFT (its manifest's kind: "
                f"{trained_by or 'none'}), so its log-ratio to the SFT model is not its Q; {use}"
            )
        if self.beta is None:
            return f"adapter '{self.name}': its manifest has no beta, the scale of its implicit Q; {use}"
        if not (self.provenance.get("base_model") or {}).get("weights_digest"):
            return (
                f"adapter '{self.name}': its manifest records no base-model weights digest, so it cannot be "
                f"checked to be a policy of the served SFT model; {use}"
            )
        reward = self.provenance.get("reward") or self.implicit_reward
        return ImplicitForm(beta=self.beta, reward=reward, trained_by=trained_by)


class BaselineRegistry:
    def __init__(self, baselines: dict[str, Baseline], owned_engines: list[Engine] | None = None) -> None:
        self._baselines = baselines
        self._owned = owned_engines or []

    def get(self, name: str | None = None) -> Baseline:
        try:
            return self._baselines[name or DEFAULT]
        except KeyError:
            raise NotFoundError(
                f"unknown baseline '{name}'; configured baselines: {', '.join(self.names())} (GET /v1/baselines)",
                param="decoding.baseline",
            ) from None

    def names(self) -> list[str]:
        return list(self._baselines)

    def all(self) -> list[Baseline]:
        return list(self._baselines.values())

    def aligned_policies(self) -> dict[str, AlignedPolicy]:
        """The baselines whose implicit rewards the reward registry must offer (the prompted baseline's,
        ``prompted_implicit``, is built in)."""
        return {b.name: b.aligned_policy() for b in self.all() if b.policy.name != PROMPTED}

    @property
    def owned_engines(self) -> list[Engine]:
        """The engines started for baselines, which :meth:`close` shuts down."""
        return list(self._owned)

    async def close(self) -> None:
        """Shut down the engines started for baselines (a merged adapter's, a model folder's)."""
        for engine in self._owned:
            await engine.shutdown()
        self._owned.clear()


def prompted_only(served: Engine, settings: Settings) -> BaselineRegistry:
    """The baselines of a configuration without adapters or baseline models: the prompted one, also
    the default (no engine to start)."""
    prompted = Baseline(
        PROMPTED,
        "prompted",
        Policy(served, PROMPTED, system_prompt=settings.baseline_system_prompt),
        settings.baseline_system_prompt,
    )
    return BaselineRegistry({DEFAULT: prompted, PROMPTED: prompted})


async def build_baselines(served: Engine, settings: Settings) -> BaselineRegistry:
    """Every configured baseline over the served engine (adapters in it, or on engines of their own)."""
    owned: list[Engine] = []

    async def from_spec(name: str, spec: dict) -> Baseline:
        if not isinstance(spec, dict) or len(set(SPEC_KEYS) & set(spec)) != 1:
            raise ConfigurationError(
                f"baseline '{name}' must be an object with exactly one of 'adapter', 'model', 'system_prompt' or 'url'"
            )
        if "url" in spec:
            # build_remote_engine is typed Engine; it returns a RemoteVLLMEngine (models/factory.py)
            remote = cast(
                "RemoteVLLMEngine",
                await build_remote_engine(name, str(spec["url"]), served, settings, model=spec.get("served_model")),
            )
            owned.append(remote)
            return Baseline(
                name, "remote", Policy(remote, name), f"{remote.base_url} ({remote.model or 'its only model'})"
            )
        if "system_prompt" in spec:
            prompt = str(spec["system_prompt"])
            return Baseline(name, "prompted", Policy(served, name, system_prompt=prompt), prompt)
        if "adapter" in spec:
            engine, adapter, own = await build_adapter_engine(served, name, spec["adapter"], settings)
            if own:
                owned.append(engine)
            beta = adapter.manifest.get("beta")
            return Baseline(
                name,
                "adapter",
                Policy(engine, name),
                str(adapter.path),
                adapter.provenance,
                float(beta) if beta is not None else None,
            )
        folder = Path(spec["model"]).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigurationError(f"baseline '{name}': {folder} is not a model folder (no config.json)")
        engine = await build_model_engine(folder, settings)
        owned.append(engine)
        return Baseline(name, "model", Policy(engine, name), str(folder))

    try:
        prompted = prompted_only(served, settings).get(PROMPTED)
        if settings.baseline_url:
            default = await from_spec(
                DEFAULT, {"url": settings.baseline_url, "served_model": settings.baseline_served_model}
            )
        elif (adapter_dir := settings.default_adapter_dir()) is not None:
            default = await from_spec(DEFAULT, {"adapter": str(adapter_dir)})
        elif settings.baseline_model:
            default = await from_spec(DEFAULT, {"model": settings.baseline_model})
        else:
            default = prompted
        baselines = {DEFAULT: default, PROMPTED: prompted}
        for name, spec in settings.baselines.items():
            if name in baselines:
                raise ConfigurationError(f"baseline name '{name}' is reserved ({DEFAULT}, {PROMPTED}): pick another")
            baselines[name] = await from_spec(name, spec)
    except BaseException:
        for engine in owned:
            await engine.shutdown()
        raise
    return BaselineRegistry(baselines, owned)
