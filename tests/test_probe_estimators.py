"""The probe estimators against dadapy 0.3.4's own outputs, and against known ground truth.

The goldens (probes/goldens/dadapy_goldens.json) and the data they were computed on
(probes/goldens/datasets.npz) come from probes/goldens/make_goldens.py, run in a separate
environment with dadapy; dadapy is never imported here. The data are read from the npz, not
re-drawn, so numpy's random streams cannot make data and goldens drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alignd.probes.estimators import (
    _adp,
    _neighbours,
    adjusted_rand_index,
    adp_clustering,
    gride_id,
    gride_scaling,
    knn_density,
    label_overlap,
    neighbourhood_overlap,
    pak_density,
    twonn_id,
    unique_points,
)

GOLDENS_DIR = Path(__file__).resolve().parents[1] / "probes" / "goldens"


@pytest.fixture(scope="module")
def goldens() -> dict:
    with open(GOLDENS_DIR / "dadapy_goldens.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    with np.load(GOLDENS_DIR / "datasets.npz") as npz:
        return {name: npz[name] for name in npz.files}


def test_goldens_come_from_the_pinned_dadapy(goldens):
    assert goldens["versions"]["dadapy"] == "0.3.4"


# --------------------------------------------------------------------------------------------------
# Agreement with dadapy
# --------------------------------------------------------------------------------------------------


def test_twonn_matches_dadapy(goldens, data):
    for key, g in goldens["twonn"].items():
        algorithm = "ml" if g["algorithm"] == "ml" else "fit"
        got = twonn_id(data[g["dataset"]], mu_fraction=g["mu_fraction"], algorithm=algorithm)
        if algorithm == "ml":
            # Closed form on the same neighbour distances: equal to rounding.
            assert got == pytest.approx(g["id"], rel=1e-12), key
        else:
            # dadapy fits the slope with scipy's iterative curve_fit (tolerance ~1.5e-8); we use the
            # exact least-squares slope. Measured difference: <= 5e-9 absolute (5e-10 relative).
            assert got == pytest.approx(g["id"], rel=1e-7), key


def test_gride_scaling_matches_dadapy(goldens, data):
    for key, g in goldens["gride"].items():
        got = gride_scaling(data[g["dataset"]], range_max=g["range_max"])
        assert got.ids.shape == (len(g["ids"]),), key
        # Same ratios and the same bisection as dadapy; the only freedom is the bisection's
        # 1e-7 bracket if a ratio differs in its last bits. Measured difference: 0.
        np.testing.assert_allclose(got.ids, g["ids"], rtol=0, atol=1e-6, err_msg=key)
        # Closed-form functions of the same numbers. Measured: <= 3e-17 (errs), <= 2e-15 (scales).
        np.testing.assert_allclose(got.errs, g["errs"], rtol=1e-9, err_msg=key)
        np.testing.assert_allclose(got.scales, g["scales"], rtol=1e-9, err_msg=key)
        np.testing.assert_array_equal(got.ranks, 2 ** np.arange(1, len(g["ids"]) + 1))


def test_gride_id_is_the_k_to_2k_scale(goldens, data):
    # The paper's estimate: ratio of the 32nd to the 16th neighbour distance = scaling index 4.
    g = goldens["gride"]["manifold/64"]
    assert gride_id(data["manifold"], k=16) == pytest.approx(g["ids"][4], abs=1e-6)
    assert gride_id(data["manifold"], k=4) == pytest.approx(g["ids"][2], abs=1e-6)


def test_knn_density_matches_dadapy(goldens, data):
    for key, g in goldens["knn_density"].items():
        got = knn_density(data[g["dataset"]], k=g["k"], intrinsic_dim=g["intrinsic_dim_given"])
        # With the ID given the formula is closed-form: rounding only (measured 4e-15). With the ID
        # from TwoNN, its fit difference (<= 1e-10) is multiplied by log r_k. Measured: 1.2e-10.
        atol = 1e-12 if g["intrinsic_dim_given"] is not None else 1e-8
        assert got.intrinsic_dim == pytest.approx(g["intrinsic_dim"], rel=1e-7), key
        np.testing.assert_allclose(got.log_den, g["log_den"], rtol=0, atol=atol, err_msg=key)
        np.testing.assert_allclose(got.log_den_err, g["log_den_err"], rtol=1e-15, err_msg=key)
        assert np.all(got.kstar == g["k"])


def test_pak_density_matches_dadapy(goldens, data):
    for key, g in goldens["pak_density"].items():
        got = pak_density(data[g["dataset"]])
        # k* is an integer decided by a likelihood-ratio test on the same distances: exact.
        np.testing.assert_array_equal(got.kstar, g["kstar"], err_msg=key)
        # dadapy stops its damped Newton once the relative gradient is < 1e-3, so its value sits
        # up to ~1e-3 from the exact optimum; we run the same iteration, which leaves only rounding
        # (summation order) that could, rarely, cost one extra step. Measured: <= 9e-10.
        np.testing.assert_allclose(got.log_den, g["log_den"], rtol=0, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(got.log_den_err, g["log_den_err"], rtol=1e-15, err_msg=key)
        assert got.intrinsic_dim == pytest.approx(g["intrinsic_dim"], rel=1e-7)


def test_adp_clustering_matches_dadapy(goldens, data):
    for key, g in goldens["adp"].items():
        X = data[g["dataset"]]
        if g["density"] == "PAk":
            got = adp_clustering(X, Z=g["Z"])
        else:
            # The paper's route: Gride ID at the k -> 2k scale, kNN density with k = 16.
            intrinsic_dim = gride_id(X, k=g["k"])
            assert intrinsic_dim == pytest.approx(g["intrinsic_dim"], abs=1e-6), key
            got = adp_clustering(X, Z=g["Z"], density="kNN", k=g["k"], intrinsic_dim=intrinsic_dim, maxk=g["maxk"])
        # A partition is discrete: same peaks, same labels, same halo, exactly.
        assert got.n_clusters == g["n_clusters"], key
        np.testing.assert_array_equal(got.centers, g["centers"], err_msg=key)
        np.testing.assert_array_equal(got.labels, g["labels"], err_msg=key)
        np.testing.assert_array_equal(got.labels_halo, g["labels_halo"], err_msg=key)
        assert got.core_fraction == g["core_fraction"], key
        truth = data[f"{g['dataset']}_labels"]
        assert adjusted_rand_index(got.labels, truth) == pytest.approx(g["ari_vs_truth"], abs=1e-12)


def test_label_overlap_matches_dadapy(goldens, data):
    for key, g in goldens["label_overlap"].items():
        kwargs = dict(g["kwargs"])
        k = kwargs.pop("k", None)
        got = label_overlap(data[g["dataset"]], data[f"{g['dataset']}_labels"], k, **kwargs)
        # Counting over identical neighbour lists: exact up to the rounding of the average.
        assert got == pytest.approx(g["overlap"], abs=1e-12), key


def test_neighbourhood_overlap_matches_dadapy(goldens, data):
    for key, g in goldens["data_overlap"].items():
        a, b = (data[name] for name in g["datasets"])
        assert neighbourhood_overlap(a, b, k=g["k"]) == pytest.approx(g["overlap"], abs=1e-12), key
        per_point = neighbourhood_overlap(a, b, k=g["k"], per_point=True)
        np.testing.assert_array_equal(per_point, g["per_point"], err_msg=key)


# --------------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------------


def test_ids_of_a_5d_manifold_in_100d_are_near_5(data):
    X = data["manifold"]
    assert X.shape == (500, 100)
    assert twonn_id(X) == pytest.approx(5.0, abs=1.0)
    assert twonn_id(X, algorithm="ml") == pytest.approx(5.0, abs=1.0)
    assert gride_id(X, k=16) == pytest.approx(5.0, abs=1.0)
    scaling = gride_scaling(X)
    assert np.all(np.abs(scaling.ids - 5.0) < 1.0), scaling.ids
    assert np.all(np.diff(scaling.scales) > 0)  # larger ranks reach farther


def test_twonn_is_invariant_to_rotation_and_scale(data):
    X = data["view_a"]
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((X.shape[1], X.shape[1])))
    assert twonn_id(3.0 * X @ q + 7.0) == pytest.approx(twonn_id(X), rel=1e-9)


def test_adp_finds_the_four_blobs(data):
    X, truth = data["blobs"], data["blobs_labels"]
    for result in (
        adp_clustering(X),  # dadapy's default route (PAk density)
        adp_clustering(X, density="kNN", k=16, intrinsic_dim=gride_id(X, 16), maxk=200),  # paper
    ):
        assert result.n_clusters == 4
        assert adjusted_rand_index(result.labels, truth) > 0.95
        assert set(np.unique(result.labels)) == {0, 1, 2, 3}
        # Peaks belong to their own cluster, are core points, and halos only relabel points.
        np.testing.assert_array_equal(result.labels[result.centers], np.arange(4))
        core = result.labels_halo != -1
        np.testing.assert_array_equal(result.labels_halo[core], result.labels[core])
        assert result.core_fraction == pytest.approx(core.mean())
        assert 0.5 < result.core_fraction <= 1.0


def test_adp_merges_more_with_larger_z(data):
    X = data["overlapping"]
    counts = [adp_clustering(X, Z=z).n_clusters for z in (0.5, 1.0, 1.6, 3.0)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1], counts


def test_adp_never_leaves_a_point_unassigned_when_no_neighbour_is_labelled():
    # Hand-made neighbour table (column 0 = self, maxk = 2, k* = 2) in which point 1 is a local
    # density maximum within its own neighbourhood but lies in the neighbourhood of the denser
    # point 0, which is not among point 1's neighbours. Point 1 is thus a removed peak none of whose
    # neighbours is labelled when its turn comes; it must join the cluster of the point that
    # absorbed it. (dadapy 0.3.4's Cython reads the wrong row here: it raises, or leaves the point
    # out of every cluster with an uninitialised label.)
    ind = np.array([[0, 1, 2], [1, 3, 4], [2, 0, 1], [3, 1, 4], [4, 1, 3], [5, 4, 3]])
    log_den = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    err = np.full(6, 0.1)
    labels, labels_halo, centers = _adp(np.full(6, 2), ind, log_den, err, 1.6)
    np.testing.assert_array_equal(centers, [0])
    np.testing.assert_array_equal(labels, np.zeros(6))
    np.testing.assert_array_equal(labels_halo, np.zeros(6))  # one cluster: no saddle, no halo


def test_knn_density_is_higher_where_points_are_denser():
    rng = np.random.default_rng(1)
    X = np.concatenate([0.1 * rng.standard_normal((100, 3)), 3.0 * rng.standard_normal((100, 3))])
    dens = knn_density(X, k=10, intrinsic_dim=3)
    assert np.median(dens.log_den[:100]) > np.median(dens.log_den[100:]) + 5
    # Default ID is TwoNN's, as in dadapy.
    assert knn_density(X, k=10).intrinsic_dim == pytest.approx(twonn_id(X))
    # log rho for a uniform density is -log(volume): check the normalisation on a big uniform cube.
    U = np.random.default_rng(2).uniform(size=(4000, 2))
    est = knn_density(U, k=16, intrinsic_dim=2).log_den
    assert np.median(est) == pytest.approx(0.0, abs=0.1)


def test_overlaps_of_identical_representations_are_one(data):
    X, labels = data["view_a"], data["overlapping_labels"][:300]
    assert neighbourhood_overlap(X, X, k=30) == 1.0
    # Neighbourhoods are unchanged by rotation, translation and scaling.
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((20, 20)))
    assert neighbourhood_overlap(X, 2.5 * X @ q - 1.0, k=10) == 1.0
    assert label_overlap(X, np.zeros(300), k=30) == 1.0
    # Labels are only compared for equality: strings give the same value as the integers they name.
    named = np.array(["a", "b", "c", "d", "e", "f"])[labels]
    assert label_overlap(X, named, class_fraction=0.3) == label_overlap(X, labels, class_fraction=0.3)
    assert adjusted_rand_index(labels, labels) == 1.0


def test_overlap_with_unrelated_representation_is_near_chance():
    rng = np.random.default_rng(4)
    X, Y = rng.standard_normal((400, 10)), rng.standard_normal((400, 10))
    # Two independent neighbour sets of size k among N - 1 share about k^2/(N-1) items.
    assert neighbourhood_overlap(X, Y, k=20) == pytest.approx(20 / 399, abs=0.03)


def test_label_overlap_counts_same_label_neighbours():
    # Points on a line, labels in runs of 5: each point's 2 nearest neighbours are its line
    # neighbours, so the overlap is the fraction of those in the same run.
    X = np.arange(20, dtype=float)[:, None]
    labels = np.repeat([0, 1, 2, 3], 5)
    per_point = np.array([1.0 if (i % 5) not in (0, 4) else 0.5 for i in range(20)])
    per_point[[0, 19]] = 1.0  # the ends have both nearest neighbours on one side
    assert label_overlap(X + 0.01 * np.sin(X), labels, k=2) == pytest.approx(per_point.mean())


def test_duplicates_are_handled_in_overlaps_and_rejected_elsewhere():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((60, 4))
    X = np.concatenate([base, base[:20]])  # 20 duplicated rows
    dist, ind = _neighbours(X, 5)
    n = X.shape[0]
    assert np.all(ind[:, 0] == np.arange(n))  # every point is its own column 0 ...
    assert not np.any(ind[:, 1:] == np.arange(n)[:, None])  # ... and never its own neighbour
    assert np.all(dist[60:, 1] == 0.0)  # the twin is the nearest neighbour
    assert neighbourhood_overlap(X, X, k=5) == 1.0
    for estimator in (twonn_id, gride_id, knn_density, pak_density, adp_clustering):
        with pytest.raises(ValueError, match="20 duplicated point"):
            estimator(X)
    keep = unique_points(X)
    np.testing.assert_array_equal(keep, np.arange(60))
    assert twonn_id(X[keep]) == twonn_id(base)


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda X: twonn_id(X[0]), "2-D array"),
        (lambda X: twonn_id(X[:2]), "has 2 points; this estimator needs at least 3"),
        (lambda X: twonn_id(np.where(X > 1, np.nan, X)), "NaN or infinite"),
        (lambda X: twonn_id(X.astype(str)), "real numbers"),
        (lambda X: twonn_id(X, mu_fraction=0.0), "mu_fraction must be in"),
        (lambda X: twonn_id(X, algorithm="mle"), "algorithm must be"),
        (lambda X: gride_id(X, k=25), "needs 50 neighbours per point, but X has only 50 points"),
        (lambda X: gride_id(X, k=0), "k must be >= 1"),
        (lambda X: gride_id(X, k=2.5), "k must be an integer"),
        (lambda X: gride_scaling(X, range_max=1), "range_max must be >= 2"),
        (lambda X: knn_density(X, k=50), "needs 50 neighbours"),
        (lambda X: knn_density(X, intrinsic_dim=-1.0), "intrinsic_dim must be a positive"),
        (lambda X: pak_density(X, maxk=60), "needs 60 neighbours"),
        (lambda X: adp_clustering(X, density="kde"), "density must be 'PAk' or 'kNN'"),
        (lambda X: adp_clustering(X, Z=0), "Z must be a positive number"),
        (lambda X: adp_clustering(X, density="kNN", k=30, maxk=20), "k=30 exceeds maxk=20"),
        (lambda X: label_overlap(X, np.zeros(49)), "labels has 49 entries but there are 50"),
        (lambda X: label_overlap(X, np.zeros(50), k=50), "needs 50 neighbours"),
        (lambda X: label_overlap(X, np.zeros(50), k=None), "give k or class_fraction"),
        (lambda X: label_overlap(X, np.zeros(50), class_fraction=1.5), "class_fraction must be"),
        (lambda X: neighbourhood_overlap(X, X[:40]), "X has 50 points but Y has 40"),
        (lambda X: neighbourhood_overlap(X, X, k=50), "needs 50 neighbours"),
        (lambda X: adjusted_rand_index(np.zeros(3), np.zeros(4)), "labels_a has 3 entries"),
        (lambda X: adjusted_rand_index(np.zeros((3, 2)), np.zeros(3)), "must be 1-D"),
    ],
)
def test_bad_inputs_raise_value_errors_that_say_what_is_wrong(call, message):
    X = np.random.default_rng(6).standard_normal((50, 3))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(X)


def test_validation_accepts_float32_and_integer_inputs():
    rng = np.random.default_rng(7)
    X = rng.standard_normal((80, 6))
    # float32 is widened to float64 (as dadapy does); the estimate moves only by float32 rounding.
    assert twonn_id(X.astype(np.float32)) == pytest.approx(twonn_id(X), rel=1e-3)
    counts = rng.integers(0, 1000, size=(100, 5))  # integer features, distinct rows
    assert gride_id(counts, k=4) == gride_id(counts.astype(float), k=4)
