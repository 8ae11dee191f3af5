"""How well a head ranks the candidates against its targets: per-state Spearman, the rule's greedy-choice
agreement, the pairwise order accuracy and the within-state error."""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignd.train.value_head.loss import head_loss
from alignd.train.value_head.options import AGREEMENT_ALPHAS

if TYPE_CHECKING:
    import torch

    from alignd.models.value_head import ValueHead
    from alignd.train.value_head.dataset import HeadData


def per_state_spearman(values, targets):
    """Spearman's rank correlation of each row of ``values`` with the same row of ``targets`` (numpy
    [N, k]): the Pearson correlation of their average ranks (scipy's ``rankdata``), which is what
    ``scipy.stats.spearmanr`` computes per row. NaN where either row is constant."""
    import numpy as np
    from scipy.stats import rankdata

    a = rankdata(values, axis=1)
    b = rankdata(targets, axis=1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=1) / denominator, np.nan)


def predict(head: ValueHead, data: HeadData) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return head(data.hidden, data.candidate_embeddings())


def evaluate(head: ValueHead, data: HeadData, *, alpha: float, scale: float, ranking_weight: float) -> dict:
    """The head against the rollout targets on ``data``: mean per-state Spearman over the candidates
    (states whose rollout values are all equal have no ranking and are left out, and counted), how
    often the rule's greedy choice ``argmax(log pi_sft + Q / alpha)`` is the same with the head's Q as
    with the rollouts' (and, for scale, how often plain SFT greedy already makes the rollouts' choice;
    also at :data:`AGREEMENT_ALPHAS`),
    the pairwise order accuracy, and the within-state centred squared error (the target variance beside
    it: an error below it means the head explains part of the differences)."""
    import numpy as np

    values = predict(head, data)
    targets = data.targets
    loss, parts = head_loss(values, targets, scale, ranking_weight)
    rho = per_state_spearman(values.numpy(), targets.numpy())
    ranked = ~np.isnan(rho)
    sft_choice = data.sft_logprobs.argmax(-1)

    def agreement(at: float) -> tuple[float, float]:
        rollout_choice = (data.sft_logprobs + targets / at).argmax(-1)
        head_choice = (data.sft_logprobs + values / at).argmax(-1)
        return (
            float((head_choice == rollout_choice).float().mean()),
            float((sft_choice == rollout_choice).float().mean()),
        )

    head_top1, sft_top1 = agreement(alpha)
    centred_error = (values - values.mean(-1, keepdim=True)) - (targets - targets.mean(-1, keepdim=True))
    centred_targets = targets - targets.mean(-1, keepdim=True)
    k = targets.shape[-1]
    i, j = np.triu_indices(k, 1)
    t_diff = (targets[:, i] - targets[:, j]).numpy()
    v_diff = (values[:, i] - values[:, j]).numpy()
    ordered = t_diff != 0
    return {
        "states": len(data),
        "spearman_mean": float(rho[ranked].mean()) if ranked.any() else None,
        "spearman_states": int(ranked.sum()),
        "top1_agreement": head_top1,
        "sft_top1_agreement": sft_top1,
        "top1_agreement_by_alpha": {
            f"{a:g}": dict(zip(("head", "sft"), agreement(a), strict=False)) for a in sorted({*AGREEMENT_ALPHAS, alpha})
        },
        "pairwise_accuracy": (
            float((np.sign(v_diff[ordered]) == np.sign(t_diff[ordered])).mean()) if ordered.any() else None
        ),
        "mse_centred": float(centred_error.pow(2).mean()),
        "target_variance_centred": float(centred_targets.pow(2).mean()),
        "loss": float(loss),
        **{f"loss_{name}": value for name, value in parts.items()},
    }
