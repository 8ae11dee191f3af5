"""The V1 logits processor that applies Transfer Q* with the value head, for the rows that ask for it, and
seeded sampling that survives chunked prefill (``alignd.models.seeded_sampling``: the keys ``alignd_seed``,
``alignd_temperature``, ... on a greedy request; any model), for the rows that ask for that.

A request asks with two keys of ``SamplingParams.extra_args`` (``vllm_xargs`` in an OpenAI request
body to ``vllm serve``): ``alignd_alpha`` (a finite number > 0) and ``alignd_top_k`` (an integer from 1
to ``MAX_TOP_K``; default 10, the paper's). For those rows, over the row's top-k tokens ``z`` by logit:

    new logit(z) = log_softmax(logits)(z) + Q(s, z) / alpha,   every other token -inf

(``alignd.decoding.rule.transfer_q_logits``, the one TQ* rule of alignd), with Q from the value head on
the row's hidden state and the candidates' input embeddings. Every other row is left as it is, bit for
bit; with no row asking, ``apply`` returns at once.

Where it runs in vLLM's V1 sampler (``vllm/v1/sample/sampler.py``): after the allowed-token mask, the
bad-words mask and vLLM's own non-argmax-invariant processors (min_tokens, logit_bias; so the candidates
are the top-k of the logits those leave), and **before** the penalties (presence, frequency, repetition),
the temperature, min_p and the request's own top_k/top_p, which vLLM applies to the new logits. So
greedy requests (temperature 0) take the argmax of the rule, and temperature 1 samples the rule's
distribution exactly. vLLM's presence and frequency penalties then subtract from the candidates'
scores, the same as alignd's own rule, which subtracts them from the SFT log-probabilities (a sum is
a sum); the repetition penalty scales the scores, which has no such reading. Returned ``logprobs`` are
computed by vLLM before any processor (default ``--logprobs-mode raw_logprobs``): they are the SFT
model's, not the re-weighted ones.

This class is loaded through the ``vllm.logits_processors`` entry point into every vLLM engine of the
environment, including ones serving other models: there a request with these keys is refused at
admission (a 400 under ``vllm serve``) rather than decoded plainly. Under vLLM's Model Runner V2 (which
loads the same entry points, and refuses a V1-only class for *every* model), it is also a V2 processor:
a no-op for other models, and a refusal at start, naming ``VLLM_USE_V2_MODEL_RUNNER=0``, for alignd's
value-guided model.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from alignd.decoding.rule import transfer_q_logits
from alignd.errors import ConfigurationError
from alignd.models.baseline_stack import CONFIG_BASELINE_KEY, HEAD, IMPLICIT, VALUE_KEY
from alignd.models.seeded_sampling import SeededSampling, sampling_scores, seeded_sampling_request
from alignd.models.value_head import ALPHA_KEY, CONFIG_HEAD_KEY, MAX_TOP_K, TOP_K_KEY, VALUE_GUIDED_ARCHITECTURE
from alignd.vllm_plugin.scoring import NEEDS_V1_RUNNER, ValueGuidedScoring, find_scoring

try:  # Model Runner V2's interface (vLLM >= 0.32); absent in older vLLM, which has no V2 loader either
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

    _RUNNER_INTERFACES: tuple[type, ...] = (V1LogitsProcessor, V2LogitsProcessor)
except ImportError:  # pragma: no cover - depends on the vLLM version
    _RUNNER_INTERFACES = (V1LogitsProcessor,)

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 10  # the TQ* paper's


@dataclass(frozen=True)
class TransferQRequest:
    """What one request asks for: Q from the value head or from the baseline stack (implicit); top_k 0 =
    every token of the vocabulary (implicit only)."""

    alpha: float
    top_k: int
    value: str = HEAD


def transfer_q_request(extra_args: Mapping[str, Any] | None) -> TransferQRequest | None:
    """The request's TQ* parameters from ``SamplingParams.extra_args``; None when it asks for nothing.
    A ``ValueError`` names a bad value and what to send instead."""
    keys = (ALPHA_KEY, TOP_K_KEY, VALUE_KEY)
    if not extra_args or not any(key in extra_args for key in keys):
        return None
    if ALPHA_KEY not in extra_args:
        raise ValueError(
            f"{TOP_K_KEY} and {VALUE_KEY} are parameters of value-guided decoding, which {ALPHA_KEY} "
            f"turns on: send {ALPHA_KEY} (a number > 0) with them"
        )
    value = extra_args.get(VALUE_KEY, HEAD)
    if value not in (HEAD, IMPLICIT):
        raise ValueError(
            f"{VALUE_KEY} must be '{HEAD}' (the value head) or '{IMPLICIT}' (the baseline stack's "
            f"implicit Q), got {value!r}"
        )
    alpha = extra_args[ALPHA_KEY]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(
            f"{ALPHA_KEY} must be a finite number > 0, got {alpha!r}: a large alpha stays close "
            "to the model's own distribution, a small one follows the values"
        )
    top_k = extra_args.get(TOP_K_KEY, DEFAULT_TOP_K)
    lowest = 0 if value == IMPLICIT else 1
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not lowest <= top_k <= MAX_TOP_K:
        whole = (
            f" (0: the whole vocabulary, with {VALUE_KEY}='{IMPLICIT}' only)" if value == HEAD and top_k == 0 else ""
        )
        raise ValueError(f"{TOP_K_KEY} must be an integer from {lowest} to {MAX_TOP_K}, got {top_k!r}{whole}")
    return TransferQRequest(float(alpha), top_k, value)


@dataclass(frozen=True)
class _RowRequest:
    """What one batch row asks of this processor: TQ* with the head, seeded sampling, or both (then the
    sample is drawn from the rule's distribution). ``output_ids`` is vLLM's live list of the row's tokens."""

    transfer_q: TransferQRequest | None
    sampling: SeededSampling | None
    output_ids: list[int]


def _model_config_being_served() -> Any | None:
    """The model config of the model the request being admitted goes to, or None if unknown.

    vLLM calls ``validate_params`` with the request's parameters only, and this class is loaded for
    every model of the environment. vLLM 0.32 calls it from one place, ``InputProcessor._validate_params``
    (two frames up: through ``validate_logits_processors_parameters`` under V1, through the V2
    validator's closure under V2), which holds the model's config as ``self.model_config``: read it there. When it is
    not found (another vLLM layout), the request is admitted and a worker that does not serve the
    value-guided model logs that it decodes the request plainly."""
    frame = sys._getframe(1)
    for _ in range(6):
        back = frame.f_back
        if back is None:
            return None
        frame = back
        model_config = getattr(frame.f_locals.get("self"), "model_config", None)
        if isinstance(getattr(model_config, "architectures", None), (list, tuple)):
            return model_config
    return None


@dataclass(frozen=True)
class _AskingRows:
    """The batch rows that ask for the head, as tensors for :meth:`ValueGuidedLogitsProcessor.apply`
    (rebuilt only when the batch changes)."""

    rows: torch.Tensor  # [n] batch indices, ascending
    alpha: torch.Tensor  # [n] float32
    top_k: int  # the largest k asked
    beyond_own_top_k: torch.Tensor | None  # [n, top_k] True past a row's own k (None: all rows ask the same k)

    @classmethod
    def of(cls, requests: Mapping[int, TransferQRequest], device: torch.device) -> _AskingRows:
        ordered = sorted(requests.items())
        ks = [request.top_k for _, request in ordered]
        top_k = max(ks)
        beyond = None
        if min(ks) != top_k:
            beyond = torch.arange(top_k).unsqueeze(0) >= torch.tensor(ks).unsqueeze(1)
            beyond = beyond.to(device)
        return cls(
            rows=torch.tensor([row for row, _ in ordered], dtype=torch.long, device=device),
            alpha=torch.tensor([request.alpha for _, request in ordered], dtype=torch.float32, device=device),
            top_k=top_k,
            beyond_own_top_k=beyond,
        )


class ValueGuidedLogitsProcessor(*_RUNNER_INTERFACES):  # type: ignore[misc]  # bases picked by vLLM version
    """TQ* with alignd's value head over the rows whose request asks for it (module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """At admission, in the frontend: bad values, and any request for the head to a model without
        one, are refused (vLLM answers 400 under ``vllm serve``, raises ``VLLMValidationError`` in-process)."""
        seeded_sampling_request(sampling_params.extra_args)  # any model: a ValueError names a bad value
        request = transfer_q_request(sampling_params.extra_args)
        if request is None:
            return
        served = _model_config_being_served()
        if served is None:
            return
        architectures = list(getattr(served, "architectures", None) or [])
        config = getattr(served, "hf_config", None)
        needs, what = (
            (CONFIG_BASELINE_KEY, "a baseline stack")
            if request.value == IMPLICIT
            else (CONFIG_HEAD_KEY, "a value head")
        )
        if VALUE_GUIDED_ARCHITECTURE not in architectures or (config is not None and not getattr(config, needs, None)):
            raise ValueError(
                f"{ALPHA_KEY}/{TOP_K_KEY} ask for alignd's value-guided decoding ({VALUE_KEY}={request.value}), but "
                f"this engine serves {', '.join(architectures) or 'a model'} without {what}: serve a folder made by "
                "alignd.models.value_head.prepare_value_guided_folder (with a head, or a baseline stack)"
            )

    def __init__(self, vllm_config: VllmConfig, *runner_args: Any) -> None:
        # V1 builds processors with (vllm_config, device, is_pin_memory), Model Runner V2 with
        # (vllm_config, request states): one class answers both, so that installing alignd does not
        # stop V2 engines of other models from starting (V2 refuses V1-only entry-point classes).
        self._vllm_config = vllm_config
        self._value_guided = VALUE_GUIDED_ARCHITECTURE in (vllm_config.model_config.architectures or [])
        under_v2 = len(runner_args) == 1
        if under_v2 and self._value_guided:
            raise ConfigurationError(NEEDS_V1_RUNNER)
        self._requests: dict[int, _RowRequest] = {}  # batch row -> what it asks
        # the rows asking for TQ*, as tensors, by (value source, whole vocabulary); None: to be rebuilt
        self._asking: dict[tuple[str, bool], _AskingRows] | None = None
        self._sampled: list[tuple[int, _RowRequest]] | None = None  # the rows asking for seeded sampling
        self._scoring: ValueGuidedScoring | None = None

    def is_argmax_invariant(self) -> bool:
        # It changes greedy choices: vLLM then applies it before the penalties and the argmax.
        return False

    def _request_of(self, params: SamplingParams, _prompt_ids: Any, output_ids: list[int]) -> _RowRequest | None:
        request = transfer_q_request(params.extra_args)  # validated at admission: no error here
        if request is not None and not self._value_guided:
            logger.error(
                "a request asks for alignd's value head (%s=%s), but this engine serves %s: decoding it plainly",
                ALPHA_KEY,
                request.alpha,
                self._vllm_config.model_config.architectures,
            )
            request = None
        sampling = seeded_sampling_request(params.extra_args)
        if request is None and sampling is None:
            return None
        return _RowRequest(request, sampling, output_ids)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if process_dict_updates(self._requests, batch_update, self._request_of):
            self._asking = None
            self._sampled = None
            if self._value_guided:
                # before this step's forward (gpu_model_runner.py: _update_states -> refresh_metadata, then
                # the forward): the baseline stack runs where a row of the batch asks for it
                baseline = (self._scoring or self._find_scoring()).baseline
                if baseline is not None:
                    baseline.asked = any(
                        r.transfer_q is not None and r.transfer_q.value == IMPLICIT for r in self._requests.values()
                    )

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        """Model Runner V2: only built for engines of other models (see ``__init__``), which it leaves alone."""
        return False

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if not self._requests:
            return logits
        if self._asking is None and self._sampled is None:
            groups: dict[tuple[str, bool], dict[int, TransferQRequest]] = {}
            for row, r in self._requests.items():
                if r.transfer_q is not None:
                    groups.setdefault((r.transfer_q.value, r.transfer_q.top_k == 0), {})[row] = r.transfer_q
            self._asking = {key: _AskingRows.of(rows, logits.device) for key, rows in groups.items()}
            self._sampled = sorted((row, r) for row, r in self._requests.items() if r.sampling is not None)
        for (value, whole), asking in (self._asking or {}).items():
            if value == IMPLICIT:
                self._apply_implicit(logits, asking, whole)
            else:
                self._apply_transfer_q(logits, asking)
        for row, request in self._sampled or ():
            assert request.sampling is not None  # _sampled holds the rows that ask for seeded sampling
            # after TQ*: a seeded request that also asks for the head samples the rule's distribution
            logits[row] = sampling_scores(logits[row], request.output_ids, request.sampling).to(logits.dtype)
        return logits

    def _apply_transfer_q(self, logits: torch.Tensor, asking: _AskingRows) -> None:
        scoring = self._scoring or self._find_scoring()
        hidden = scoring.hidden_states
        if hidden is None or hidden.shape[0] != logits.shape[0]:
            raise RuntimeError(
                f"alignd value head: {logits.shape[0]} logits rows but "
                f"{'no' if hidden is None else hidden.shape[0]} hidden-state rows kept by compute_logits: this vLLM "
                "orders its step differently from the V1 runner the plugin was written for"
            )
        row_logits = logits.index_select(0, asking.rows)
        top_k = min(asking.top_k, logits.shape[1])
        candidate_ids = row_logits.topk(top_k, dim=-1).indices
        values = scoring.values(asking.rows, candidate_ids)
        if asking.beyond_own_top_k is not None:
            values = values.masked_fill(asking.beyond_own_top_k[:, :top_k], -math.inf)
        logits.index_copy_(
            0, asking.rows, transfer_q_logits(row_logits, candidate_ids, values, asking.alpha).to(logits.dtype)
        )

    def _apply_implicit(self, logits: torch.Tensor, asking: _AskingRows, whole: bool) -> None:
        """Q(s, z) = beta * (log pi_BL(z|s) - log pi_SFT(z|s)) from the baseline stack's log-probabilities at the
        same rows (alignd.models.baseline_stack); over the whole vocabulary the rule is directly
        (1 - beta/alpha) log pi_SFT + (beta/alpha) log pi_BL."""
        baseline = (self._scoring or self._find_scoring()).baseline
        if baseline is None:
            raise RuntimeError("alignd implicit values: the engine's model has no baseline stack")
        row_logits = logits.index_select(0, asking.rows).float()
        sft = torch.log_softmax(row_logits, dim=-1)
        base = baseline.logprobs(asking.rows)[:, : sft.shape[1]]
        if whole:
            weight = (baseline.beta / asking.alpha).unsqueeze(1)
            new = sft + weight * (base - sft)
        else:
            top_k = min(asking.top_k, logits.shape[1])
            candidate_ids = row_logits.topk(top_k, dim=-1).indices
            values = baseline.beta * (base.gather(1, candidate_ids) - sft.gather(1, candidate_ids))
            if asking.beyond_own_top_k is not None:
                values = values.masked_fill(asking.beyond_own_top_k[:, :top_k], -math.inf)
            new = transfer_q_logits(row_logits, candidate_ids, values, asking.alpha)
        logits.index_copy_(0, asking.rows, new.to(logits.dtype))

    def _find_scoring(self) -> ValueGuidedScoring:
        scoring = find_scoring(self._vllm_config)
        if scoring is None:
            raise RuntimeError(
                f"alignd value head: the engine's model is not alignd's {VALUE_GUIDED_ARCHITECTURE} "
                "(it registered no value head in this worker)"
            )
        self._scoring = scoring
        return scoring
