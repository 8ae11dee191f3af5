"""The head's inputs, computed in transformers (float32, the same weights): ``h(s)``, the final normalised
hidden state at the last token of each state, and ``e(z)``, the input embedding of each candidate.

**Why transformers for the features.** vLLM gives no hidden states. The head will read, inside vLLM's
decode step, the rows ``LlamaForCausalLM.compute_logits(hidden_states)`` receives: vLLM's
``LlamaModel.forward`` ends with ``hidden_states, _ = self.norm(hidden_states, residual)`` (vllm 0.32,
``model_executor/models/llama.py``), so they are post-final-norm. transformers' ``LlamaModel`` also ends
with ``self.norm`` and returns that as ``last_hidden_state``, which ``LlamaForCausalLM`` feeds to
``lm_head``: the same vector (tests/test_train_value_head.py checks ``lm_head(h)`` against the model's
logits). The run also compares, per state, the top-1 of ``lm_head(h)`` with the engine's own top-1 and
records the agreement in the manifest: a state whose tokens were mangled would show up there.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

if TYPE_CHECKING:
    import torch


def final_hidden_states(
    model, sequences: Sequence[Sequence[int]], *, batch_size: int = 16, progress: bool = False
) -> torch.Tensor:
    """``h(s)`` [N, hidden] (float32): the last token's row of the base model's ``last_hidden_state``,
    i.e. after the final norm, the input of the LM head (see the module docstring). Sequences are
    batched by length, right-padded and masked (a causal model's real tokens never see the padding)."""
    import torch

    base = model.base_model
    device = next(model.parameters()).device
    out = torch.empty(len(sequences), model.config.get_text_config().hidden_size, dtype=torch.float32)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    with (
        torch.inference_mode(),
        tqdm(total=len(order), desc="features (h(s), transformers float32)", unit="state", disable=not progress) as bar,
    ):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            lengths = torch.tensor([len(sequences[i]) for i in rows])
            ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, i in enumerate(rows):
                ids[j, : len(sequences[i])] = torch.tensor(list(sequences[i]), dtype=torch.long)
                mask[j, : len(sequences[i])] = 1
            states = base(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            out[rows] = states[torch.arange(len(rows)), (lengths - 1).to(device)].float().cpu()
            bar.update(len(rows))
    return out


@dataclass
class Features:
    """``h(s)`` per state slot, and the input embeddings of every candidate token seen."""

    slots: list[int]
    hidden: torch.Tensor  # [S, d]
    token_ids: list[int]
    token_embeddings: torch.Tensor  # [U, d]
    hf_top1_agrees: list[bool]  # per slot: the top-1 of lm_head(h) is the engine's top-1 candidate
    logprob_gap: list[float]  # per slot: max |log-softmax(lm_head(h)) - the engine's| over the candidates

    def save(self, path: Path) -> None:
        import torch

        tmp = path.with_name(path.name + ".tmp")
        torch.save(asdict(self), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Features | None:
        import torch

        if not path.is_file():
            return None
        try:
            return cls(**torch.load(path, weights_only=True))
        except Exception:  # noqa: BLE001 - a torn or foreign file: computed again
            return None


def compute_features(model_dir: Path, records: list[dict], cache: Path, *, progress: bool = True) -> Features:
    """Features of the states in ``records``: those in ``cache`` are kept, the others computed with the
    SFT model in transformers (float32) and the cache rewritten."""
    import torch

    from alignd.train.tuning import load_sft

    known = Features.load(cache)
    have = set(known.slots) if known is not None else set()
    missing = [r for r in records if r["slot"] not in have]
    tokens_needed = sorted({z for r in records for z in r["candidates"]})
    if not missing and known is not None and set(tokens_needed) <= set(known.token_ids):
        return known
    model, _ = load_sft(model_dir)
    model.eval()
    hidden = final_hidden_states(model, [r["tokens"] for r in missing], progress=progress)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)
        embeddings = model.get_input_embeddings().weight.detach().float()[torch.tensor(tokens_needed)].clone()
    agrees = [int(logprobs[j].argmax()) == r["candidates"][0] for j, r in enumerate(missing)]
    gaps = [
        float((logprobs[j, torch.tensor(r["candidates"])] - torch.tensor(r["sft_logprobs"])).abs().max())
        for j, r in enumerate(missing)
    ]
    old = known if known is not None else Features([], torch.empty(0, hidden.shape[1]), [], torch.empty(0, 0), [], [])
    features = Features(
        slots=old.slots + [r["slot"] for r in missing],
        hidden=torch.cat([old.hidden, hidden]),
        token_ids=tokens_needed,
        token_embeddings=embeddings,
        hf_top1_agrees=old.hf_top1_agrees + agrees,
        logprob_gap=old.logprob_gap + gaps,
    )
    features.save(cache)
    del model
    gc.collect()
    return features
