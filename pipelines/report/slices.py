"""The slices of a test table: condition values, user history length, item popularity, new items; each distinct.

A slice is a family ("surface", "user history", ...) and a value ("home", "10-49", ...). Two slices that hold the
same rows are one slice: the later is left out and named in the earlier one's `same_as` (the pipeline's
`user_no_history` is `user_history_len == 0`, so "earlier user history: none" would repeat "user history: 0").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipelines.report.spec import ReportConfig

UNKNOWN_VALUES = ("unknown", "missing")  # slices of rows without a value: drawn apart in the slice plot
# the cold-start families: users and items with little or no history, where the report adds the AUC lift
COLD_FAMILIES = ("user history", "earlier user history", "item interactions", "new item")


@dataclass
class SliceFamily:
    name: str
    labels: pd.Series  # a slice value per row
    order: list[str]  # the values, in the order shown
    aliases: dict[str, list[str]] = field(default_factory=dict)  # value -> names of left-out slices with its rows


@dataclass
class Slice:
    family: str
    value: str
    mask: np.ndarray  # [rows] bool
    same_as: list[str] = field(default_factory=list)  # "family: value" of left-out slices with the same rows

    @property
    def name(self) -> str:
        return f"{self.family}: {self.value}"


def history_labels(edges: tuple[int, ...]) -> list[str]:
    bounds = [0, *edges]
    labels = []
    for low, high in zip(bounds[:-1], bounds[1:]):
        labels.append(str(low) if high - 1 == low else f"{low}-{high - 1}")
    labels.append(f"{bounds[-1]}+")
    return labels


def popularity_buckets(popularity: pd.Series, config: ReportConfig) -> pd.Series:
    """head / torso / tail / unknown per row.

    Rows are ranked by their item's popularity (impressions before the row's day), most popular first; the
    popularity values that start within the first `head_share` of test impressions are head, those that start
    within the last `tail_share` are tail. Rows with equal popularity always share a bucket.
    """
    out = pd.Series("unknown", index=popularity.index, dtype=object)
    known = popularity.dropna()
    if known.empty:
        return out
    counts = known.value_counts().sort_index(ascending=False)  # most popular first
    share_before = (counts.cumsum() - counts) / counts.sum()
    bucket = pd.Series("torso", index=counts.index, dtype=object)
    bucket[share_before < config.head_share] = "head"
    bucket[share_before >= 1.0 - config.tail_share] = "tail"
    out.loc[known.index] = known.map(bucket).to_numpy()
    return out


def slice_families(frame: pd.DataFrame, columns: list[str], config: ReportConfig) -> list[SliceFamily]:
    """Every slicing the table supports."""
    families: list[SliceFamily] = []
    for column in dict.fromkeys(columns):
        if column not in frame.columns:
            continue
        values = frame[column].astype(object).where(frame[column].notna(), "missing").astype(str)
        top = values.value_counts().index[: config.max_slice_values]
        values = values.where(values.isin(top), "other")
        families.append(SliceFamily(column, values, sorted(values.unique())))
    if "user_history_len" in frame.columns:
        labels = history_labels(config.history_edges)
        # edges (1, 10, 50) -> bins (-inf, 0.5], (0.5, 9.5], (9.5, 49.5], (49.5, inf): 0, 1-9, 10-49, 50+
        bins = [-np.inf, *[e - 0.5 for e in config.history_edges], np.inf]
        bucket = pd.cut(frame["user_history_len"].astype(float), bins=bins, labels=labels)
        families.append(SliceFamily("user history", bucket.astype(str), labels))
    no_history = None
    if "user_no_history" in frame.columns:
        no_history = frame["user_no_history"].astype(bool)
    elif "user_history_len" in frame.columns:
        no_history = frame["user_history_len"] == 0
    # when it is `user_history_len == 0` (as the pipeline writes it), "none" is the history bucket "0" and "some"
    # the other buckets together: nothing new
    derived = "user_history_len" in frame.columns and no_history is not None and bool((no_history == (frame["user_history_len"] == 0)).all())
    labels = ["none (cold user)", "some"]
    if derived:
        families[-1].aliases[history_labels(config.history_edges)[0]] = [f"earlier user history: {labels[0]}"]
    elif no_history is not None:
        families.append(SliceFamily("earlier user history", pd.Series(np.where(no_history, labels[0], labels[1]), index=frame.index), labels))
    counts = "item_interactions" if "item_interactions" in frame.columns else "item_popularity"  # the first: no unknowns
    if counts in frame.columns:
        labels = history_labels(config.item_history_edges)
        bins = [-np.inf, *[e - 0.5 for e in config.item_history_edges], np.inf]
        known = frame[counts].astype(float)
        bucket = pd.cut(known, bins=bins, labels=labels).astype(str).where(known.notna(), "unknown")
        # every count bucket, empty or not (empty_slices names the empty ones); "unknown" only where it occurs
        families.append(SliceFamily("item interactions", bucket, [*labels, *(["unknown"] if (bucket == "unknown").any() else [])]))
    if "item_popularity" in frame.columns:
        labels = ["head", "torso", "tail", "unknown"]
        bucket = popularity_buckets(frame["item_popularity"].astype(float), config)
        families.append(SliceFamily("item popularity", bucket, [label for label in labels if (bucket == label).any()]))
    if "item_is_new" in frame.columns:
        labels = ["new in test window", "seen before the test window"]
        families.append(SliceFamily("new item", pd.Series(np.where(frame["item_is_new"].astype(bool), labels[0], labels[1]), index=frame.index), labels))
    return families


def distinct_slices(families: list[SliceFamily]) -> list[Slice]:
    """Every non-empty slice of `families` (slice_families' result), in their order, each set of rows once."""
    out: list[Slice] = []
    seen: dict[bytes, Slice] = {}
    for family in families:
        for value in family.order:
            mask = (family.labels == value).to_numpy()
            if not mask.any():
                continue
            key = hashlib.sha1(np.packbits(mask).tobytes()).digest() + len(mask).to_bytes(8, "little")
            if key in seen:
                seen[key].same_as.append(f"{family.name}: {value}")
                continue
            seen[key] = Slice(family.name, str(value), mask, list(family.aliases.get(value, [])))
            out.append(seen[key])
    return out


def empty_slices(families: list[SliceFamily]) -> list[str]:
    """"family: value" of each cold-start bucket (user history, item interactions) of `families` that holds no row.

    distinct_slices leaves empty slices out; these are named so that a reader asking for, say, users with 1-5
    earlier events learns that the test window has none (on the simulator every request adds a 10-item slate, so a
    user's count goes from 0 to 10) rather than finding the row missing.
    """
    return [f"{family.name}: {value}" for family in families
            if family.name in ("user history", "item interactions") for value in family.order if not (family.labels == value).any()]
