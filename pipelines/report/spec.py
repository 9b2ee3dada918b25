"""What the report holds: its settings (ReportConfig), the ranker variants it finds, the comparisons, metrics and
targets it evaluates, and the settings it resolves from the run (`resolve_config`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterator

import pandas as pd

from contracts.names import VARIANTS
from contracts.settings import config_class
from pipelines.data.sources.simulator import SimulatorConfig

SCORE_PREFIX = "score__"
MODEL_ORDER = ("dlrm", "lightgbm")
VARIANT_ORDER = VARIANTS
MODEL_LABELS = {"dlrm": "DLRM", "lightgbm": "LightGBM"}
VARIANT_LABELS = {"base": "base", "lum": "+LUM", "pooled-history": "pooled-history", "lum+pooled": "LUM+pooled", "din": "DIN",
                  "din+lum": "DIN+LUM"}
METRICS = ("auc", "gauc", "logloss", "ne", "calibration")  # the variants table, each with an interval
LIFT_METRICS = ("auc", "gauc")  # the lift of LUM features
METRIC_LABELS = {"auc": "AUC", "gauc": "GAUC", "logloss": "logloss", "ne": "NE", "calibration": "calibration", "ctr": "CTR"}


@dataclass(frozen=True)
class Comparison:
    """A variant against its baseline: the LUM features added to a baseline ranker (kind "lum"), or one baseline
    against a weaker one (kind "baseline": is the strongest baseline really the strongest?)."""

    variant: str
    baseline: str
    title: str  # shown in tables
    subject: str  # the start of a verdict sentence
    kind: str = "lum"


# LUM comparisons strongest baseline first: target attention over the behaviours (what production rankers run, and
# what the LUM paper compares with), then the mean-pooled history, then no history at all. "At a glance" shows each
# model's first one present; every one is in the tables below it.
COMPARISONS = (
    Comparison("din+lum", "din", "DIN+LUM vs DIN", "LUM features on top of target attention"),
    Comparison("lum+pooled", "pooled-history", "LUM+pooled vs pooled-history", "LUM features on top of pooled history"),
    Comparison("lum", "base", "+LUM vs base", "LUM features"),
    Comparison("din", "pooled-history", "DIN vs pooled-history", "Target attention instead of mean pooling", "baseline"),
    Comparison("din", "base", "DIN vs base", "Target attention over the history", "baseline"),
)
_BY_TITLE = {c.title: c for c in COMPARISONS}


@dataclass(frozen=True)
class Target:
    """A goal from meta["targets"]: {key: threshold}. Met when the estimate reaches the threshold AND the 95% interval
    is above 0 (rule "min"), or when the interval is not entirely below 0 (rule "no_loss", threshold ignored)."""

    kind: str  # offline | ab
    metric: str
    comparison: Comparison
    rule: str  # min | no_loss


TARGETS = {
    "gauc_lift_min": Target("offline", "gauc", _BY_TITLE["+LUM vs base"], "min"),
    "auc_lift_min": Target("offline", "auc", _BY_TITLE["+LUM vs base"], "min"),
    "pooled_gauc_lift_min": Target("offline", "gauc", _BY_TITLE["LUM+pooled vs pooled-history"], "min"),
    "pooled_auc_lift_min": Target("offline", "auc", _BY_TITLE["LUM+pooled vs pooled-history"], "min"),
    "pooled_gauc_no_loss": Target("offline", "gauc", _BY_TITLE["LUM+pooled vs pooled-history"], "no_loss"),
    "ctr_lift_min": Target("ab", "ctr", _BY_TITLE["+LUM vs base"], "min"),
    # LUM over the strongest baseline: target attention (issue 33's targets)
    "din_gauc_lift_min": Target("offline", "gauc", _BY_TITLE["DIN+LUM vs DIN"], "min"),
    "din_auc_lift_min": Target("offline", "auc", _BY_TITLE["DIN+LUM vs DIN"], "min"),
    "din_ctr_lift_min": Target("ab", "ctr", _BY_TITLE["DIN+LUM vs DIN"], "min"),
    # the strongest baseline is at least as good as the mean-pooled one
    "din_vs_pooled_gauc_no_loss": Target("offline", "gauc", _BY_TITLE["DIN vs pooled-history"], "no_loss"),
}


@config_class
class ReportConfig:
    n_bootstrap: int = 200  # user resamples for the offline intervals (AUC costs a few ms per resample per variant)
    ab_bootstrap: int = 1000  # user resamples for the simulated A/B (cheap: per-user sums)
    seed: int = 0
    ks: tuple[int, ...] = (1, 5, 10)  # CTR@k of the simulated A/B
    target_k: int = 10  # the k of the `ctr_lift_min` target (the largest k when not in ks)
    # examination = (1 + position) ** -decay in the simulated A/B; None: meta["position_decay"], else the decay the
    # simulator generated the data with (meta["data"]), else the simulator's default. See resolve_config.
    position_decay: float | None = None
    slice_columns: tuple[str, ...] = ()  # condition columns to slice by; meta["slice_columns"] wins
    # user_history_len buckets: 0, 1-5, 6-20, 21+ (the short histories where LUM and semantic ids should help most)
    history_edges: tuple[int, ...] = (1, 6, 21)
    item_history_edges: tuple[int, ...] = (1, 6)  # item interactions before the row's day: 0, 1-5, 6+
    head_share: float = 0.2  # head items: the most popular, making up the first 20% of test impressions
    tail_share: float = 0.5  # tail items: the least popular, making up the last 50%; torso in between
    max_slice_values: int = 12  # a condition column's largest values; the rest are pooled as "other"
    calibration_bins: int = 10  # equal-count bins of the predicted CTR in the reliability diagram
    # predicted / observed clicks outside this band is flagged: 5% more or fewer clicks than observed is the error
    # at which a CTR used for pricing or thresholds needs recalibrating
    calibration_band: tuple[float, float] = (0.95, 1.05)
    title: str = "A/B lift report"

    def __post_init__(self) -> None:
        if self.n_bootstrap < 1 or self.ab_bootstrap < 1:
            raise ValueError("bootstrap sample counts must be >= 1")
        if not 0 < self.head_share < 1 or not 0 < self.tail_share < 1 or self.head_share + self.tail_share > 1:
            raise ValueError("head_share and tail_share must be in (0, 1) and sum to at most 1")
        for name in ("history_edges", "item_history_edges"):
            edges = getattr(self, name)
            if list(edges) != sorted(set(edges)) or (edges and edges[0] < 1):
                raise ValueError(f"{name} must be increasing integers >= 1")
        low, high = self.calibration_band
        if not 0 < low <= 1 <= high:
            raise ValueError(f"calibration_band must hold 1 (low <= 1 <= high, low > 0), got {self.calibration_band}")
        if self.position_decay is not None and self.position_decay < 0:
            raise ValueError(f"position_decay must be >= 0, got {self.position_decay}")


def simulator_position_decay(meta: dict[str, Any]) -> float | None:
    """The position decay the simulator generated the data with (meta["data"] is the run's dataset.json), if any."""
    source = (meta.get("data") or {}).get("source")
    if not isinstance(source, dict) or source.get("name") != "simulator":
        return None
    value = (source.get("config") or {}).get("position_decay")
    return None if value is None else float(value)


def resolve_config(config: ReportConfig, meta: dict[str, Any]) -> tuple[ReportConfig, str]:
    """The settings the report actually uses, and where the position decay came from.

    The resolved config is what the report shows and writes, so its configuration block states the values the
    simulated A/B and the slices used, not the defaults they were overridden by.
    """
    if meta.get("position_decay") is not None:
        decay, origin = float(meta["position_decay"]), "given with the run"
    elif config.position_decay is not None:
        decay, origin = float(config.position_decay), "the report config"
    elif simulator_position_decay(meta) is not None:
        decay, origin = float(simulator_position_decay(meta)), "the simulator config of the data step"
    else:
        decay, origin = float(SimulatorConfig.position_decay), "the simulator's default"
    slice_columns = tuple(dict.fromkeys(meta.get("slice_columns") or config.slice_columns))  # each column once
    return replace(config, position_decay=decay, slice_columns=slice_columns), origin


# ---------------------------------------------------------------------------------------------------- score columns


@dataclass(frozen=True)
class ScoreColumn:
    model: str
    variant: str
    column: str

    @property
    def label(self) -> str:
        return f"{MODEL_LABELS.get(self.model, self.model)} {VARIANT_LABELS.get(self.variant, self.variant)}"

    @property
    def policy(self) -> str:
        """The name of this ranker in the simulated A/B."""
        return f"{self.model}/{self.variant}"


def score_columns(frame: pd.DataFrame) -> list[ScoreColumn]:
    """The `score__<model>__<variant>` columns, models and variants in their usual order."""
    found = []
    for column in frame.columns:
        parts = str(column).split("__")
        if len(parts) == 3 and parts[0] + "__" == SCORE_PREFIX:
            found.append(ScoreColumn(parts[1], parts[2], str(column)))

    def order(s: ScoreColumn) -> tuple:
        model = MODEL_ORDER.index(s.model) if s.model in MODEL_ORDER else len(MODEL_ORDER)
        variant = VARIANT_ORDER.index(s.variant) if s.variant in VARIANT_ORDER else len(VARIANT_ORDER)
        return (model, s.model, variant, s.variant)

    return sorted(found, key=order)


def find_column(columns: list[ScoreColumn], model: str, variant: str) -> ScoreColumn | None:
    return next((c for c in columns if c.model == model and c.variant == variant), None)


def models_of(columns: list[ScoreColumn]) -> list[str]:
    return list(dict.fromkeys(c.model for c in columns))


def comparisons_of(columns: list[ScoreColumn]) -> Iterator[tuple[str, Comparison, ScoreColumn, ScoreColumn]]:
    """(model, comparison, variant column, baseline column) for every comparison whose two columns exist."""
    for model in models_of(columns):
        for comparison in COMPARISONS:
            a, b = find_column(columns, model, comparison.variant), find_column(columns, model, comparison.baseline)
            if a is not None and b is not None:
                yield model, comparison, a, b
