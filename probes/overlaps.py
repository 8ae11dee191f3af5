"""Comparisons between partitions and representations: adjusted Rand index, label and neighbourhood overlap."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score

from alignd.probes.points import _as_int, _as_points, _need_neighbours, _neighbours


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
