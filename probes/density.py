"""Per-point log-density: the k-NN estimator and PAk (Rodriguez et al. 2018), as dadapy computes them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln
from scipy.stats import chi2

from alignd.probes.intrinsic_dim import _id_or_twonn
from alignd.probes.points import (
    _DEFAULT_MAXK,
    _EPS,
    _as_int,
    _as_points,
    _check_intrinsic_dim,
    _need_neighbours,
    _neighbours,
    _reject_duplicates,
)


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
