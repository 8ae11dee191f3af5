"""The head's loss: within-state differences of Q only, in units of the targets' spread.

**Why this loss.** The rule ``pi_sft(z|s) * exp(Q(s,z) / alpha)`` is normalised over the candidates of one
state, so adding a constant to all of a state's values changes nothing: only differences of Q within a
state matter. The loss therefore compares within-state differences only, in units of ``sigma`` (the
spread of the centred training targets, so that one learning rate fits any reward's scale):

    loss = mean (q_c - t_c)^2 / sigma^2                                  (q_c, t_c: centred within the state)
         + w * mean_{i<j} KL( sigmoid((t_i - t_j)/sigma) || sigmoid((q_i - q_j)/sigma) )

The first term fits the size of the differences, which sampling and the alpha trade-off depend on; the
second (a soft-target RankNet term) weights every candidate pair by how clearly the rollouts order it,
which greedy decisions depend on. Both are minimised by the rollout differences themselves, so the
pairwise term changes where the errors go, not what the head converges to (a hinge or logistic ranking
loss would keep inflating the scale of Q, and alpha would then mean something else).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def head_loss(
    values: torch.Tensor, targets: torch.Tensor, scale: float, ranking_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of the module docstring for values and targets [B, k]: within-state centred squared
    error plus ``ranking_weight`` x the pairwise KL, both in units of ``scale``. Zero exactly when every
    within-state difference of ``values`` equals that of ``targets``."""
    import torch
    import torch.nn.functional as F

    centred_error = (values - values.mean(-1, keepdim=True)) - (targets - targets.mean(-1, keepdim=True))
    squared = centred_error.div(scale).pow(2).mean()
    k = values.shape[-1]
    i, j = torch.triu_indices(k, k, offset=1)
    predicted = (values[:, i] - values[:, j]) / scale
    wanted = (targets[:, i] - targets[:, j]) / scale
    p = torch.sigmoid(wanted)
    # KL(Bernoulli(p) || Bernoulli(sigmoid(predicted))) = BCE(predicted, p) - BCE(wanted, p)
    pairwise = (
        F.binary_cross_entropy_with_logits(predicted, p, reduction="none")
        - F.binary_cross_entropy_with_logits(wanted, p, reduction="none")
    ).mean()
    loss = squared + ranking_weight * pairwise
    return loss, {"squared": float(squared.detach()), "pairwise": float(pairwise.detach())}
