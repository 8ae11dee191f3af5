"""Per-layer representation-geometry estimators, re-implemented on numpy / scipy / scikit-learn.

These are the quantities of "The Representation Landscape of Few-Shot Learning and Fine-Tuning in
Large Language Models" (Doimo et al.), whose authors computed them with dadapy. dadapy 0.3.4 pins
numpy<2 and cannot be installed next to vLLM, so each estimator below re-derives one dadapy routine
and says which one. ``probes/goldens/make_goldens.py`` records dadapy's own outputs on fixed data and
``tests/test_probe_estimators.py`` checks these functions against them.

Conventions shared by every function:

* Points are the rows of a 2-D float array; distances are Euclidean.
* Neighbours come from ``sklearn.neighbors.NearestNeighbors`` queried on the data themselves, the
  same call dadapy makes, so neighbour distances agree with dadapy's to rounding. Column 0 of every
  neighbour table is the point itself and is never counted as a neighbour.
* Duplicated points (identical rows). The intrinsic-dimension, density and clustering estimators
  raise ``ValueError``: a zero neighbour distance makes log distance-ratios and k-NN densities
  infinite, and dadapy then silently returns nan/inf or arbitrary values. Drop duplicates first, as
  the paper does, with ``X[unique_points(X)]``. The overlap measures accept duplicates: only
  neighbour identities matter there; we make sure a point never counts itself as its own neighbour
  (dadapy assumes the point is in column 0, which can fail with duplicates), and ties among
  equidistant neighbours are broken by scikit-learn's ordering.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln
from scipy.stats import chi2
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

__all__ = [
    "ADPResult",
    "GrideScaling",
    "LogDensity",
    "adjusted_rand_index",
    "adp_clustering",
    "gride_id",
    "gride_scaling",
    "knn_density",
    "label_overlap",
    "neighbourhood_overlap",
    "pak_density",
    "twonn_id",
    "unique_points",
]

_EPS = float(np.finfo(np.float64).eps)
# dadapy's default neighbourhood size for tables it builds itself (Base.__init__: min(100, N - 1)).
_DEFAULT_MAXK = 100


# --------------------------------------------------------------------------------------------------
# Input validation and neighbours
# --------------------------------------------------------------------------------------------------


def _as_points(X, name: str = "X", min_points: int = 2) -> np.ndarray:
    """X as a float64 (N, D) array, or a ValueError that says what is wrong with it."""
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of shape (n_points, n_features); got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {arr.shape})")
    if arr.shape[0] < min_points:
        raise ValueError(f"{name} has {arr.shape[0]} points; this estimator needs at least {min_points}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _as_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def _need_neighbours(n_points: int, needed: int, what: str, name: str = "X") -> None:
    """Each point has only n_points - 1 neighbours; say so plainly when an estimator wants more."""
    if needed > n_points - 1:
        raise ValueError(
            f"{what} needs {needed} neighbours per point, but {name} has only {n_points} points "
            f"({n_points - 1} neighbours each); use a smaller k or more points"
        )


def _check_intrinsic_dim(intrinsic_dim) -> float:
    if isinstance(intrinsic_dim, bool) or not isinstance(intrinsic_dim, numbers.Real):
        raise ValueError(f"intrinsic_dim must be a positive number; got {intrinsic_dim!r}")
    d = float(intrinsic_dim)
    if not math.isfinite(d) or d <= 0:
        raise ValueError(f"intrinsic_dim must be a positive finite number; got {intrinsic_dim!r}")
    return d


def unique_points(X) -> np.ndarray:
    """Indices of the first occurrence of every distinct row of X, in increasing order.

    ``X[unique_points(X)]`` is the de-duplication the paper applies before any estimate
    (``np.unique(axis=0, return_index=True)``, indices re-sorted so the original order is kept).
    """
    X = _as_points(X, min_points=1)
    _, first = np.unique(X, axis=0, return_index=True)
    return np.sort(first)


def _reject_duplicates(X: np.ndarray, name: str = "X") -> None:
    n_dup = X.shape[0] - np.unique(X, axis=0).shape[0]
    if n_dup:
        raise ValueError(
            f"{name} has {n_dup} duplicated point(s); zero neighbour distances make distance ratios "
            f"and k-NN densities undefined. Drop them first, e.g. X = X[unique_points(X)]"
        )


def _neighbours(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances and indices of each point's k nearest neighbours, shape (N, k + 1).

    Column 0 is the point itself. This is dadapy's own call (``compute_nn_distances``:
    NearestNeighbors(n_neighbors=k+1).kneighbors(X)), so distances match dadapy's to rounding.
    """
    dist, ind = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    # With exact duplicates scikit-learn may list a twin before the point itself. Move the point to
    # column 0 (dropping the farthest neighbour if it fell off the list) so that "column 0 = self",
    # which every estimator relies on, holds for all rows. Rows without duplicates are untouched.
    for i in np.flatnonzero(ind[:, 0] != np.arange(X.shape[0])):
        where = np.flatnonzero(ind[i] == i)
        j = int(where[0]) if where.size else k
        ind[i, 1 : j + 1] = ind[i, :j].copy()
        dist[i, 1 : j + 1] = dist[i, :j].copy()
        ind[i, 0], dist[i, 0] = i, 0.0
    return dist, ind


# --------------------------------------------------------------------------------------------------
# Intrinsic dimension
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Density
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogDensity:
    """Per-point log-density estimate (normalised by N, as dadapy) and its error."""

    log_den: np.ndarray
    log_den_err: np.ndarray
    intrinsic_dim: float  # the dimension used for the ball volumes
    kstar: np.ndarray  # neighbourhood size used at each point


def _log_unit_ball(d: float) -> float:
    """Log volume of the unit ball in d dimensions (dadapy's log 'prefactor')."""
    return d / 2.0 * math.log(math.pi) - float(gammaln((d + 2) / 2))


def _knn_log_density(dist: np.ndarray, k: int, d: float) -> tuple[np.ndarray, np.ndarray]:
    # rho_i = k / (N * V_d * r_{i,k}^d): k points inside the ball reaching the k-th neighbour.
    n = dist.shape[0]
    log_den = math.log(k) - (_log_unit_ball(d) + d * np.log(dist[:, k])) - math.log(n)
    return log_den, np.full(n, 1.0 / math.sqrt(k))  # Poisson error on the count k


def knn_density(X, k: int = 16, intrinsic_dim: float | None = None) -> LogDensity:
    """k-NN log-density, as dadapy's ``compute_density_kNN(k)`` (with ``bias=False``).

    log rho_i = log k - log(V_d r_{i,k}^d) - log N, error 1/sqrt(k). ``intrinsic_dim`` defaults to
    ``twonn_id(X)``, what dadapy uses when no ID has been set. The paper uses k = 16 with the Gride
    ID at that scale: ``knn_density(X, 16, gride_id(X, 16))``. (dadapy's default k is 10.)
    """
    X = _as_points(X, min_points=3)
    k = _as_int(k, "k", 1)
    _need_neighbours(X.shape[0], max(k, 2), f"knn_density(k={k})")
    if intrinsic_dim is not None:
        intrinsic_dim = _check_intrinsic_dim(intrinsic_dim)
    _reject_duplicates(X)
    dist, _ = _neighbours(X, max(k, 2))
    d = _id_or_twonn(intrinsic_dim, dist)
    log_den, err = _knn_log_density(dist, k, d)
    return LogDensity(log_den, err, d, np.full(X.shape[0], k, dtype=np.int64))


def _compute_kstar(dist: np.ndarray, ind: np.ndarray, d: float, alpha: float) -> np.ndarray:
    """Point-adaptive neighbourhood size k* (dadapy ``cython_density._compute_kstar``).

    For k = 3, 4, ..., the densities measured on k neighbours around i and around i's (k+1)-th
    neighbour are compared by a likelihood-ratio test (chi^2_1, level alpha); k* is the first k at
    which the test rejects them as equal (dadapy's convention), or maxk - 1 if it never does.
    """
    maxk = dist.shape[1] - 1
    js = np.arange(4, maxk)
    if js.size == 0:
        return np.full(dist.shape[0], 3, dtype=np.int64)
    log_prefactor = _log_unit_ball(d)
    # Volumes of the balls of radius r_{k} around i and around its (k+1)-th neighbour j, k = j - 1.
    vvi = np.exp(log_prefactor) * dist[:, js - 1] ** d
    vvj = np.exp(log_prefactor) * dist[ind[:, js], js[None, :] - 1] ** d
    d_l = -2.0 * (js - 1) * (np.log(vvi) + np.log(vvj) - 2.0 * np.log(vvi + vvj) + math.log(4))
    fails = d_l > chi2.isf(alpha, 1)
    first = np.argmax(fails, axis=1)
    return np.where(fails.any(axis=1), js[first] - 1, maxk - 1).astype(np.int64)


def _pak_newton(f: np.ndarray, kstar: np.ndarray, volumes: np.ndarray, max_iter: int = 10000):
    """Maximise the PAk likelihood of each point (dadapy ``cython_maximum_likelihood_opt_full``).

    The model is log rho(r_l) = F + a * l over the k* shells l = 1..k*; F is the log-density. dadapy
    runs a damped Newton (step 0.1, capped at 10 % of |F|) that stops once the relative gradient is
    below 1e-3, so its F is that early-stopped value, not the exact optimum; we run the same
    iteration, vectorised over points, to agree with it rather than with the exact optimum.
    """
    n = f.shape[0]
    kf = kstar.astype(np.float64)
    ksum = kf * (kf + 1) / 2.0
    shell = np.arange(1, volumes.shape[1] + 1, dtype=np.float64)
    in_k = shell[None, :] <= kf[:, None]
    vol = np.where(in_k, volumes, 0.0)
    # Shells beyond a point's k* are not in its likelihood; -inf there keeps exp() from overflowing
    # into inf * 0 = nan.
    beyond = np.where(in_k, 0.0, -np.inf)
    f = f.copy()
    a = np.zeros(n)
    # Points with a vanishing shell volume keep the closed-form kNN start (dadapy's flag).
    active = ~np.any(in_k & (volumes < 1.0e-300), axis=1)
    stepmax = 0.1 * np.abs(f)

    def derivatives(rows):
        gf_tmp = vol[rows] * np.exp(f[rows, None] + a[rows, None] * shell[None, :] + beyond[rows])
        grad_f = kf[rows] - gf_tmp.sum(axis=1)
        grad_a = ksum[rows] - (gf_tmp * shell).sum(axis=1)
        h00 = -gf_tmp.sum(axis=1)
        h01 = -(gf_tmp * shell).sum(axis=1)
        h11 = -(gf_tmp * shell**2).sum(axis=1)
        return grad_f, grad_a, h00, h01, h11

    grad_f, grad_a = np.zeros(n), np.zeros(n)
    h00, h01, h11 = np.zeros(n), np.zeros(n), np.zeros(n)
    rows = np.flatnonzero(active)
    grad_f[rows], grad_a[rows], h00[rows], h01[rows], h11[rows] = derivatives(rows)
    func = np.full(n, 100.0)
    steps = np.zeros(n, dtype=np.int64)
    while True:
        run = active & (func > 1e-3) & (steps < max_iter)
        if not run.any():
            break
        det = h00 * h11 - h01 * h01
        singular = run & (det < _EPS)
        newton = run & ~singular
        if singular.any():
            # dadapy's fallback when the Hessian is singular: a fixed-point step. (dadapy does not
            # count these steps, so it can loop forever; we count them towards max_iter.)
            s = singular
            f[s] = (-a[s] * ksum[s] - (grad_f[s] - kf[s])) / kf[s]
            a[s] = (-f[s] * kf[s] - (grad_f[s] - kf[s])) / ksum[s]
        if newton.any():
            s = newton
            detinv = 1.0 / det[s]
            delta_f = detinv * h11[s] * grad_f[s] - detinv * h01[s] * grad_a[s]
            delta_a = -detinv * h01[s] * grad_f[s] + detinv * h00[s] * grad_a[s]
            lr = np.full(delta_f.shape, 0.1)
            big = np.abs(lr * delta_f) > stepmax[s]
            lr[big] = np.abs(stepmax[s][big] / delta_f[big])
            f[s] -= lr * delta_f
            a[s] -= lr * delta_a
        steps[run] += 1
        rows = np.flatnonzero(run)
        grad_f[rows], grad_a[rows], h00[rows], h01[rows], h11[rows] = derivatives(rows)
        small = (np.abs(a[rows]) <= _EPS) | (np.abs(f[rows]) <= _EPS)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.maximum(np.abs(grad_f[rows] / f[rows]), np.abs(grad_a[rows] / a[rows]))
        func[rows] = np.where(small, np.maximum(np.abs(grad_f[rows]), np.abs(grad_a[rows])), rel)
    return f


def _pak_from_neighbours(dist, ind, d: float, alpha: float) -> LogDensity:
    n = dist.shape[0]
    kstar = _compute_kstar(dist, ind, d, alpha)
    kmax = int(kstar.max())
    log_prefactor = _log_unit_ball(d)
    # Volume of each shell between consecutive neighbours l-1 and l, l = 1..k* (dadapy's
    # return_not_normalised_density_PAk_optimized, including its nudge of equal radii).
    r, r1 = dist[:, :kmax], dist[:, 1 : kmax + 1]
    ratio = r / r1
    resolution = float(np.finfo(np.float64).resolution)
    ratio[np.abs(ratio - 1.0) < resolution] -= 10 * resolution
    with np.errstate(divide="ignore"):
        exponent = d * np.log(r1) + np.log(1 - ratio**d)
    exponent = np.minimum(exponent, 300.0)  # dadapy caps volumes at e^300
    volumes = math.exp(log_prefactor) * np.exp(exponent)
    kf = kstar.astype(np.float64)
    start = np.log(kf) - (log_prefactor + d * np.log(dist[np.arange(n), kstar]))
    log_den = _pak_newton(start, kstar, volumes) - math.log(n)
    log_den_err = np.sqrt((4 * kf + 2) / (kf * (kf - 1)))
    return LogDensity(log_den, log_den_err, d, kstar)


def pak_density(X, intrinsic_dim: float | None = None, maxk: int | None = None, alpha: float = 1e-6) -> LogDensity:
    """PAk log-density (Rodriguez et al. 2018), as dadapy's ``compute_density_PAk()``.

    Args:
        X: (N, D) points, no duplicates.
        intrinsic_dim: defaults to ``twonn_id(X)`` (dadapy's behaviour when no ID is set).
        maxk: neighbours considered for k*; defaults to dadapy's min(100, N - 1). k* <= maxk - 1.
        alpha: level of the likelihood-ratio test that picks k* (dadapy's default 1e-6).
    """
    X = _as_points(X, min_points=5)
    maxk = min(_DEFAULT_MAXK, X.shape[0] - 1) if maxk is None else _as_int(maxk, "maxk", 4)
    _need_neighbours(X.shape[0], maxk, f"pak_density(maxk={maxk})")
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1); got {alpha!r}")
    if intrinsic_dim is not None:
        intrinsic_dim = _check_intrinsic_dim(intrinsic_dim)
    _reject_duplicates(X)
    dist, ind = _neighbours(X, maxk)
    d = _id_or_twonn(intrinsic_dim, dist)
    return _pak_from_neighbours(dist, ind, d, alpha)


# --------------------------------------------------------------------------------------------------
# Advanced density peaks clustering
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ADPResult:
    """Outcome of Advanced Density Peaks clustering (dadapy ``compute_clustering_ADP``)."""

    labels: np.ndarray  # cluster of every point, 0..n_clusters-1 (dadapy halo=False)
    labels_halo: np.ndarray  # same, with -1 for halo points (dadapy halo=True)
    n_clusters: int  # surviving density peaks (dadapy N_clusters)
    centers: np.ndarray  # index of each cluster's density peak (dadapy cluster_centers)
    core_fraction: float  # fraction of points not in a halo: mean(labels_halo != -1)
    density: LogDensity  # the density the clustering ran on


def _adp(kstar, ind, log_den, log_den_err, z: float):
    """ADP on a neighbour table, as dadapy ``cython_clustering._compute_clustering``.

    Returns (labels, labels_halo, centers). Peaks are numbered in increasing point index, as dadapy.
    """
    n = log_den.shape[0]
    n_cols = ind.shape[1]
    # Shift log densities so that rho - Z * err > 0 everywhere (dadapy: helps the comparisons below).
    rho = log_den - np.min(log_den - z * log_den_err) + 1
    g = rho - log_den_err

    # 1. Putative peaks: points whose g is not below that of any of their k* neighbours.
    cols = np.arange(n_cols)
    in_k = (cols[None, :] >= 1) & (cols[None, :] <= kstar[:, None])
    putative = ~np.any(in_k & (g[:, None] < g[ind]), axis=1)
    # 2. A putative peak inside the k*-neighbourhood of a denser point is not a peak. Remember the
    #    densest such point ("absorber"), used when a point has no labelled neighbour (step 3).
    rows, pos = np.nonzero(in_k)
    nbs = ind[rows, pos]
    absorbed = putative[nbs] & (g[rows] > g[nbs])
    rows, nbs = rows[absorbed], nbs[absorbed]
    removed = np.zeros(n, dtype=bool)
    removed[nbs] = True
    absorber = np.full(n, -1, dtype=np.int64)
    order = np.lexsort((g[rows], nbs))  # by removed peak, then by g: the last of a group is densest
    rows, nbs = rows[order], nbs[order]
    last = np.append(nbs[1:] != nbs[:-1], True)[: nbs.size]
    absorber[nbs[last]] = rows[last]
    centers = np.flatnonzero(putative & ~removed)
    n_clus = centers.size

    # 3. Preliminary assignment, densest first: a point joins the cluster of its nearest labelled
    #    neighbour. A point with none among its neighbours is necessarily a removed peak; it joins
    #    the cluster of the densest absorber among the removed peaks in its neighbourhood (itself
    #    included). This is what dadapy's Cython intends; its bookkeeping there is off by one row,
    #    so in this rare case dadapy's choice can differ (never reached on the golden data).
    cluster = np.full(n, -1, dtype=np.int64)
    cluster[centers] = np.arange(n_clus)
    for ele in np.argsort(-g):
        if cluster[ele] != -1:
            continue
        labelled = cluster[ind[ele, 1:]]
        hit = np.flatnonzero(labelled != -1)
        if hit.size:
            cluster[ele] = labelled[hit[0]]
            continue
        near_removed = ind[ele][removed[ind[ele]]]
        candidates = absorber[near_removed]
        cluster[ele] = cluster[candidates[np.argmax(g[candidates])]]
        if cluster[ele] == -1:  # unreachable: the absorber is denser, hence already labelled
            raise RuntimeError("ADP preliminary assignment left a point without a cluster")

    # 4. Saddle points. Point p1 of cluster c borders cluster c' if (a) its first k*-neighbour
    #    outside c, p2, lies in c', (b) no point of c is closer to p2 than p1, and (c) p1 has the
    #    largest g among such points; p1 is never a peak. Candidates are visited in dadapy's order
    #    (cluster, then point index) so that ties resolve identically.
    is_center = np.zeros(n, dtype=bool)
    is_center[centers] = True
    other = in_k & (cluster[ind] != cluster[:, None])
    has_other = other.any(axis=1) & ~is_center
    p1s = np.flatnonzero(has_other)
    p2s = ind[p1s, np.argmax(other[p1s], axis=1)]
    same = cluster[ind[p2s, 1:]] == cluster[p1s][:, None]
    first_same = np.argmax(same, axis=1)
    ok = ~same.any(axis=1) | (ind[p2s, 1 + first_same] == p1s)
    p1s, p2s = p1s[ok], p2s[ok]
    visit = np.lexsort((p1s, cluster[p1s]))
    rho_bord = np.zeros((n_clus, n_clus))
    point_bord = np.full((n_clus, n_clus), -1, dtype=np.int64)
    for p1, p2 in zip(p1s[visit], p2s[visit], strict=False):
        c, cp = cluster[p1], cluster[p2]
        if g[p1] > rho_bord[c, cp]:
            rho_bord[c, cp] = rho_bord[cp, c] = g[p1]
            point_bord[c, cp] = point_bord[cp, c] = p1
    rho_bord_err = np.zeros((n_clus, n_clus))
    has = point_bord != -1
    rho_bord[has] = rho[point_bord[has]]
    rho_bord_err[has] = log_den_err[point_bord[has]]
    np.fill_diagonal(rho_bord, -1.0)
    np.fill_diagonal(rho_bord_err, 0.0)

    # 5. Multimodality test: while some pair of peaks is not separated by more than Z standard
    #    errors above their saddle, merge the pair with the highest saddle (first such pair in
    #    row-major order on ties, as dadapy), dropping the less significant peak of the two.
    rho_c, err_c = rho[centers], log_den_err[centers]
    alive = np.ones(n_clus, dtype=bool)
    all_c = np.arange(n_clus)

    def weak_pairs(i, j):
        # Peak i (or j) rises less than Z errors above the saddle between them. Only pairs with a
        # saddle can qualify: without one rho_bord is 0 or -1 and rho_c >= Z * err_c + 1.
        bord, bord_err = rho_bord[i, j], rho_bord_err[i, j]
        return ((rho_c[i] - bord) < z * (err_c[i] + bord_err)) | ((rho_c[j] - bord) < z * (err_c[j] + bord_err))

    weak = np.triu(weak_pairs(all_c[:, None], all_c[None, :]), 1)
    while weak.any():
        imod, jmod = divmod(int(np.argmax(np.where(weak, rho_bord, -np.inf))), n_clus)
        c1 = (rho_c[imod] - rho_bord[imod, jmod]) / (err_c[imod] + rho_bord_err[imod, jmod])
        c2 = (rho_c[jmod] - rho_bord[imod, jmod]) / (err_c[jmod] + rho_bord_err[imod, jmod])
        if c1 < c2:
            imod, jmod = jmod, imod
        alive[jmod] = False
        cluster[cluster == jmod] = imod
        rho_bord[imod, jmod] = rho_bord[jmod, imod] = -1.0
        rho_bord_err[imod, jmod] = rho_bord_err[jmod, imod] = 0.0
        # The merged cluster inherits, towards every other cluster, the higher of the two saddles.
        others = np.ones(n_clus, dtype=bool)
        others[[imod, jmod]] = False
        take = others & (rho_bord[imod] < rho_bord[jmod])
        rho_bord[imod, take] = rho_bord[take, imod] = rho_bord[jmod, take]
        rho_bord_err[imod, take] = rho_bord_err[take, imod] = rho_bord_err[jmod, take]
        rho_bord[jmod, others] = rho_bord[others, jmod] = -1.0
        rho_bord_err[jmod, others] = rho_bord_err[others, jmod] = 0.0
        # Only the rows and columns of the two merged peaks changed: re-test just those pairs
        # (dadapy re-tests all pairs each round; the outcome is the same, at O(n) instead of O(n^2)).
        for line in (imod, jmod):
            weak[line, :] = weak_pairs(line, all_c) & (all_c > line)
            weak[:, line] = weak_pairs(all_c, line) & (all_c < line)

    # 6. Final labels: surviving peaks renumbered in order. Halo: points of a cluster whose density
    #    is below the cluster's highest saddle towards any other cluster.
    survivors = np.flatnonzero(alive)
    renumber = np.full(n_clus, -1, dtype=np.int64)
    renumber[survivors] = np.arange(survivors.size)
    labels = renumber[cluster]
    halo_level = rho_bord[np.ix_(survivors, survivors)].max(axis=1)
    labels_halo = np.where(rho < halo_level[labels], -1, labels)
    return labels, labels_halo, centers[survivors]


def adp_clustering(
    X,
    Z: float = 1.6,
    *,
    density: str = "PAk",
    k: int = 16,
    intrinsic_dim: float | None = None,
    maxk: int | None = None,
    alpha: float = 1e-6,
) -> ADPResult:
    """Advanced Density Peaks clustering (d'Errico et al. 2021), as dadapy ``compute_clustering_ADP``.

    Args:
        X: (N, D) points, no duplicates.
        Z: merging threshold in standard errors; larger Z merges more. The paper uses 1.6
            (dadapy's default is 1.65).
        density: "PAk" (dadapy's default when no density was computed: point-adaptive k*, PAk
            estimator) or "kNN" (fixed k, ``knn_density``; what the paper does, with k = 16 and the
            Gride ID at that scale: ``intrinsic_dim=gride_id(X, 16)``).
        k: neighbourhood size for density="kNN" (ignored for "PAk").
        intrinsic_dim: defaults to ``twonn_id(X)``, as dadapy when no ID was set.
        maxk: neighbours per point kept in the table the clustering walks; dadapy's default is
            min(100, N - 1) (the paper's pipeline used 1000 on >1000 points). It bounds k* and the
            search for a labelled neighbour and for saddle points.
        alpha: level of PAk's k* test.

    Returns:
        ADPResult. ``labels`` is dadapy's ``cluster_assignment`` with halo=False and ``labels_halo``
        the one with halo=True (the clusters are the same; halo=True only relabels the points
        whose density is below their cluster's highest saddle as -1). ``core_fraction`` is the
        fraction of non-halo points, the paper's "core point fraction".
    """
    if density not in ("PAk", "kNN"):
        raise ValueError(f"density must be 'PAk' or 'kNN'; got {density!r}")
    if isinstance(Z, bool) or not isinstance(Z, numbers.Real) or not math.isfinite(Z) or Z <= 0:
        raise ValueError(f"Z must be a positive number; got {Z!r}")
    X = _as_points(X, min_points=5)
    n = X.shape[0]
    maxk = min(_DEFAULT_MAXK, n - 1) if maxk is None else _as_int(maxk, "maxk", 4)
    _need_neighbours(n, maxk, f"adp_clustering(maxk={maxk})")
    if density == "kNN":
        k = _as_int(k, "k", 1)
        if k > maxk:
            raise ValueError(f"k={k} exceeds maxk={maxk}; the density needs the k-th neighbour")
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1); got {alpha!r}")
    if intrinsic_dim is not None:
        intrinsic_dim = _check_intrinsic_dim(intrinsic_dim)
    _reject_duplicates(X)

    dist, ind = _neighbours(X, maxk)
    d = _id_or_twonn(intrinsic_dim, dist)
    if density == "PAk":
        dens = _pak_from_neighbours(dist, ind, d, alpha)
    else:
        log_den, err = _knn_log_density(dist, k, d)
        dens = LogDensity(log_den, err, d, np.full(n, k, dtype=np.int64))
    if not (np.all(np.isfinite(dens.log_den)) and np.all(np.isfinite(dens.log_den_err))):
        raise ValueError("the log-density has non-finite values; check X for near-duplicates")
    labels, labels_halo, centers = _adp(dens.kstar, ind, dens.log_den, dens.log_den_err, float(Z))
    return ADPResult(
        labels=labels,
        labels_halo=labels_halo,
        n_clusters=int(centers.size),
        centers=centers,
        core_fraction=float(np.mean(labels_halo != -1)),
        density=dens,
    )


# --------------------------------------------------------------------------------------------------
# Comparisons between partitions and representations
# --------------------------------------------------------------------------------------------------


def _as_labels(labels, n: int | None, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per point); got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but there are {n} points")
    return arr


def adjusted_rand_index(labels_a, labels_b) -> float:
    """Adjusted Rand index between two partitions of the same points (scikit-learn's)."""
    a = _as_labels(labels_a, None, "labels_a")
    b = _as_labels(labels_b, None, "labels_b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"labels_a has {a.shape[0]} entries but labels_b has {b.shape[0]}")
    if a.shape[0] == 0:
        raise ValueError("labels_a and labels_b are empty")
    return float(adjusted_rand_score(a, b))


def label_overlap(
    X, labels, k: int | None = 30, *, class_fraction: float | None = None, weighted: bool = True
) -> float:
    """Fraction of each point's nearest neighbours sharing its label, averaged over points.

    As dadapy's ``Data(X).return_label_overlap(labels, k, class_fraction=..., weighted=...)``:

    * With ``class_fraction`` (the paper uses 0.3), each point looks at int(fraction * size of its
      class) neighbours (at least 1) and ``k`` is ignored, so unbalanced classes are comparable.
    * ``weighted=True`` (dadapy's default) weighs each point by 1 / size of its class, i.e. the
      mean over classes of the per-class mean overlap.
    Labels may be of any type; they are only compared for equality.
    """
    X = _as_points(X, min_points=2)
    n = X.shape[0]
    lab = _as_labels(labels, n, "labels")
    _, codes, counts = np.unique(lab, return_inverse=True, return_counts=True)
    codes = codes.ravel()
    if class_fraction is not None:
        if not (0.0 < class_fraction <= 1.0):
            raise ValueError(f"class_fraction must be in (0, 1]; got {class_fraction!r}")
        k_class = np.maximum((counts * class_fraction).astype(np.int64), 1)
        k_point = k_class[codes]
        max_k = int(k_class.max())
        what = f"label_overlap(class_fraction={class_fraction})"
    else:
        if k is None:
            raise ValueError("give k or class_fraction")
        max_k = _as_int(k, "k", 1)
        k_point = np.full(n, max_k)
        what = f"label_overlap(k={max_k})"
    _need_neighbours(n, max_k, what)
    _, ind = _neighbours(X, max_k)
    same = codes[ind[:, 1:]] == codes[:, None]
    same &= np.arange(max_k)[None, :] < k_point[:, None]
    per_point = same.sum(axis=1) / k_point
    if weighted:
        return float(np.average(per_point, weights=1.0 / counts[codes]))
    return float(per_point.mean())


def neighbourhood_overlap(X, Y, k: int = 30, *, per_point: bool = False):
    """Fraction of shared k nearest neighbours of each item in two representations X and Y.

    As dadapy's ``Data(X).return_data_overlap(coordinates=Y, k=k)``: row i of X and of Y are the same
    item; the overlap of i is |NN_k^X(i) intersect NN_k^Y(i)| / k. Returns the mean over items, or
    the per-item values with ``per_point=True`` (dadapy's ``avg=False``).
    """
    X = _as_points(X, "X", min_points=2)
    Y = _as_points(Y, "Y", min_points=2)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} points but Y has {Y.shape[0]}; rows must be the same items")
    k = _as_int(k, "k", 1)
    _need_neighbours(X.shape[0], k, f"neighbourhood_overlap(k={k})")
    _, ind_x = _neighbours(X, k)
    _, ind_y = _neighbours(Y, k)
    # Each neighbour list holds distinct indices, so an index appearing twice in the two lists put
    # together is a shared neighbour: sort the concatenation and count equal adjacent entries.
    both = np.sort(np.concatenate([ind_x[:, 1:], ind_y[:, 1:]], axis=1), axis=1)
    shared = np.sum(both[:, 1:] == both[:, :-1], axis=1)
    overlaps = shared / k
    return overlaps if per_point else float(overlaps.mean())
