"""Regenerate the dadapy reference values that tests/test_probe_estimators.py checks against.

dadapy 0.3.4 pins numpy<2, so it cannot live in the project's environment (vLLM needs numpy 2).
This script therefore runs in a separate, throw-away virtualenv; the project itself never imports
dadapy. From the repository root:

    python3 -m venv /tmp/dadapy-env
    /tmp/dadapy-env/bin/pip install dadapy==0.3.4 'numpy<2'
    /tmp/dadapy-env/bin/python probes/goldens/make_goldens.py

It writes, next to itself:

* ``datasets.npz``: the synthetic inputs (float64), drawn once from a fixed seed. The tests read
  this file rather than re-drawing from the seed, so a change in numpy's random streams between
  numpy 1.x (here) and numpy 2.x (the project) can never make data and goldens disagree.
* ``dadapy_goldens.json``: what dadapy returns on those inputs, with the dadapy / numpy /
  scikit-learn versions and every parameter passed.

Rerunning it rewrites both files; the data come out identical as long as numpy's PCG64 streams for
``standard_normal`` do not change.
"""

from __future__ import annotations

import json
import math
import platform
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
from dadapy import Data
from sklearn.metrics import adjusted_rand_score

HERE = Path(__file__).resolve().parent
SEED = 20240611


def make_datasets() -> dict[str, np.ndarray]:
    """Fixed synthetic data; small (a few hundred points) so the committed npz stays < 1 MB."""
    rng = np.random.default_rng(SEED)
    out: dict[str, np.ndarray] = {}

    # 1. A 5-dimensional Gaussian cloud linearly embedded in 100 dimensions (orthonormal columns,
    #    so distances are preserved) plus small isotropic noise: true ID 5.
    latent = rng.standard_normal((500, 5))
    basis, _ = np.linalg.qr(rng.standard_normal((100, 5)))
    out["manifold"] = latent @ basis.T + 0.01 * rng.standard_normal((500, 100))

    # 2. Four unit-variance Gaussian blobs in 12 dimensions, centres 6 apart along the axes
    #    (pairwise separation ~8.5 sigma), unbalanced sizes: ADP should find the 4 clusters.
    sizes = [150, 100, 80, 70]
    centres = 6.0 * np.eye(4, 12)
    out["blobs"] = np.concatenate([c + rng.standard_normal((n, 12)) for c, n in zip(centres, sizes, strict=False)])
    out["blobs_labels"] = np.repeat(np.arange(4), sizes)

    # 3. Six strongly overlapping classes (random centres, scale 1.5, in 12 dimensions): ADP must
    #    merge many putative peaks and keeps large halos; label overlaps fall well below 1.
    sizes = [90, 80, 70, 60, 50, 40]
    centres = 1.5 * rng.standard_normal((6, 12))
    out["overlapping"] = np.concatenate(
        [c + rng.standard_normal((n, 12)) for c, n in zip(centres, sizes, strict=False)]
    )
    out["overlapping_labels"] = np.repeat(np.arange(6), sizes)

    # 4. Two noisy views of the same 300 items (random linear maps of an 8-d latent into 20-d):
    #    their neighbourhood overlap is well between 0 and 1.
    latent = rng.standard_normal((300, 8))
    out["view_a"] = latent @ rng.standard_normal((8, 20)) + 0.5 * rng.standard_normal((300, 20))
    out["view_b"] = latent @ rng.standard_normal((8, 20)) + 0.5 * rng.standard_normal((300, 20))
    return out


def floats(a) -> list:
    return [float(x) for x in np.asarray(a, dtype=np.float64).ravel()]


def ints(a) -> list:
    return [int(x) for x in np.asarray(a).ravel()]


def twonn_goldens(ds):
    res = {}
    for name in ("manifold", "blobs", "overlapping", "view_a"):
        for algorithm, mu_fraction in (("base", 0.9), ("base", 0.8), ("ml", 0.9)):
            d = Data(coordinates=ds[name])
            id_, _, scale = d.compute_id_2NN(algorithm=algorithm, mu_fraction=mu_fraction)
            res[f"{name}/{algorithm}/{mu_fraction}"] = {
                "dataset": name,
                "call": f"Data(X).compute_id_2NN(algorithm={algorithm!r}, mu_fraction={mu_fraction})",
                "algorithm": algorithm,
                "mu_fraction": mu_fraction,
                "id": float(id_),
                "scale": float(scale),
            }
    return res


def gride_goldens(ds):
    res = {}
    for name in ("manifold", "blobs", "view_a"):
        d = Data(coordinates=ds[name])
        ids, errs, rs = d.return_id_scaling_gride(range_max=64)
        res[f"{name}/64"] = {
            "dataset": name,
            "call": "Data(X).return_id_scaling_gride(range_max=64)",
            "range_max": 64,
            "ids": floats(ids),
            "errs": floats(errs),
            "scales": floats(rs),
        }
    # The paper's route: neighbours computed first (maxk=200), Gride on those stored distances.
    d = Data(coordinates=ds["manifold"])
    d.compute_distances(maxk=200)
    ids, errs, rs = d.return_id_scaling_gride(range_max=100)
    res["manifold/precomputed/100"] = {
        "dataset": "manifold",
        "call": "d=Data(X); d.compute_distances(maxk=200); d.return_id_scaling_gride(range_max=100)",
        "range_max": 100,
        "ids": floats(ids),
        "errs": floats(errs),
        "scales": floats(rs),
    }
    return res


def knn_density_goldens(ds):
    res = {}
    for name, k, set_id in (("manifold", 16, None), ("blobs", 10, None), ("blobs", 16, 5.0)):
        d = Data(coordinates=ds[name])
        if set_id is not None:
            d.compute_distances()  # compute_density_kNN only computes neighbours via compute_id_2NN
            d.set_id(set_id)
        log_den, log_den_err = d.compute_density_kNN(k=k)
        res[f"{name}/{k}/{set_id}"] = {
            "dataset": name,
            "call": "Data(X)"
            + (f"; compute_distances(); set_id({set_id})" if set_id is not None else "")
            + f"; compute_density_kNN(k={k})",
            "k": k,
            "intrinsic_dim": float(d.intrinsic_dim),
            "intrinsic_dim_given": set_id,
            "log_den": floats(log_den),
            "log_den_err": floats(log_den_err),
        }
    return res


def pak_goldens(ds):
    res = {}
    for name in ("blobs", "overlapping"):
        d = Data(coordinates=ds[name])
        log_den, log_den_err = d.compute_density_PAk()
        res[name] = {
            "dataset": name,
            "call": "Data(X).compute_density_PAk()  (alpha=1e-6, ID from compute_id_2NN())",
            "maxk": int(d.maxk),
            "intrinsic_dim": float(d.intrinsic_dim),
            "kstar": ints(d.kstar),
            "log_den": floats(log_den),
            "log_den_err": floats(log_den_err),
        }
    return res


def adp_goldens(ds):
    res = {}
    # dadapy's default route: PAk density, ID from TwoNN, maxk = min(100, N-1).
    for name, z in (("blobs", 1.6), ("blobs", 1.65), ("overlapping", 1.6), ("overlapping", 1.0)):
        d = Data(coordinates=ds[name])
        labels = d.compute_clustering_ADP(Z=z, halo=False)
        centers = list(d.cluster_centers)
        n_clusters = int(d.N_clusters)
        labels_halo = d.compute_clustering_ADP(Z=z, halo=True)
        res[f"{name}/PAk/{z}"] = {
            "dataset": name,
            "call": f"Data(X).compute_clustering_ADP(Z={z}, halo=False|True)",
            "density": "PAk",
            "Z": z,
            "maxk": int(d.maxk),
            "intrinsic_dim": float(d.intrinsic_dim),
            "n_clusters": n_clusters,
            "centers": ints(centers),
            "labels": ints(labels),
            "labels_halo": ints(labels_halo),
            "core_fraction": float(np.mean(labels_halo != -1)),
            "ari_vs_truth": float(adjusted_rand_score(ds[f"{name}_labels"], labels)),
        }
    # The paper's route (geometry_icl_finetuning analysis/utils.py::analyze): neighbours up to maxk,
    # Gride ID at the k -> 2k scale, kNN density with fixed k=16, ADP with Z=1.6.
    k, z, maxk = 16, 1.6, 200
    for name in ("blobs", "overlapping"):
        d = Data(coordinates=ds[name])
        d.compute_distances(maxk=maxk)
        ids, _, _ = d.return_id_scaling_gride(range_max=100)
        d.set_id(ids[int(math.log2(k))])
        d.compute_density_kNN(k=k)
        labels = d.compute_clustering_ADP(Z=z, halo=False)
        centers = list(d.cluster_centers)
        n_clusters = int(d.N_clusters)
        labels_halo = d.compute_clustering_ADP(Z=z, halo=True)
        res[f"{name}/kNN/{z}"] = {
            "dataset": name,
            "call": (
                f"d=Data(X); d.compute_distances(maxk={maxk}); "
                f"ids=d.return_id_scaling_gride(range_max=100)[0]; d.set_id(ids[{int(math.log2(k))}]); "
                f"d.compute_density_kNN(k={k}); d.compute_clustering_ADP(Z={z}, halo=False|True)"
            ),
            "density": "kNN",
            "k": k,
            "Z": z,
            "maxk": maxk,
            "intrinsic_dim": float(d.intrinsic_dim),
            "n_clusters": n_clusters,
            "centers": ints(centers),
            "labels": ints(labels),
            "labels_halo": ints(labels_halo),
            "core_fraction": float(np.mean(labels_halo != -1)),
            "ari_vs_truth": float(adjusted_rand_score(ds[f"{name}_labels"], labels)),
        }
    return res


def label_overlap_goldens(ds):
    res = {}
    cases = (
        ("overlapping", dict(k=30)),
        ("overlapping", dict(k=30, weighted=False)),
        ("overlapping", dict(class_fraction=0.3)),
        ("overlapping", dict(k=10, class_fraction=0.3, weighted=False)),
        ("blobs", dict(k=30)),
    )
    for name, kwargs in cases:
        d = Data(coordinates=ds[name])
        value = d.return_label_overlap(ds[f"{name}_labels"], **kwargs)
        key = name + "/" + ",".join(f"{a}={b}" for a, b in kwargs.items())
        res[key] = {
            "dataset": name,
            "call": f"Data(X).return_label_overlap(labels, {kwargs})",
            "kwargs": kwargs,
            "overlap": float(value),
        }
    return res


def data_overlap_goldens(ds):
    res = {}
    for a, b, k in (("view_a", "view_b", 30), ("view_a", "view_b", 10), ("view_a", "view_a", 30)):
        d = Data(coordinates=ds[a])
        value = d.return_data_overlap(coordinates=ds[b], k=k)
        per_point = d.return_data_overlap(coordinates=ds[b], k=k, avg=False)
        res[f"{a}/{b}/{k}"] = {
            "datasets": [a, b],
            "call": f"Data(A).return_data_overlap(coordinates=B, k={k})",
            "k": k,
            "overlap": float(value),
            "per_point": floats(per_point),
        }
    return res


def main() -> None:
    warnings.simplefilter("ignore")  # dadapy warns about unset IDs etc.; nothing here depends on it
    ds = make_datasets()
    np.savez_compressed(HERE / "datasets.npz", **ds)
    goldens = {
        "generator": "probes/goldens/make_goldens.py",
        "seed": SEED,
        "versions": {
            "dadapy": version("dadapy"),
            "numpy": np.__version__,
            "scikit-learn": version("scikit-learn"),
            "scipy": version("scipy"),
            "python": platform.python_version(),
        },
        "twonn": twonn_goldens(ds),
        "gride": gride_goldens(ds),
        "knn_density": knn_density_goldens(ds),
        "pak_density": pak_goldens(ds),
        "adp": adp_goldens(ds),
        "label_overlap": label_overlap_goldens(ds),
        "data_overlap": data_overlap_goldens(ds),
    }
    with open(HERE / "dadapy_goldens.json", "w") as f:
        json.dump(goldens, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
