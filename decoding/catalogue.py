"""alignd's built-in decoding methods and value sources, registered in :mod:`alignd.decoding.registry`.

Each entry says what the method needs, what it refuses and how its decoder is built (the decoders are in
:mod:`alignd.decoding.methods`, the value estimators in :mod:`alignd.decoding.values`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from alignd.decoding.baselines import DEFAULT
from alignd.decoding.config import resolved_field
from alignd.decoding.methods import (
    BaselineDecoder,
    BestOfNDecoder,
    BlockwiseCDDecoder,
    Decoder,
    HeadTransferQDecoder,
    SFTDecoder,
    ValueGuidedDecoder,
)
from alignd.decoding.registry import (
    ALIGNED,
    PLAIN,
    Family,
    MethodSpec,
    ValueSourceSpec,
    register_method,
    register_value_source,
)
from alignd.decoding.values import ImplicitValue, PartialRewardValue, RolloutValueEstimator, ValueEstimator
from alignd.errors import InvalidRequestError

if TYPE_CHECKING:
    from alignd.decoding.config import DecodingConfig
    from alignd.decoding.generation import Generation
    from alignd.models.engine import GenerationParams

# request fields, by what they drive
VALUE_GUIDED = ("alpha", "top_k", "reward")
GATING = ("block_size", "confidence_threshold")
ROLLOUTS = ("num_rollouts", "rollout_len", "rollout_temperature", "prune")


# ---------------------------------------------------------------------------- planning
def baseline_defaults(generation: Generation, config: DecodingConfig) -> DecodingConfig:
    """What the chosen baseline knows better than the settings: its implicit reward is the r_BL of
    indirect transfer (unless the request or ALIGND_BASELINE_REWARD names another), and beta is the
    KL coefficient it was trained with."""
    baseline = generation.baselines.get(config.baseline)  # an unknown name fails here, before any work
    updates: dict[str, object] = {}
    if config.baseline_reward is None and generation.settings.baseline_reward is None:
        updates["baseline_reward"] = baseline.implicit_reward
    if config.beta is None and baseline.beta is not None:
        updates["beta"] = baseline.beta
    return config.model_copy(update=updates) if updates else config


def head_defaults(generation: Generation, config: DecodingConfig) -> DecodingConfig:
    """The head was distilled for one target reward from one baseline's rollouts: a request for another
    is refused (naming the head's), and the diagnostics name the head's."""
    head = generation.value_head or {}  # there is one (head_unavailable)
    reward = head.get("reward")
    if config.reward is not None and config.reward != reward:
        raise InvalidRequestError(
            f"this server's value head was trained for reward '{reward}', not '{config.reward}': ask for "
            f"reward '{reward}', or use decoding.value='rollouts' for any reward",
            param="decoding.reward",
        )
    served, described = generation.head_baseline()
    if config.baseline is not None and config.baseline != served:
        raise InvalidRequestError(
            f"this server's value head was distilled from baseline '{described}', not '{config.baseline}': "
            "use decoding.value='rollouts' to transfer from another baseline",
            param="decoding.baseline",
        )
    # alpha defaults to the head's own (its manifest's: the alpha its values were fitted for; a head distilled from
    # implicit targets is in units of beta * log-ratio, where alpha = beta reproduces the baseline)
    alpha = config.alpha if config.alpha is not None else head.get("alpha")
    return config.model_copy(update={"reward": reward, "baseline": served, "alpha": alpha})


def head_unavailable(generation: Generation) -> str | None:
    if generation.value_head:
        return None
    return (
        "decoding.value='head' needs a value head, and this server has none (ALIGND_VALUE_HEAD: a folder made "
        "by 'alignd train value-head'); use decoding.value='rollouts'"
    )


def check_head_config(config: DecodingConfig) -> None:
    if config.transfer == "indirect":
        raise ValueError(
            "decoding.value='head' is direct transfer (the head was distilled from rollouts "
            "scored by its target reward); use value='rollouts' for indirect transfer"
        )
    if config.block_size != 1 or config.confidence_threshold is not None:
        raise ValueError(
            "block_size and confidence_threshold save rollouts; with decoding.value='head' "
            "every token is value-guided at no rollout cost: leave them unset"
        )


def _penalty_param(params: GenerationParams) -> str:
    return "presence_penalty" if params.presence_penalty else "frequency_penalty"


def penalties_need_single_token_blocks(config: DecodingConfig, params: GenerationParams) -> None:
    # The SFT model writes a block's other tokens as a fresh engine request, which vLLM would penalise
    # for that request's own tokens only, not the answer's: refuse rather than apply another penalty.
    if (params.presence_penalty or params.frequency_penalty) and config.block_size > 1:
        raise InvalidRequestError(
            "presence_penalty and frequency_penalty need decoding.block_size=1: the SFT model writes a "
            "block's other tokens as its own engine request, whose penalties would count that request's "
            "tokens only, not the answer's",
            param="decoding.block_size",
        )


def cd_penalties(config: DecodingConfig, params: GenerationParams) -> None:
    if (params.presence_penalty or params.frequency_penalty) and config.cd_mode == "block":
        raise InvalidRequestError(
            "presence_penalty and frequency_penalty are not available with cd_mode=block: each block is "
            "sampled as its own engine request, whose penalties would count the block's tokens only, not "
            "the answer's; use cd_mode=token (penalties apply to every candidate) or drop the penalties",
            param=_penalty_param(params),
        )
    penalties_need_single_token_blocks(config, params)


def implicit_defaults(generation: Generation, config: DecodingConfig) -> DecodingConfig:
    """The baseline's implicit form fixes beta and the reward the values belong to; alpha defaults to beta
    (the rule is then the baseline itself over the candidates)."""
    rollout_fields = [
        f
        for f in ("num_rollouts", "rollout_len", "rollout_temperature", "baseline_reward")
        if getattr(config, f) is not None
    ]
    if rollout_fields:  # the request's own fields (the settings' defaults fill them later)
        raise InvalidRequestError(
            f"decoding.value='implicit' runs no rollouts: leave {', '.join(rollout_fields)} unset",
            param=f"decoding.{rollout_fields[0]}",
        )
    form = generation.baselines.get(config.baseline).implicit_form()
    if isinstance(form, str):
        raise InvalidRequestError(form, param="decoding.baseline")
    if config.beta is not None and config.beta != form.beta:
        raise InvalidRequestError(
            f"decoding.beta={config.beta:g}, but baseline '{config.baseline or DEFAULT}' was trained with beta "
            f"{form.beta:g}, which its implicit Q is scaled by: leave beta unset",
            param="decoding.beta",
        )
    if config.reward is not None and config.reward != form.reward:
        raise InvalidRequestError(
            f"decoding.value='implicit' gives the Q of the baseline's own reward, '{form.reward}', not of "
            f"'{config.reward}': ask for reward '{form.reward}', or use decoding.value='rollouts' (direct, or "
            "indirect transfer) for another reward",
            param="decoding.reward",
        )
    alpha = form.beta if config.alpha is None else config.alpha
    return config.model_copy(update={"beta": form.beta, "reward": form.reward, "alpha": alpha})


# the request fields only rollouts read: a request that sets one asked for rollouts
ROLLOUT_ONLY = ("num_rollouts", "rollout_len", "rollout_temperature", "baseline_reward", "prune")


def implicit_serves(generation: Generation, config: DecodingConfig) -> bool:
    """Whether decoding.value='implicit' serves this request as it stands, with no 400: its baseline has an
    implicit Q, the target reward is that baseline's own, the transfer is direct, beta (if given) is the
    baseline's, and no field that only rollouts read is set."""
    if config.transfer != "direct" or any(getattr(config, f) is not None for f in ROLLOUT_ONLY):
        return False
    form = generation.baselines.get(config.baseline).implicit_form()
    if isinstance(form, str):
        return False
    reward = config.reward or generation.settings.target_reward
    return reward == form.reward and config.beta in (None, form.beta)


def choose_value_source(generation: Generation, config: DecodingConfig) -> DecodingConfig:
    """A transfer_q request that names no value source gets the best measured one that serves it: the baseline's
    exact implicit Q (positivity 0.858 at alpha = beta against rollout TQ*'s 0.716 and CD's 0.757 on the 112
    evaluation prompts, at a fraction of the cost: docs/EVALUATION.md), else rollouts, so that no request that
    rollouts serve becomes a 400 (ALIGND_DECODING_VALUE=rollouts: always rollouts)."""
    if "value" in config.model_fields_set or generation.settings.decoding_value == "rollouts":
        return config
    return config.model_copy(update={"value": "implicit"}) if implicit_serves(generation, config) else config


def implicit_unavailable(generation: Generation) -> str | None:
    forms = [baseline.implicit_form() for baseline in generation.baselines.all()]
    if any(not isinstance(form, str) for form in forms):
        return None
    return (
        "decoding.value='implicit' needs a baseline trained by DPO or IRFT from the served model (an adapter "
        "made by 'alignd train dpo|irft', named by ALIGND_BASELINE_ADAPTER or ALIGND_BASELINES), and this "
        "server has none (GET /v1/baselines); use decoding.value='rollouts'"
    )


def check_implicit_config(config: DecodingConfig) -> None:
    if config.transfer == "indirect":
        raise ValueError(
            "decoding.value='implicit' is the baseline's own Q (direct transfer); use value='rollouts' "
            "for indirect transfer"
        )


def configured_baseline(generation: Generation, config: DecodingConfig) -> tuple[str | None, str | None]:
    return config.baseline or DEFAULT, generation.baselines.get(config.baseline).kind


def head_baseline(generation: Generation, config: DecodingConfig) -> tuple[str | None, str | None]:
    """The baseline the head was distilled from, served here or not."""
    made = (generation.value_head or {}).get("baseline") or {}
    return generation.head_baseline()[0] or made.get("name"), made.get("kind")


# ---------------------------------------------------------------------------- decoders
def value_guided(
    generation: Generation, config: DecodingConfig, params: GenerationParams, estimator: ValueEstimator
) -> Decoder:
    return ValueGuidedDecoder(
        generation.sft,
        estimator,
        params,
        alpha=resolved_field(config.alpha),
        top_k=resolved_field(config.top_k),
        block_size=config.block_size,
        confidence_threshold=config.confidence_threshold,
        prune=bool(config.prune),
        record_candidates=config.diagnostics,
    )


def rollout_values(generation: Generation, config: DecodingConfig, *, from_baseline: bool) -> ValueEstimator:
    """Q from rollouts of the baseline (TQ*) or of the SFT model (CD), scored by the target reward."""
    rewards = generation.rewards
    return RolloutValueEstimator(
        generation.baselines.get(config.baseline).policy if from_baseline else generation.sft,
        rewards.get(resolved_field(config.reward)),
        num_rollouts=resolved_field(config.num_rollouts),
        rollout_len=resolved_field(config.rollout_len),
        temperature=resolved_field(config.rollout_temperature),
        baseline_reward=rewards.get(resolved_field(config.baseline_reward)) if config.indirect else None,
        beta=resolved_field(config.beta),
    )


def build_sft(generation: Generation, config: DecodingConfig, params: GenerationParams) -> Decoder:
    return SFTDecoder(generation.sft, params)


def build_baseline(generation: Generation, config: DecodingConfig, params: GenerationParams) -> Decoder:
    return BaselineDecoder(
        generation.sft, generation.baselines.get(config.baseline).policy, params, record_candidates=config.diagnostics
    )


def build_args(generation: Generation, config: DecodingConfig, params: GenerationParams) -> Decoder:
    return value_guided(
        generation,
        config,
        params,
        PartialRewardValue(generation.rewards.get(resolved_field(config.reward)), generation.engine.decode),
    )


def build_cd(generation: Generation, config: DecodingConfig, params: GenerationParams) -> Decoder:
    if config.cd_mode == "block":
        return BlockwiseCDDecoder(
            generation.sft,
            generation.rewards.get(resolved_field(config.reward)),
            params,
            num_blocks=resolved_field(config.num_blocks),
            block_len=resolved_field(config.block_len),
            alpha=resolved_field(config.alpha),
            block_temperature=resolved_field(config.sample_temperature),
            record_candidates=config.diagnostics,
        )
    return value_guided(generation, config, params, rollout_values(generation, config, from_baseline=False))


def build_best_of_n(generation: Generation, config: DecodingConfig, params: GenerationParams) -> Decoder:
    return BestOfNDecoder(
        generation.sft,
        generation.rewards.get(resolved_field(config.reward)),
        params,
        num_samples=resolved_field(config.num_samples),
        sample_temperature=resolved_field(config.sample_temperature),
        record_candidates=config.diagnostics,
    )


def build_tq_rollouts(generation: Generation, config: DecodingConfig, params: GenerationParams) -> Decoder:
    return value_guided(generation, config, params, rollout_values(generation, config, from_baseline=True))


def build_tq_head(generation: Generation, config: DecodingConfig, params: GenerationParams) -> Decoder:
    return HeadTransferQDecoder(
        generation.sft,
        params,
        alpha=resolved_field(config.alpha),
        top_k=resolved_field(config.top_k),
        record_candidates=config.diagnostics,
    )


def implicit_values(generation: Generation, config: DecodingConfig) -> ValueEstimator:
    return ImplicitValue(
        generation.baselines.get(config.baseline).policy, generation.sft, float(resolved_field(config.beta))
    )


def implicit_in_engine(generation: Generation, config: DecodingConfig) -> bool:
    """The served engine computes this baseline's implicit values in its own step (ALIGND_IMPLICIT_IN_ENGINE:
    it carries the baseline's stack); with diagnostics alignd scores the steps itself (the same rule, with
    every candidate's values and the KL, which stay inside the engine otherwise)."""
    # EngineInfo.extra is typed object; its "baseline_stack" is the stack's config dict, or None (VLLMEngine)
    stack = cast("dict[str, Any] | None", generation.engine.info.extra.get("baseline_stack"))
    if not stack or config.diagnostics or config.block_size != 1 or config.confidence_threshold is not None:
        return False  # (block_size and confidence_threshold are alignd's own step loop's)
    baseline = generation.baselines.get(config.baseline)
    return baseline.kind == "adapter" and str(Path(baseline.source).resolve()) == stack["adapter"]


def implicit_family(generation: Generation, config: DecodingConfig) -> Family:
    # in the engine: one engine request an answer, as plain decoding; else two scoring requests a token
    return PLAIN if implicit_in_engine(generation, config) else ALIGNED


def build_tq_implicit(generation: Generation, config: DecodingConfig, params: GenerationParams) -> Decoder:
    if implicit_in_engine(generation, config):
        return HeadTransferQDecoder(
            generation.sft,
            params,
            alpha=resolved_field(config.alpha),
            top_k=resolved_field(config.top_k),
            value="implicit",
        )
    return value_guided(generation, config, params, implicit_values(generation, config))


def build_by_value_source(generation: Generation, config: DecodingConfig, params: GenerationParams) -> Decoder:
    source = config.value_source
    assert source is not None  # transfer_q takes one (registry.MethodSpec.takes_value_source)
    return source.build(generation, config, params)


# ---------------------------------------------------------------------------- the registry's entries
register_method(
    MethodSpec(
        "sft",
        "The SFT model's own decoding (greedy or sampled): the engine's sampler, one request per answer.",
        PLAIN,
        (),
        build_sft,
        is_engine_sampler=True,
    )
)
register_method(
    MethodSpec(
        "baseline",
        "The baseline (aligned) policy sampled directly, one request per answer.",
        PLAIN,
        ("baseline",),
        build_baseline,
        needs_baseline=True,
        prepare=baseline_defaults,
        named_baseline=configured_baseline,
    )
)
register_method(
    MethodSpec(
        "transfer_q",
        "Transfer Q*: pi_SFT(z|s) exp(Q(s, z) / alpha) over the SFT model's top-k, with Q of the "
        "baseline estimated by the value source (decoding.value).",
        ALIGNED,
        (*VALUE_GUIDED, "baseline", "value"),
        build_by_value_source,
        needs_reward=True,
        needs_baseline=True,
        takes_value_source=True,
        prepare=choose_value_source,
    )
)
register_method(
    MethodSpec(
        "args",
        "ARGS: pi_SFT(z|s) exp(r(s + z) / alpha), the reward of the partial answer as the value.",
        ALIGNED,
        (*VALUE_GUIDED, *GATING),
        build_args,
        needs_reward=True,
        check_params=penalties_need_single_token_blocks,
    )
)
register_method(
    MethodSpec(
        "cd",
        "Controlled decoding: Q from the SFT model's own rollouts, token-wise or block-wise.",
        ALIGNED,
        (*VALUE_GUIDED, *GATING, *ROLLOUTS, "cd_mode", "num_blocks", "block_len", "sample_temperature"),
        build_cd,
        needs_reward=True,
        check_params=cd_penalties,
    )
)
register_method(
    MethodSpec(
        "best_of_n",
        "N whole answers from the SFT model; the best by the target reward.",
        ALIGNED,
        ("reward", "num_samples", "sample_temperature"),
        build_best_of_n,
        needs_reward=True,
    )
)

register_value_source(
    ValueSourceSpec(
        "rollouts",
        "Q from the baseline's rollouts of each candidate, scored by the target reward (any reward; "
        "direct or indirect transfer).",
        ALIGNED,
        (*GATING, *ROLLOUTS, "transfer", "beta", "baseline_reward"),
        build_tq_rollouts,
        estimator=lambda generation, config: rollout_values(generation, config, from_baseline=True),
        prepare=baseline_defaults,
        check_params=penalties_need_single_token_blocks,
        named_baseline=configured_baseline,
    )
)
register_value_source(
    ValueSourceSpec(
        "head",
        "Q from the server's learned value head, inside the engine's decode step (near plain decoding's "
        "cost; its own reward and baseline only: GET /v1/value_head).",
        PLAIN,
        (),
        build_tq_head,
        in_engine=True,
        check_config=check_head_config,
        prepare=head_defaults,
        named_baseline=head_baseline,
        metric_label="transfer_q_head",
        unavailable=head_unavailable,
    )
)
register_value_source(
    ValueSourceSpec(
        "implicit",
        "The exact Q of a baseline trained by DPO or IRFT from the served model: beta * (log pi_BL - "
        "log pi_SFT), one scoring request to each model a token, no rollouts (the baseline's own reward only; "
        "alpha = beta reproduces the baseline, smaller alpha extrapolates past it, larger stays closer to SFT; "
        "top_k 0: the whole vocabulary).",
        # aligned where each token is its own scoring requests through alignd; plain where the engine computes the
        # values in its step (ALIGND_IMPLICIT_IN_ENGINE: one engine request an answer): implicit_family
        ALIGNED,
        (*GATING, "beta"),
        build_tq_implicit,
        family_of=implicit_family,
        estimator=implicit_values,
        check_config=check_implicit_config,
        prepare=implicit_defaults,
        check_params=penalties_need_single_token_blocks,
        named_baseline=configured_baseline,
        metric_label="transfer_q_implicit",
        unavailable=implicit_unavailable,
        whole_vocabulary=True,
    )
)
