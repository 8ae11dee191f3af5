"""Per-layer geometry of representations, the recipe of Doimo et al. (ALGORITHMS.md §4), and its plot.

For each layer's points X (one row per text):

1. Drop duplicated rows (``unique_points``), as the paper does: zero distances make distance ratios
   and k-NN densities undefined. Intrinsic dimension, density, clustering and ARI use the distinct
   points; the overlaps use every point (they accept duplicates, and the rows of two conditions must
   stay aligned item by item).
2. Intrinsic dimension: GRIDE at scale 2k/k with ``k_id = 16`` (``intrinsic_dimension``), and TwoNN
   (``intrinsic_dimension_twonn``) beside it.
3. Advanced Density Peaks clustering on the k-NN density (``k_density``, default ``k_id``) computed
   with that GRIDE dimension, merge confidence ``z = 1.6``:
   ``adp_clustering(X, 1.6, density="kNN", k=16, intrinsic_dim=gride_id(X, 16), maxk=min(100, N-1))``.
   ``num_peaks`` = surviving density peaks, ``core_fraction`` = fraction of points outside the halo.
4. ``ari[name]``: adjusted Rand index between the clusters (every point assigned, dadapy's
   ``halo=False``) and each label set.
5. ``label_overlap[name]``: mean fraction of each point's ``k_overlap = 30`` nearest neighbours that
   share its label (class-weighted, dadapy's default), or with ``label_overlap_class_fraction``, the
   paper's per-class neighbourhood (fraction of the class size).
6. ``neighbourhood_overlap``: mean fraction of shared ``k_overlap`` nearest neighbours of the same
   item under another condition (other model, other prompt format, other number of shots).

A layer whose distinct points are too few for the estimators (e.g. the embeddings of texts that all
end with the same token) gets ``skipped`` = the reason and ``None`` for those numbers. The overlaps
need more than ``k_overlap`` distinct points (in both conditions, for the neighbourhood overlap):
otherwise the neighbour lists are decided by tie-breaking among identical rows and mean nothing.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from alignd.probes.estimators import (
    adjusted_rand_index,
    adp_clustering,
    gride_id,
    label_overlap,
    neighbourhood_overlap,
    twonn_id,
    unique_points,
)

ProgressCallback = Callable[[float], None]


@dataclass(frozen=True)
class AnalysisParams:
    """Estimator parameters; the defaults are the paper's."""

    k_id: int = 16  # GRIDE scale: ratio of the 2k-th to the k-th neighbour distance
    z: float = 1.6  # ADP merge confidence
    k_density: int | None = None  # k-NN density neighbours; None = k_id
    density: str = "kNN"  # "kNN" (paper) or "PAk" (dadapy's default)
    maxk: int | None = None  # neighbour table of the clustering; None = min(100, N - 1)
    k_overlap: int = 30  # neighbours for label and neighbourhood overlap
    label_overlap_class_fraction: float | None = None  # e.g. 0.3 (paper); overrides k_overlap for labels

    def __post_init__(self) -> None:
        for name in ("k_id", "k_overlap"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.k_density is not None and self.k_density < 1:
            raise ValueError("k_density must be >= 1")
        if not (math.isfinite(self.z) and self.z > 0):
            raise ValueError(f"z must be a positive number; got {self.z!r}")
        if self.density not in ("kNN", "PAk"):
            raise ValueError(f"density must be 'kNN' or 'PAk'; got {self.density!r}")
        if self.maxk is not None and self.maxk < max(4, self.density_k):
            raise ValueError(f"maxk must be >= max(4, k_density={self.density_k}); got {self.maxk}")

    @property
    def density_k(self) -> int:
        return self.k_density if self.k_density is not None else self.k_id

    @property
    def min_unique_points(self) -> int:
        """Distinct points a layer needs for ID, density and clustering: GRIDE wants 2k neighbours."""
        return max(2 * self.k_id + 1, self.density_k + 1, 5)

    @property
    def min_points(self) -> int:
        """Texts a job needs: enough for GRIDE at k_id and for the overlaps at k_overlap."""
        return max(self.min_unique_points, self.k_overlap + 1)


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _label_overlap(X: np.ndarray, labels: np.ndarray, params: AnalysisParams) -> float | None:
    if params.label_overlap_class_fraction is not None:
        _, counts = np.unique(labels, return_counts=True)
        if int(max(1, int(counts.max() * params.label_overlap_class_fraction))) > X.shape[0] - 1:
            return None
        return _finite(label_overlap(X, labels, class_fraction=params.label_overlap_class_fraction))
    if params.k_overlap > X.shape[0] - 1:
        return None
    return _finite(label_overlap(X, labels, k=params.k_overlap))


def analyse_layer(
    X: np.ndarray,
    labels: Mapping[str, Sequence] | None = None,
    params: AnalysisParams | None = None,
    other: np.ndarray | None = None,
    layer: int = 0,
) -> dict:
    """The per-layer numbers for points ``X`` (rows = items); ``other`` = the same items under
    another condition, for the neighbourhood overlap. See the module docstring."""
    params = params or AnalysisParams()
    labels = {name: np.asarray([str(v) for v in values]) for name, values in (labels or {}).items()}
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    for name, lab in labels.items():
        if lab.shape[0] != n:
            raise ValueError(f"labels '{name}' has {lab.shape[0]} entries but there are {n} points")
    keep = unique_points(X)
    Xu = X[keep]
    entry: dict = {
        "layer": int(layer),
        "n_points": int(n),
        "n_unique": int(keep.size),
        "intrinsic_dimension": None,
        "intrinsic_dimension_twonn": None,
        "num_peaks": None,
        "core_fraction": None,
        "ari": {name: None for name in labels},
        "label_overlap": {name: None for name in labels},
        "neighbourhood_overlap": None,
        "skipped": None,
    }
    if keep.size < params.min_unique_points:
        entry["skipped"] = (
            f"only {keep.size} distinct points of {n} at this layer; intrinsic dimension and clustering "
            f"at k_id={params.k_id} need at least {params.min_unique_points}"
        )
    else:
        try:
            gride = gride_id(Xu, params.k_id)
            entry["intrinsic_dimension"] = _finite(gride)
            entry["intrinsic_dimension_twonn"] = _finite(twonn_id(Xu))
            maxk = min(params.maxk or 100, keep.size - 1)
            adp = adp_clustering(
                Xu,
                params.z,
                density=params.density,
                k=params.density_k,
                intrinsic_dim=gride if math.isfinite(gride) and gride > 0 else None,
                maxk=maxk,
            )
            entry["num_peaks"] = int(adp.n_clusters)
            entry["core_fraction"] = _finite(adp.core_fraction)
            for name, lab in labels.items():
                entry["ari"][name] = _finite(adjusted_rand_index(adp.labels, lab[keep]))
        except ValueError as exc:  # degenerate geometry (near-duplicates ...): report, do not fail the job
            entry["skipped"] = f"estimators failed at this layer: {exc}"
    # Overlaps accept duplicated points, but with no more distinct points than neighbours the
    # neighbour lists are decided by tie-breaking among identical rows: report nothing then.
    if keep.size <= params.k_overlap:
        note = f"overlaps need more than k_overlap={params.k_overlap} distinct points (this layer has {keep.size})"
        entry["skipped"] = f"{entry['skipped']}; {note}" if entry["skipped"] else note
        return entry
    for name, lab in labels.items():
        entry["label_overlap"][name] = _label_overlap(X, lab, params)
    if other is not None:
        Y = np.asarray(other, dtype=np.float64)
        if Y.shape[0] != n:
            raise ValueError(f"the other condition has {Y.shape[0]} points at layer {layer}, this one {n}")
        if unique_points(Y).size > params.k_overlap:
            entry["neighbourhood_overlap"] = _finite(neighbourhood_overlap(X, Y, params.k_overlap))
    return entry


def analyse_layers(
    reps: Mapping[int, np.ndarray],
    labels: Mapping[str, Sequence] | None = None,
    params: AnalysisParams | None = None,
    other: Mapping[int, np.ndarray] | None = None,
    progress: ProgressCallback | None = None,
) -> list[dict]:
    """One :func:`analyse_layer` dict per layer of ``reps``, in layer order. ``other`` (same layers,
    same items) adds the neighbourhood overlap; ``progress(fraction)`` after every layer."""
    params = params or AnalysisParams()
    layers = sorted(reps)
    if other is not None:
        missing = [layer for layer in layers if layer not in other]
        if missing:
            raise ValueError(f"the other condition lacks layer(s) {missing}")
    out = []
    for i, layer in enumerate(layers):
        out.append(analyse_layer(reps[layer], labels, params, None if other is None else other[layer], layer))
        if progress is not None:
            progress((i + 1) / len(layers))
    return out


def analyse_conditions(
    conditions: Mapping[str, Mapping[int, np.ndarray]],
    labels: Mapping[str, Sequence] | None = None,
    params: AnalysisParams | None = None,
    progress: ProgressCallback | None = None,
) -> dict:
    """One or two conditions (name -> layer -> points, same items in the same order).

    Returns ``{"condition", "conditions", "params", "layers", "compare"}``: ``layers`` are the first
    condition's per-layer results, ``compare`` (second condition only) ``{"condition", "layers"}``;
    with two conditions both carry the (symmetric) neighbourhood overlap between them.
    """
    params = params or AnalysisParams()
    names = list(conditions)
    if not 1 <= len(names) <= 2:
        raise ValueError(f"give one or two conditions; got {len(names)}")
    first = conditions[names[0]]
    second = conditions[names[1]] if len(names) == 2 else None

    def part(offset: float, share: float) -> ProgressCallback | None:
        return None if progress is None else (lambda f: progress(offset + share * f))

    share = 1.0 / len(names)
    layers = analyse_layers(first, labels, params, second, part(0.0, share))
    compare = None
    if second is not None:
        compare_layers = analyse_layers(second, labels, params, None, part(share, share))
        for a, b in zip(layers, compare_layers, strict=False):
            b["neighbourhood_overlap"] = a["neighbourhood_overlap"]
        compare = {"condition": names[1], "layers": compare_layers}
    return {
        "condition": names[0],
        "conditions": names,
        "params": asdict(params),
        "layers": layers,
        "compare": compare,
    }


# ------------------------------------------------------------------------------------------- plot
_STYLES = ("-", "--", ":", "-.")


def _series(result) -> list[tuple[str, list[dict]]]:
    """(condition name, per-layer list) pairs from whatever ``plot_layers`` was given."""
    if isinstance(result, Mapping):
        out = [(str(result.get("condition") or "A"), list(result["layers"]))]
        compare = result.get("compare")
        if compare:
            out.append((str(compare.get("condition") or "B"), list(compare["layers"])))
        return out
    return [("", list(result))]


def _values(layers: list[dict], get) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for entry in layers:
        v = get(entry)
        xs.append(entry["layer"])
        ys.append(float("nan") if v is None else float(v))
    return xs, ys


def _plot_conditions(series, ax_id, ax_peaks, ax_ari, ax_ov) -> None:
    """Each condition's lines, in its own line style: the IDs, the number of peaks, the ARI and label
    overlap per label set (one colour per label set, the same in both panels)."""
    label_names = list(dict.fromkeys(name for _, layers in series for e in layers for name in e.get("ari", {})))
    colours = {name: f"C{i % 10}" for i, name in enumerate(label_names)}
    for s, (cond, layers) in enumerate(series):
        ls = _STYLES[s % len(_STYLES)]
        tag = f" ({cond})" if cond else ""
        ax_id.plot(
            *_values(layers, lambda e: e["intrinsic_dimension"]), ls, color="C0", marker=".", label=f"GRIDE{tag}"
        )
        ax_id.plot(
            *_values(layers, lambda e: e["intrinsic_dimension_twonn"]), ls, color="C7", alpha=0.7, label=f"TwoNN{tag}"
        )
        ax_peaks.plot(*_values(layers, lambda e: e["num_peaks"]), ls, color="C3", marker=".", label=f"peaks{tag}")
        for name in label_names:
            ax_ari.plot(
                *_values(layers, lambda e, n=name: e.get("ari", {}).get(n)),
                ls,
                color=colours[name],
                marker=".",
                label=f"{name}{tag}",
            )
            ax_ov.plot(
                *_values(layers, lambda e, n=name: e.get("label_overlap", {}).get(n)),
                ls,
                color=colours[name],
                marker=".",
                label=f"label overlap: {name}{tag}",
            )


def _plot_core_fraction(series, ax_peaks):
    """The core fraction of every condition on a right-hand axis of the peaks panel; returns that axis."""
    from matplotlib.ticker import MaxNLocator

    ax_core = ax_peaks.twinx()
    for s, (cond, layers) in enumerate(series):
        tag = f" ({cond})" if cond else ""
        ax_core.plot(
            *_values(layers, lambda e: e["core_fraction"]),
            _STYLES[s % len(_STYLES)],
            color="C2",
            alpha=0.6,
            label=f"core fraction{tag}",
        )
    ax_core.set_ylim(0, 1.05)
    ax_peaks.set_ylim(bottom=0)
    ax_peaks.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_core.set_ylabel("core fraction")
    return ax_core


def _plot_neighbourhood_overlap(series, ax_ov) -> None:
    """The neighbourhood overlap between the two conditions (stored on the first), where there is one."""
    first_layers = series[0][1]
    if any(e.get("neighbourhood_overlap") is not None for e in first_layers):
        names = [c for c, _ in series]
        ax_ov.plot(
            *_values(first_layers, lambda e: e["neighbourhood_overlap"]),
            "-",
            color="k",
            linewidth=2,
            marker="o",
            markersize=3,
            label=f"neighbourhood overlap {names[0]} vs {names[-1]}" if len(names) == 2 else "neighbourhood overlap",
        )


def _label_panels(ax_id, ax_peaks, ax_core, ax_ari, ax_ov) -> None:
    """Titles, axis labels and ranges, grids and legends (the peaks panel's legend lists its right-hand
    axis's lines too)."""
    from matplotlib.ticker import MaxNLocator

    ax_id.set_title("intrinsic dimension")
    ax_peaks.set_title("density peaks (ADP)")
    ax_ari.set_title("ARI of clusters vs labels")
    ax_ov.set_title("overlaps")
    ax_peaks.set_ylabel("number of peaks")
    ax_ari.set_ylim(-0.05, 1.05)
    ax_ov.set_ylim(-0.02, 1.02)
    for ax in (ax_ari, ax_ov):
        ax.set_xlabel("layer")
    for ax in (ax_id, ax_peaks, ax_ari, ax_ov):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, names = ax_peaks.get_legend_handles_labels()
    h2, n2 = ax_core.get_legend_handles_labels()
    ax_peaks.legend(handles + h2, names + n2, fontsize=8)
    for ax in (ax_id, ax_ari, ax_ov):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)


def plot_layers(result, path: str | Path | io.IOBase | None = None, *, title: str | None = None) -> bytes:
    """A PNG with four panels over layers: intrinsic dimension (GRIDE solid, TwoNN faint), number of
    density peaks (core fraction on the right axis), ARI per label set, overlaps (label overlap per
    label set and the neighbourhood overlap between the two conditions).

    ``result`` is :func:`analyse_conditions`'s dict (both conditions drawn, one line style each) or
    :func:`analyse_layers`'s list. Returns the PNG bytes; also writes them to ``path`` if given.
    Uses matplotlib's Agg canvas directly (no pyplot state), so it is safe in worker threads.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = _series(result)
    fig = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_id, ax_peaks, ax_ari, ax_ov = fig.subplots(2, 2, sharex=True).ravel()
    _plot_conditions(series, ax_id, ax_peaks, ax_ari, ax_ov)
    ax_core = _plot_core_fraction(series, ax_peaks)
    _plot_neighbourhood_overlap(series, ax_ov)
    _label_panels(ax_id, ax_peaks, ax_core, ax_ari, ax_ov)
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    if isinstance(path, (str, Path)):
        Path(path).write_bytes(data)
    elif path is not None:
        path.write(data)
    return data
