"""Transformers replays of a finished answer, for the KL (and steering) that vLLM keeps inside its decode step:
TQ* with the learned value head (:class:`HeadReplay`) and with a DPO baseline's implicit Q computed in the
engine's step (:class:`ImplicitReplay`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class HeadReplay:
    """TQ* with the value head, replayed in transformers over a finished answer.

    vLLM applies the head inside its decode step and keeps the re-weighted distribution there, so the
    server's diagnostics give the candidates' SFT log-probabilities but no KL. The replay runs the SFT
    model (float32, the same weights) over prompt + answer once, takes at each answer position the final
    normalised hidden state (what vLLM's ``compute_logits`` receives and the head reads), the SFT top-k,
    the head's Q and the one rule (:func:`alignd.decoding.rule.transfer_q_logits`, the function the
    plugin calls), and returns the answer's KL from the SFT model, the truncation part of it, and the
    share of decisions where the replay's greedy choice is the engine's token: a check that the plugin
    applied the head as trained (float32 here; vLLM's kernels differ in the last bits, so a near-tie
    may go the other way)."""

    def __init__(self, model_dir: str | Path, head_dir: str | Path) -> None:
        import threading

        import torch
        from transformers import AutoModelForCausalLM

        from alignd.models.value_head import load_value_head

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        config = self.model.config.get_text_config()
        self.head = load_value_head(head_dir, vocab_size=config.vocab_size, hidden_size=config.hidden_size).head.eval()
        self._lock = threading.Lock()  # one replay at a time: concurrent answers finish together

    def __call__(self, prompt_ids: Sequence[int], answer_ids: Sequence[int], alpha: float, top_k: int) -> dict:
        import torch

        from alignd.decoding.rule import transfer_q_logits

        n = len(answer_ids)
        if n == 0:
            return {"kl": 0.0, "kl_truncation": 0.0, "agreement": None}
        with self._lock, torch.inference_mode():
            ids = torch.tensor([[*prompt_ids, *answer_ids]])
            # the state before answer token t is the sequence up to position len(prompt) + t - 1
            hidden = self.model.base_model(input_ids=ids).last_hidden_state[0, len(prompt_ids) - 1 : -1].float()
            logits = self.model.get_output_embeddings()(hidden).float()
            sft = torch.log_softmax(logits, dim=-1)
            top_logprobs, top_ids = sft.topk(top_k, dim=-1)
            values = self.head(hidden, self.model.get_input_embeddings().weight[top_ids])
            rule = torch.log_softmax(transfer_q_logits(logits, top_ids, values, torch.full((n,), float(alpha))), dim=-1)
            kept = rule.gather(1, top_ids)
            kl = (kept.exp() * (kept - top_logprobs)).sum(dim=-1)
            truncation = -torch.logsumexp(top_logprobs, dim=-1)
            agrees = rule.argmax(dim=-1) == torch.tensor(list(answer_ids))
        return {
            "kl": float(kl.sum()),
            "kl_truncation": float(truncation.sum()),
            "agreement": float(agrees.float().mean()),
        }


class ImplicitReplay:
    """TQ* with a DPO baseline's implicit Q computed inside vLLM's step (ALIGND_IMPLICIT_IN_ENGINE), replayed
    in transformers over a finished answer, as :class:`HeadReplay` does for the head.

    In the engine's step the values and the re-weighted distribution stay inside vLLM, and the server's
    diagnostics go through alignd's own step loop instead (5 tokens/s here, against 15-73 in the step:
    docs/BENCHMARKS.md). So the harness decodes in the step and replays each answer once with both models
    (float32, the SFT weights and the merged adapter the engine's baseline stack holds): at each position the
    SFT top-k (0: the whole vocabulary), Q = beta * (log pi_BL - log pi_SFT), the one rule
    (:func:`alignd.decoding.rule.transfer_q_logits`), and from them the KL from the SFT model, its truncation
    part, how much the values steered (the spread of Q over the candidates, the share of decisions whose
    token is not SFT's top-1), and the share of decisions where the replay's greedy choice is the engine's
    token (a bfloat16 engine may take the other side of a near-tie)."""

    def __init__(self, model_dir: str | Path, baseline_dir: str | Path, beta: float) -> None:
        import threading

        import torch
        from transformers import AutoModelForCausalLM

        self.sft = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.baseline = AutoModelForCausalLM.from_pretrained(str(baseline_dir), dtype=torch.float32).eval()
        self.beta = beta
        self._lock = threading.Lock()

    def __call__(self, prompt_ids: Sequence[int], answer_ids: Sequence[int], alpha: float, top_k: int) -> dict:
        import torch

        from alignd.decoding.rule import transfer_q_logits

        n = len(answer_ids)
        if n == 0:
            return {"kl": 0.0, "kl_truncation": 0.0, "agreement": None, "guidance": None}
        with self._lock, torch.inference_mode():
            ids = torch.tensor([[*prompt_ids, *answer_ids]])
            rows = slice(len(prompt_ids) - 1, -1)  # the state before answer token t
            logits = self.sft(input_ids=ids).logits[0, rows].float()
            sft = torch.log_softmax(logits, dim=-1)
            base = torch.log_softmax(self.baseline(input_ids=ids).logits[0, rows].float(), dim=-1)
            top_logprobs, top_ids = sft.topk(top_k if top_k > 0 else sft.shape[-1], dim=-1)
            values = self.beta * (base.gather(1, top_ids) - top_logprobs)
            rule = torch.log_softmax(transfer_q_logits(logits, top_ids, values, torch.full((n,), float(alpha))), dim=-1)
            kept = rule.gather(1, top_ids)
            kl = (kept.exp() * (kept - top_logprobs)).sum(dim=-1)
            truncation = -torch.logsumexp(top_logprobs, dim=-1)
            chosen = torch.tensor(list(answer_ids))
            agrees = rule.argmax(dim=-1) == chosen
            spread = (values.max(dim=-1).values - values.min(dim=-1).values) if top_k > 0 else None
            flips = chosen != top_ids[:, 0]
        guidance = {
            "value_spread": float(spread.mean()) if spread is not None else None,
            "flip_share": float(flips.float().mean()),
            "valued_decisions": n,
        }
        return {
            "kl": float(kl.sum()),
            "kl_truncation": float(truncation.sum()),
            "agreement": float(agrees.float().mean()),
            "guidance": guidance,
        }
