"""The training-set contract as the ranker sees it: what columns mean, which variant needs which, and the checks.

The feature store hands over one row per impression (an Arrow table or a pandas DataFrame) whose metadata key
`lum.training_set` names the request-context columns, the counters, the history columns and the LUM conditions.
Only the columns named there (plus the user, the item and the item's category) ever become features: anything
else in the table (a post-event `feedback` level, a simulator's `p_click`) is ignored by construction, because the
feature code only reads columns this schema lists.

A `FeatureSchema` is read from the training table and saved with the model; `check_table` compares a table to
be scored with it and names what is missing or different.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# the training set's names, shared with the feature store that writes it (some only re-exported, for ranker/features.py)
from contracts.names import (
    ATTENTION_VARIANTS,
    CATEGORY_COLUMN,
    FLAG_COLUMNS,
    HISTORY_CATEGORIES,
    HISTORY_ITEMS,
    HISTORY_TIMES,
    HISTORY_VARIANTS,
    LUM_ITEM_COLUMN,
    LUM_USER_PREFIX,
    LUM_VARIANTS,
    MISSING_LUM_COLUMN,  # noqa: F401  (re-exported)
    REQUEST_CONDITION,  # noqa: F401  (re-exported)
    VARIANTS,
    slug,  # noqa: F401  (re-exported)
)
from contracts.names import TRAINING_SET_METADATA_KEY as METADATA_KEY

RUN_LUM_INGEST = "run `lum features ingest` for a model version, then rebuild the training set"
RUN_HISTORY_BUILD = (
    "rebuild the training set with the history columns (the training-set builder writes `hist_item_ids` and "
    "`hist_categories`, and `hist_ts` for the target-attention variants)"
)


class RankerInputError(ValueError):
    """A table the ranker cannot use; the message names the columns and says what to run."""


def parse_condition(condition: str) -> dict[str, str]:
    """`surface=home|device=mobile` -> {"surface": "home", "device": "mobile"}."""
    pairs = {}
    for part in condition.split("|"):
        column, sep, value = part.partition("=")
        if not sep or not column:
            raise RankerInputError(f"condition '{condition}' is not of the form col=value[|col=value...]")
        pairs[column] = value
    return pairs


def variant_parts(variant: str) -> tuple[bool, bool]:
    """(uses LUM features, uses the pooled history) for a variant name."""
    if variant not in VARIANTS:
        raise RankerInputError(f"unknown variant '{variant}': choose one of {', '.join(VARIANTS)}")
    return variant in LUM_VARIANTS, variant in HISTORY_VARIANTS


def variant_attention(variant: str) -> bool:
    """Whether a variant weighs the history by target attention (DIN) instead of mean-pooling it."""
    variant_parts(variant)
    return variant in ATTENTION_VARIANTS


def as_arrow(table: pa.Table | pd.DataFrame, columns: list[str] | None = None) -> pa.Table:
    """An Arrow view of the input; a DataFrame's `attrs["lum.training_set"]` becomes the schema metadata.

    `columns` (optional) converts only those columns of a DataFrame, which keeps scoring a few candidates cheap.
    """
    if isinstance(table, pa.Table):
        return table
    if not isinstance(table, pd.DataFrame):
        raise RankerInputError(f"expected a pyarrow Table or a pandas DataFrame, got {type(table).__name__}")
    frame = table if columns is None else table[[c for c in columns if c in table.columns]]
    arrow = pa.Table.from_pandas(frame, preserve_index=False)
    meta = table.attrs.get(METADATA_KEY)
    if meta is not None:
        text = meta if isinstance(meta, str) else json.dumps(meta)
        arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), METADATA_KEY.encode(): text.encode()})
    return arrow


def read_metadata(table: pa.Table | pd.DataFrame) -> dict[str, Any] | None:
    """The training-set metadata dict from an Arrow table's schema or a DataFrame's attrs; None when absent."""
    if isinstance(table, pd.DataFrame):
        meta = table.attrs.get(METADATA_KEY)
        if meta is None:
            return None
        return json.loads(meta) if isinstance(meta, (str, bytes)) else dict(meta)
    raw = (table.schema.metadata or {}).get(METADATA_KEY.encode())
    return None if raw is None else json.loads(raw)


@dataclass(frozen=True)
class FeatureSchema:
    """What the training table held: column roles, LUM conditions and dimension. Saved with a trained ranker."""

    context_columns: tuple[str, ...]
    counter_columns: tuple[str, ...]
    sequence_columns: tuple[str, ...] = ()
    lum_conditions: dict[str, str] = field(default_factory=dict)  # slug -> condition name, in the table's order
    lum_dim: int | None = None
    model_version: str | None = None
    label: str = "label"
    user: str = "user_id"
    item: str = "item_id"
    time: str = "ts"
    category: str = CATEGORY_COLUMN

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> FeatureSchema:
        return cls(
            context_columns=tuple(meta.get("context_columns", ())),
            counter_columns=tuple(meta.get("counter_columns", ())),
            sequence_columns=tuple(meta.get("sequence_columns", ())),
            lum_conditions=dict(meta.get("lum_conditions") or {}),
            lum_dim=meta.get("lum_dim"),
            model_version=meta.get("model_version"),
            label=meta.get("label", "label"),
            user=meta.get("user", "user_id"),
            item=meta.get("item", "item_id"),
            time=meta.get("time", "ts"),
        )

    @classmethod
    def from_table(cls, table: pa.Table | pd.DataFrame) -> FeatureSchema:
        meta = read_metadata(table)
        if meta is None:
            raise RankerInputError(
                f"the table carries no '{METADATA_KEY}' metadata, so its feature columns are unknown: build it with "
                "the training-set builder (it writes the metadata into the Parquet schema), or pass the dict in "
                f"frame.attrs['{METADATA_KEY}']"
            )
        return cls.from_metadata(meta)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureSchema:
        tuples = ("context_columns", "counter_columns", "sequence_columns")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})

    @property
    def lum_user_columns(self) -> list[str]:
        return [LUM_USER_PREFIX + s for s in self.lum_conditions]

    @property
    def categorical_columns(self) -> list[str]:
        """Single-valued categorical features: user, item, the item's category, then the request context."""
        return [self.user, self.item, self.category, *self.context_columns]

    def feature_columns(self, variant: str) -> list[str]:
        """Every column a variant reads (the label excluded)."""
        use_lum, use_history = variant_parts(variant)
        columns = [*self.categorical_columns, *self.counter_columns, *FLAG_COLUMNS]
        if use_history:
            columns += [HISTORY_ITEMS, HISTORY_CATEGORIES]
        if variant_attention(variant):  # the behaviours' ages are relative to the request time
            columns += [HISTORY_TIMES, self.time]
        if use_lum:
            columns += [*self.lum_user_columns, LUM_ITEM_COLUMN]
        return columns


def check_table(table: pa.Table, schema: FeatureSchema, variant: str, *, need_label: bool = False) -> None:
    """Checks that `table` carries what a ranker trained on `schema` reads; raises RankerInputError naming columns.

    Used before scoring: a different LUM dimension or model version, a missing condition column, a missing counter.
    """
    use_lum, use_history = variant_parts(variant)
    meta = read_metadata(table)
    problems: list[str] = []
    if meta is not None and use_lum:
        if meta.get("lum_dim") is not None and schema.lum_dim is not None and meta["lum_dim"] != schema.lum_dim:
            problems.append(f"lum_dim is {meta['lum_dim']} in the table but the ranker was trained with {schema.lum_dim}")
        if meta.get("model_version") and schema.model_version and meta["model_version"] != schema.model_version:
            problems.append(
                f"the LUM vectors come from model version '{meta['model_version']}' but the ranker was trained on "
                f"'{schema.model_version}' (vectors of different models are not comparable)"
            )
    names = set(table.column_names)
    wanted = schema.feature_columns(variant) + ([schema.label] if need_label else [])
    missing = [c for c in wanted if c not in names]
    if missing:
        lum_missing = [c for c in missing if c.startswith(LUM_USER_PREFIX) or c == LUM_ITEM_COLUMN]
        hint = ""
        if lum_missing:
            conditions = [schema.lum_conditions.get(c.removeprefix(LUM_USER_PREFIX), c) for c in lum_missing]
            hint = f" (LUM conditions the ranker needs: {', '.join(conditions)}; {RUN_LUM_INGEST})"
        problems.append(f"missing columns: {', '.join(missing)}{hint}")
    if use_lum and schema.lum_dim:
        for name in schema.lum_user_columns + [LUM_ITEM_COLUMN]:
            if name in names:
                problems += _vector_problems(table.column(name), name, schema.lum_dim)
    for name in schema.counter_columns:
        kind = table.schema.field(name).type if name in names else None
        if kind is not None and not (pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_null(kind)):
            problems.append(f"counter column {name} has type {kind}, expected a number")
    if problems:
        raise RankerInputError("the table does not match the ranker's feature schema: " + "; ".join(problems))


def _vector_problems(column: pa.ChunkedArray, name: str, dim: int) -> list[str]:
    if pa.types.is_null(column.type):  # every vector missing (e.g. a DataFrame of one cold user's candidates)
        return []
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type)):
        return [f"column {name} has type {column.type}, expected list<float32> of length {dim}"]
    lengths = pc.list_value_length(column).drop_null().to_numpy()
    bad = np.unique(lengths[lengths != dim]) if len(lengths) else []
    if len(bad):
        return [f"column {name} holds vectors of length {', '.join(map(str, bad[:3]))}, the ranker expects {dim} (lum_dim)"]
    return []


def validate_training_table(table: pa.Table, schema: FeatureSchema, variant: str) -> None:
    """Checks a training table: both classes present, the variant's features present and not null everywhere."""
    use_lum, use_history = variant_parts(variant)
    names = set(table.column_names)
    if table.num_rows == 0:
        raise RankerInputError("the training set is empty: check the training window of the training-set builder")
    for column in (schema.label, schema.user, schema.item, schema.time):
        if column not in names:
            raise RankerInputError(f"the training set has no '{column}' column (the contract's {column})")
    if use_lum and (not schema.lum_conditions or not any(c.startswith(LUM_USER_PREFIX) for c in names)):
        raise RankerInputError(f"variant '{variant}' needs LUM features but the training set has no lum_user__* columns: {RUN_LUM_INGEST}")
    if use_history and not {HISTORY_ITEMS, HISTORY_CATEGORIES} <= names:
        raise RankerInputError(f"variant '{variant}' needs the pooled history but the training set lacks it: {RUN_HISTORY_BUILD}")
    if variant_attention(variant) and HISTORY_TIMES not in names:
        raise RankerInputError(
            f"variant '{variant}' weighs behaviours by their age but the training set has no '{HISTORY_TIMES}' column "
            f"(built before the feature store kept history times): {RUN_HISTORY_BUILD}")
    check_table(table, schema, variant, need_label=True)

    labels = table.column(schema.label)
    if labels.null_count:
        raise RankerInputError(f"the label column '{schema.label}' has {labels.null_count} null values")
    positives = int(pc.sum(pc.equal(labels, 1)).as_py() or 0)
    negatives = int(pc.sum(pc.equal(labels, 0)).as_py() or 0)
    if positives + negatives != table.num_rows:
        raise RankerInputError(f"the label column '{schema.label}' must hold only 0 and 1")
    if positives == 0 or negatives == 0:
        which = "positives (label 1)" if positives == 0 else "negatives (label 0)"
        raise RankerInputError(
            f"the training set has no {which} among its {table.num_rows} rows: a ranker needs both; check the event "
            "log's labels (impressions that were not engaged must be kept as label 0) and the training window"
        )

    all_null = [c for c in schema.feature_columns(variant) if c in names and _all_missing(table.column(c))]
    if all_null:
        hints = []
        if any(c.startswith(LUM_USER_PREFIX) or c == LUM_ITEM_COLUMN for c in all_null):
            hints.append(f"LUM vectors are missing for every row: {RUN_LUM_INGEST} (check its as-of times cover the window)")
        if any(c in (HISTORY_ITEMS, HISTORY_CATEGORIES, HISTORY_TIMES) for c in all_null):
            hints.append(f"no row has any history: {RUN_HISTORY_BUILD}, with events before the training window")
        if not hints:
            hints.append("rebuild the training set (the feature store's join found no values for them)")
        raise RankerInputError(f"feature columns null (or empty) for every row: {', '.join(all_null)}; " + "; ".join(hints))


def _all_missing(column: pa.ChunkedArray) -> bool:
    if len(column) == 0 or column.null_count == len(column):
        return True
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = pc.list_value_length(column)
        return int(pc.max(lengths).as_py() or 0) == 0
    return False
