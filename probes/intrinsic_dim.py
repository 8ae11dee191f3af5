"""Intrinsic dimension: TwoNN (Facco et al. 2017) and Gride (Denti et al. 2022), as dadapy computes them."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from alignd.probes.points import _EPS, _as_int, _as_points, _need_neighbours, _neighbours, _reject_duplicates


def _twonn_from_mus(mus: np.ndarray, mu_fraction: float, algorithm: str) -> float:
    """dadapy ``IdEstimation._compute_id_2NN`` on the ratios mu = r2 / r1."""
    n = mus.shape[0]
    log_mus = np.log(mus)
    if algorithm == "ml":
        # dadapy's "ml" ignores mu_fraction and uses every point.
        return float((n - 1) / np.sum(log_mus))
    n_eff = int(n * mu_fraction)
    x = np.sort(log_mus)[:n_eff]
    # Empirical CDF of mu: -log(1 - F(mu_i)) = d * log(mu_i), with F(mu_i) = i / N on the sorted mus.
    y = -np.log(1 - np.arange(1, n_eff + 1) / n)
    # dadapy fits the slope through the origin with scipy's curve_fit; the model is linear in the
    # slope, so the least-squares optimum is closed-form (curve_fit reaches it to ~1e-8 relative).
    return float(np.dot(x, y) / np.dot(x, x))


def _id_or_twonn(intrinsic_dim: float | None, dist: np.ndarray) -> float:
    """The given ID, or dadapy's fallback when none is set: TwoNN with its defaults."""
    if intrinsic_dim is not None:
        return intrinsic_dim
    return _twonn_from_mus(dist[:, 2] / dist[:, 1], 0.9, "fit")


def twonn_id(X, mu_fraction: float = 0.9, algorithm: str = "fit") -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017), as dadapy's ``Data(X).compute_id_2NN()``.

    Args:
        X: (N, D) points, no duplicates.
        mu_fraction: fraction of the smallest ratios mu = r2/r1 kept for the fit (dadapy's
            ``mu_fraction``); the default 0.9 discards the largest 10 %, which are the most
            sensitive to noise and outliers.
        algorithm: "fit" (dadapy's default ``algorithm="base"``: least-squares line through the
            origin of -log(1 - F(mu)) against log(mu)) or "ml" (maximum likelihood (N-1)/sum log mu,
            all points). As in dadapy, mu_fraction == 1 with "fit" switches to "ml", since the
            last point of the fit would be -log(0).

    Returns:
        The estimated intrinsic dimension.
    """
    if algorithm not in ("fit", "ml"):
        raise ValueError(f"algorithm must be 'fit' or 'ml'; got {algorithm!r}")
    if isinstance(mu_fraction, bool) or not isinstance(mu_fraction, numbers.Real) or not (0.0 < mu_fraction <= 1.0):
        raise ValueError(f"mu_fraction must be in (0, 1]; got {mu_fraction!r}")
    X = _as_points(X, min_points=3)
    _reject_duplicates(X)
    if math.isclose(mu_fraction, 1.0):
        algorithm = "ml"
    if algorithm == "fit" and int(X.shape[0] * mu_fraction) < 1:
        raise ValueError(f"mu_fraction={mu_fraction} keeps no point out of {X.shape[0]}; raise it or add points")
    dist, _ = _neighbours(X, 2)
    return _twonn_from_mus(dist[:, 2] / dist[:, 1], mu_fraction, algorithm)


def _gride_dloglik(d: float, mus: np.ndarray, n1: int, n2: int, n: int, eps: float) -> float:
    """Minus the derivative in d of the Gride log-likelihood (dadapy ``_neg_dloglik_did``)."""
    one_m_mus_d = 1.0 - mus ** (-d)
    one_m_mus_d[one_m_mus_d < 2 * eps] = 2 * eps  # keep the ratio finite for mu ~ 1
    return float(np.sum(((1 - n2 + n1) / one_m_mus_d + n2 - 1.0) * np.log(mus)) - (n - 1) / d)


def _gride_single_scale(
    mus: np.ndarray, n1: int, n2: int, d0: float = 0.001, d1: float = 1000.0, eps: float = 1e-7
) -> tuple[float, float]:
    """Gride ML estimate and its Fisher-information error at one scale (n1, n2), as dadapy.

    Mirrors ``_compute_id_gride_single_scale``: the ML root is found by the same bisection (so the
    estimate agrees with dadapy's to its 1e-7 bracket, not just to the likelihood's optimum), on
    the ratios left after dadapy's outlier filter, while the error uses all ratios.
    """
    mus = mus.copy()
    # dadapy nudges ratios of exactly 1 (equidistant neighbours) off the log(1) = 0 singularity.
    mus[mus == 1] += 10 * _EPS
    # ...and drops extreme ratios (very likely overlapping points), with a generous threshold.
    q3, q2 = np.percentile(mus, [95, 50])
    kept = mus[mus < 20 * (q3 - q2) + q2]

    n = kept.shape[0]
    l1 = _gride_dloglik(d1, kept, n1, n2, n, eps)
    while abs(d0 - d1) > eps:
        d2 = (d0 + d1) / 2.0
        l2 = _gride_dloglik(d2, kept, n1, n2, n, eps)
        if l2 * l1 > 0:
            d1 = d2
        else:
            d0 = d2
    id_ = (d0 + d1) / 2.0

    # Fisher information of the Gride likelihood at the estimate (dadapy ``_fisher_info_scaling``,
    # with its regularisation 5 * machine epsilon).
    one_m_mus_d = 1.0 - mus ** (-id_)
    one_m_mus_d[one_m_mus_d < 5 * _EPS] = 5 * _EPS
    log_mu = np.log(mus)
    info = mus.shape[0] / id_**2 + np.sum((n2 - n1 - 1) * (log_mu / one_m_mus_d) ** 2 * mus ** (-id_))
    return float(id_), float(info**-0.5)


@dataclass(frozen=True)
class GrideScaling:
    """Gride ID at the scales n2 = 2 n1 = 2, 4, 8, ... (dadapy's return_id_scaling_gride)."""

    ids: np.ndarray  # ID estimated from the ratios r_{2n} / r_{n}, n = 1, 2, 4, ...
    errs: np.ndarray  # its standard error (inverse square root of the Fisher information)
    scales: np.ndarray  # mean distance of the n-th and 2n-th neighbours (dadapy's rs_scaling)
    ranks: np.ndarray  # the outer rank 2n of each estimate (dadapy's return_ranks=True)


def gride_scaling(X, range_max: int = 64) -> GrideScaling:
    """Gride ID at every doubling scale up to neighbour rank ``range_max`` (Denti et al. 2022).

    Matches dadapy's ``Data(X).return_id_scaling_gride(range_max)``: the estimate at index i uses
    the ratio of the 2^(i+1)-th to the 2^i-th neighbour distance. dadapy caps the largest rank at N;
    here it is capped at N - 1, the number of neighbours a point has (dadapy fails when N is a
    power of two not above range_max, and agrees otherwise).
    """
    X = _as_points(X, min_points=3)
    range_max = _as_int(range_max, "range_max", 2)
    _reject_duplicates(X)
    max_rank = min(X.shape[0] - 1, range_max)
    max_step = int(math.log(max_rank, 2))
    ranks = 2 ** np.arange(max_step + 1)  # 1, 2, 4, ..., 2**max_step
    dist, _ = _neighbours(X, int(ranks[-1]))
    # dadapy's remove_zero_dists: a zero distance would make the ratio infinite (only reachable for
    # distinct points closer than the distance computation's rounding).
    dist[:, 1:] = np.maximum(dist[:, 1:], _EPS)
    mus = dist[:, ranks[1:]] / dist[:, ranks[:-1]]
    ids, errs = np.zeros(max_step), np.zeros(max_step)
    for i in range(max_step):
        ids[i], errs[i] = _gride_single_scale(mus[:, i], 2**i, 2 ** (i + 1))
    scales = (dist[:, ranks[:-1]].mean(axis=0) + dist[:, ranks[1:]].mean(axis=0)) / 2
    return GrideScaling(ids=ids, errs=errs, scales=scales, ranks=ranks[1:].copy())


def gride_id(X, k: int = 16) -> float:
    """Gride intrinsic dimension from the ratio of the 2k-th to the k-th neighbour distance.

    k = 16 is the scale of the paper (``ids[int(log2(16))]`` of dadapy's ``return_id_scaling_gride``,
    paired there with a k = 16 kNN density). For k a power of two this equals
    ``gride_scaling(X).ids[log2(k)]``; other k use the same likelihood with n1 = k, n2 = 2k.
    """
    X = _as_points(X, min_points=3)
    k = _as_int(k, "k", 1)
    _need_neighbours(X.shape[0], 2 * k, f"gride_id(k={k})")
    _reject_duplicates(X)
    dist, _ = _neighbours(X, 2 * k)
    dist[:, 1:] = np.maximum(dist[:, 1:], _EPS)
    return _gride_single_scale(dist[:, 2 * k] / dist[:, k], k, 2 * k)[0]
