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

The estimators live in one module per quantity, all re-exported here: :mod:`alignd.probes.points`
(validation, de-duplication, neighbour tables), :mod:`alignd.probes.intrinsic_dim` (TwoNN, Gride),
:mod:`alignd.probes.density` (k-NN, PAk), :mod:`alignd.probes.density_peaks` (ADP clustering) and
:mod:`alignd.probes.overlaps` (ARI, label and neighbourhood overlap).
"""

from __future__ import annotations

# _adp and _neighbours are re-exported for tests/test_probe_estimators.py, which exercises them directly.
from alignd.probes.density import LogDensity, knn_density, pak_density
from alignd.probes.density_peaks import ADPResult, adp_clustering
from alignd.probes.density_peaks import _adp as _adp
from alignd.probes.intrinsic_dim import GrideScaling, gride_id, gride_scaling, twonn_id
from alignd.probes.overlaps import adjusted_rand_index, label_overlap, neighbourhood_overlap
from alignd.probes.points import _neighbours as _neighbours
from alignd.probes.points import unique_points

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
