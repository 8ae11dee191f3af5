"""Models of the probe-analysis job endpoints (pydantic only)."""

from __future__ import annotations

from typing import Literal, cast

from pydantic import BaseModel, Field, model_validator

from alignd.probes.analysis import AnalysisParams
from alignd.probes.fewshot import MAX_SHOTS, FewShotItem
from alignd.server.openai_api.protocol import StrictModel

MAX_LABEL_SETS = 16
LabelValue = str | int


class ProbeParams(StrictModel):
    """Estimator parameters; the defaults are the paper's (Doimo et al.)."""

    k_id: int = Field(16, ge=1, le=256, description="GRIDE scale: ratio of the 2k-th to the k-th neighbour distance.")
    z: float = Field(1.6, gt=0, le=20, description="ADP merge confidence (standard errors).")
    k_density: int | None = Field(None, ge=1, le=256, description="k of the k-NN density; default k_id.")
    density: Literal["kNN", "PAk"] = Field("kNN", description="Density ADP runs on: 'kNN' (paper) or 'PAk'.")
    maxk: int | None = Field(None, ge=4, le=1000, description="Neighbour table of ADP; default min(100, N - 1).")
    k_overlap: int = Field(30, ge=1, le=500, description="Neighbours for label and neighbourhood overlap.")
    label_overlap_class_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Label overlap on a fraction of each class's size (paper: 0.3) instead of k_overlap.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ProbeParams:
        self.to_analysis()  # its ValueError names the parameter
        return self

    def to_analysis(self) -> AnalysisParams:
        return AnalysisParams(**self.model_dump())


class FewShotDataset(StrictModel):
    items: list[FewShotItem] = Field(min_length=1, description="Questions to build prompts for (one text each).")
    shots: list[int] = Field(
        default_factory=lambda: [0, 5],
        min_length=1,
        max_length=2,
        description=f"One or two shot counts (0..{MAX_SHOTS}); two are compared as two conditions.",
    )
    seed: int = Field(0, description="Seed of the shot choice (deterministic per item).")
    style: Literal["mmlu", "bare"] = Field("mmlu", description="'mmlu': with the subject header; 'bare': without.")
    shot_pool: list[FewShotItem] | None = Field(
        None, min_length=1, description="Items to draw shots from (like MMLU's dev set); default: the other items."
    )
    same_subject: bool = Field(True, description="Draw shots of the item's subject when there are enough.")

    @model_validator(mode="after")
    def _shots(self) -> FewShotDataset:
        bad = [s for s in self.shots if not 0 <= s <= MAX_SHOTS]
        if bad:
            raise ValueError(f"shots must be between 0 and {MAX_SHOTS}; got {bad}")
        if len(set(self.shots)) != len(self.shots):
            raise ValueError(f"shots must be distinct; got {self.shots}")
        return self


class CompareCondition(StrictModel):
    """The second condition: other texts for the same items (another prompt format), another model
    (a name from this server's ALIGND_PROBE_MODELS), or both."""

    name: str | None = Field(None, min_length=1, max_length=64)
    texts: list[str] | None = Field(None, min_length=1)
    model: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _something(self) -> CompareCondition:
        if self.texts is None and self.model is None:
            raise ValueError("compare needs 'texts' (same items, another format) and/or 'model' (another model)")
        return self


class ProbeJobRequest(StrictModel):
    texts: list[str] | None = Field(None, min_length=1, description="Texts to probe (one point each).")
    dataset: FewShotDataset | None = Field(None, description="A few-shot dataset instead of texts.")
    name: str | None = Field(None, min_length=1, max_length=64, description="Name of the first condition.")
    labels: dict[str, list[LabelValue]] = Field(
        default_factory=dict, description="Label sets {name: one label per text} for ARI and label overlap."
    )
    compare: CompareCondition | None = None
    layers: list[int] | Literal["all"] = Field(
        "all", description="Representation indices 0..L (0 = embeddings, L = after the final norm), or 'all'."
    )
    pooling: Literal["last", "mean"] = Field("last", description="Last token's state (paper) or the mean over tokens.")
    site: Literal["residual", "normed"] = Field(
        "residual", description="'residual': input of each block; 'normed': after the block's input norm (paper)."
    )
    params: ProbeParams = Field(default_factory=ProbeParams)

    @model_validator(mode="after")
    def _check(self) -> ProbeJobRequest:
        if (self.texts is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'texts' (a list of strings) or 'dataset' (few-shot items)")
        n = self.n_items
        for field, texts in (("texts", self.texts), ("compare.texts", self.compare.texts if self.compare else None)):
            if texts is None:
                continue
            if len(texts) != n:
                raise ValueError(f"{field} has {len(texts)} entries but there are {n} items; give one text per item")
            empty = [i for i, t in enumerate(texts) if not t.strip()]
            if empty:
                raise ValueError(f"{field}[{empty[0]}] is empty; every text needs content")
        if len(self.labels) > MAX_LABEL_SETS:
            raise ValueError(f"{len(self.labels)} label sets; at most {MAX_LABEL_SETS} are accepted")
        for name, values in self.labels.items():
            if not name.strip():
                raise ValueError("label set names must not be empty")
            if len(values) != n:
                raise ValueError(
                    f"labels '{name}' has {len(values)} entries but there are {n} texts; give one label per text"
                )
        if self.dataset is not None:
            taken = sorted({"answer", "subject"} & set(self.labels))
            if taken:
                raise ValueError(f"label set(s) {taken} come from the dataset itself; rename yours")
            if self.compare is not None and self.compare.texts is not None:
                raise ValueError(
                    "with a dataset, compare shot counts ('dataset.shots') or models ('compare.model'), not texts"
                )
            if self.compare is not None and len(self.dataset.shots) == 2:
                raise ValueError("a dataset with two shot counts already compares two conditions; drop 'compare'")
        params = self.params.to_analysis()
        if n < params.min_points:
            raise ValueError(
                f"{n} texts are too few for k_id={params.k_id} and k_overlap={params.k_overlap}: at least "
                f"{params.min_points} are needed (GRIDE reads each point's {2 * params.k_id}-th neighbour, the "
                f"overlaps its {params.k_overlap}-th); send more texts or lower params.k_id / params.k_overlap"
            )
        if self.layers != "all":
            if not self.layers:
                raise ValueError("layers is empty: give layer indices or 'all'")
            negative = [x for x in self.layers if x < 0]
            if negative:
                raise ValueError(f"layers must be >= 0 (0 = embeddings); got {negative}")
        return self

    @property
    def n_items(self) -> int:
        # _check: exactly one of 'texts' and 'dataset' is given
        return len(self.texts) if self.texts is not None else len(cast(FewShotDataset, self.dataset).items)


# ------------------------------------------------------------------------------------------ responses
class ProbeLayerResult(BaseModel):
    layer: int
    n_points: int
    n_unique: int = Field(description="Distinct points at this layer (duplicates are dropped before ID/ADP).")
    intrinsic_dimension: float | None = Field(description="GRIDE at scale 2k_id/k_id.")
    intrinsic_dimension_twonn: float | None
    num_peaks: int | None = Field(description="Density peaks surviving ADP merging at confidence z.")
    core_fraction: float | None = Field(description="Fraction of points outside the ADP halo.")
    ari: dict[str, float | None] = Field(description="Adjusted Rand index of the ADP clusters vs each label set.")
    label_overlap: dict[str, float | None]
    neighbourhood_overlap: float | None = Field(description="Shared k_overlap-NN with the other condition.")
    skipped: str | None = Field(None, description="Why ID/ADP numbers are missing at this layer, if they are.")


class ProbeConditionResult(BaseModel):
    condition: str
    layers: list[ProbeLayerResult]


class ProbeConditionInfo(BaseModel):
    name: str
    model: str
    n_texts: int
    tokens: int
    shots: int | None = None


class ProbeResult(BaseModel):
    condition: str = Field(description="Name of the condition 'layers' describes.")
    conditions: list[str]
    layers: list[ProbeLayerResult]
    compare: ProbeConditionResult | None = None
    params: dict
    timing: dict[str, float] = Field(default_factory=dict, description="Seconds per phase.")


class ProbeJobError(BaseModel):
    message: str
    code: str | None = None


class ProbeJobInfo(BaseModel):
    n_texts: int
    conditions: list[ProbeConditionInfo]
    layers: list[int]
    labels: list[str]
    pooling: str
    site: str


class ProbeJob(BaseModel):
    id: str
    object: Literal["probe.job"] = "probe.job"
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: float = Field(ge=0, le=1)
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: ProbeJobError | None = Field(None, description="Why a job failed or was cancelled.")
    request: ProbeJobInfo
    result: ProbeResult | None = None
    plot_url: str | None = Field(None, description="The PNG of the per-layer curves, once done.")


class ProbeJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ProbeJob] = Field(description="Known jobs, oldest first, without their results.")
