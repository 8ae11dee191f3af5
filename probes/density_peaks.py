"""Advanced Density Peaks clustering (d'Errico et al. 2021), as dadapy's ``compute_clustering_ADP``."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from alignd.probes.density import LogDensity, _knn_log_density, _pak_from_neighbours
from alignd.probes.intrinsic_dim import _id_or_twonn
from alignd.probes.points import (
    _DEFAULT_MAXK,
    _as_int,
    _as_points,
    _check_intrinsic_dim,
    _need_neighbours,
    _neighbours,
    _reject_duplicates,
)


@dataclass(frozen=True)
class ADPResult:
    """Outcome of Advanced Density Peaks clustering (dadapy ``compute_clustering_ADP``)."""

    labels: np.ndarray  # cluster of every point, 0..n_clusters-1 (dadapy halo=False)
    labels_halo: np.ndarray  # same, with -1 for halo points (dadapy halo=True)
    n_clusters: int  # surviving density peaks (dadapy N_clusters)
    centers: np.ndarray  # index of each cluster's density peak (dadapy cluster_centers)
    core_fraction: float  # fraction of points not in a halo: mean(labels_halo != -1)
    density: LogDensity  # the density the clustering ran on


def _density_peaks(kstar, ind, g):
    """Steps 1 and 2 of ADP: the density peaks of the table, and what step 3 needs of the others.

    Returns (in_k, centers, removed, absorber): ``in_k[i, c]`` says column c of row i is among i's k*
    neighbours; ``removed`` marks the putative peaks found not to be peaks, and ``absorber`` names, for
    each, the densest point that has it in its k*-neighbourhood (-1 elsewhere).
    """
    n = g.shape[0]
    n_cols = ind.shape[1]
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
    return in_k, centers, removed, absorber


def _assign_to_peaks(ind, g, centers, removed, absorber) -> np.ndarray:
    """Step 3 of ADP: the preliminary cluster of every point (clusters numbered as ``centers``)."""
    # Densest first: a point joins the cluster of its nearest labelled neighbour. A point with none
    # among its neighbours is necessarily a removed peak; it joins the cluster of the densest absorber
    # among the removed peaks in its neighbourhood (itself included). This is what dadapy's Cython
    # intends; its bookkeeping there is off by one row, so in this rare case dadapy's choice can differ
    # (never reached on the golden data).
    cluster = np.full(g.shape[0], -1, dtype=np.int64)
    cluster[centers] = np.arange(centers.size)
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
    return cluster


def _saddles(in_k, ind, cluster, centers, g, rho, log_den_err):
    """Step 4 of ADP: the saddle between every pair of clusters, as (rho_bord, rho_bord_err), each of
    shape (n_clusters, n_clusters): the saddle point's density and its error, 0 where a pair has no
    saddle and -1 (error 0) on the diagonal."""
    # Point p1 of cluster c borders cluster c' if (a) its first k*-neighbour outside c, p2, lies in c',
    # (b) no point of c is closer to p2 than p1, and (c) p1 has the largest g among such points; p1 is
    # never a peak. Candidates are visited in dadapy's order (cluster, then point index) so that ties
    # resolve identically.
    n, n_clus = g.shape[0], centers.size
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
    return rho_bord, rho_bord_err


def _merge_weak_peaks(cluster, rho_bord, rho_bord_err, rho_c, err_c, z: float) -> np.ndarray:
    """Step 5 of ADP, the multimodality test: which peaks survive (a boolean per peak).

    While some pair of peaks is not separated by more than Z standard errors above their saddle,
    merge the pair with the highest saddle (first such pair in row-major order on ties, as dadapy),
    dropping the less significant peak of the two. Updates ``cluster`` and the saddles in place.
    """
    n_clus = rho_c.size
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
    return alive


def _adp(kstar, ind, log_den, log_den_err, z: float):
    """ADP on a neighbour table, as dadapy ``cython_clustering._compute_clustering``.

    Returns (labels, labels_halo, centers). Peaks are numbered in increasing point index, as dadapy.
    """
    # Shift log densities so that rho - Z * err > 0 everywhere (dadapy: helps the comparisons below).
    rho = log_den - np.min(log_den - z * log_den_err) + 1
    g = rho - log_den_err
    in_k, centers, removed, absorber = _density_peaks(kstar, ind, g)
    cluster = _assign_to_peaks(ind, g, centers, removed, absorber)
    rho_bord, rho_bord_err = _saddles(in_k, ind, cluster, centers, g, rho, log_den_err)
    alive = _merge_weak_peaks(cluster, rho_bord, rho_bord_err, rho[centers], log_den_err[centers], z)

    # 6. Final labels: surviving peaks renumbered in order. Halo: points of a cluster whose density
    #    is below the cluster's highest saddle towards any other cluster.
    survivors = np.flatnonzero(alive)
    renumber = np.full(centers.size, -1, dtype=np.int64)
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
