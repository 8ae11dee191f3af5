"""The points the probe estimators take: input validation, de-duplication and neighbour tables.

Shared by every estimator of :mod:`alignd.probes.estimators` (whose docstring states the conventions):
points are the rows of a 2-D float array, and neighbours come from scikit-learn's ``NearestNeighbors``
queried on the data themselves, as dadapy does, with column 0 always the point itself.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from sklearn.neighbors import NearestNeighbors

_EPS = float(np.finfo(np.float64).eps)
# dadapy's default neighbourhood size for tables it builds itself (Base.__init__: min(100, N - 1)).
_DEFAULT_MAXK = 100


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
