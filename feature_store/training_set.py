"""Point-in-time training sets through Feast: exactly one row per impression, in input order.

Feast's file offline store drops entity rows that have no feature row inside [t - ttl, t] and returns the rest
in another order. So every call here carries a `row_id` through Feast and joins the answer back onto our own
table: a row is never lost or reordered, and a feature Feast did not find is null with a `missing_*` flag.

Output (the training-set contract read by `ranker/`):

    row_id, user_id, item_id, ts, [label], request-context columns, item_category,
    user_n_events, user_n_clicks, user_ctr, user_recent_ctr, user_hours_since_last,
    item_n_impressions, item_n_clicks, item_ctr,
    hist_item_ids, hist_categories, hist_ts             (services with user_recent_items; hist_ts in epoch seconds)
    lum_user__<slug> (one per query condition), lum_item (services with LUM)
    missing_user_stats, missing_item_stats, missing_lum  (int8 flags)

and schema metadata `lum.training_set` (JSON) naming the column groups, the conditions and the model version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from contracts import names
from contracts.names import LUM_ITEM_COLUMN, MISSING_LUM_COLUMN, TRAINING_SET_METADATA_KEY, lum_user_column, slug
from contracts.progress import bars_off
from feature_store.repo import FeatureRepo, FeatureStoreError, read_view_source, require_view_sources

METADATA_KEY = TRAINING_SET_METADATA_KEY.encode()
COUNTER_COLUMNS = list(names.COUNTER_COLUMNS)
SEQUENCE_COLUMNS = list(names.SEQUENCE_COLUMNS)
SERVICES = ("ranker_base", "ranker_pooled", "ranker_lum", "ranker_lum_pooled")
VECTOR_FEATURES = ("embedding", "item_embedding")  # Feast feature names of the LUM vectors (a vector is never empty)


@dataclass(frozen=True)
class TrainingSetConfig:
    feature_service: str = "ranker_lum_pooled"
    context_columns: tuple[str, ...] = ()  # request-time columns of the impressions to pass through as features
    conditions: tuple[str, ...] | None = None  # LUM query conditions (default: the selected version's)
    merge_budget: int = 4_000_000  # entity x source rows Feast may merge in one call (bounds memory)


def _check_impressions(impressions: pd.DataFrame, context_columns: Iterable[str]) -> pd.DataFrame:
    missing = [c for c in ("user_id", "item_id", "ts") if c not in impressions.columns]
    if missing:
        hint = " (an entity frame needs its request times in `ts`)" if "ts" in missing else ""
        raise FeatureStoreError(f"impressions lack column(s) {', '.join(missing)}{hint}; have: {', '.join(map(str, impressions.columns))}")
    absent = [c for c in context_columns if c not in impressions.columns]
    if absent:
        raise FeatureStoreError(f"context column(s) {', '.join(absent)} are not in the impressions (have: {', '.join(map(str, impressions.columns))})")
    ts = pd.to_datetime(impressions["ts"], utc=True)
    if ts.isna().any():
        raise FeatureStoreError(f"impressions: {int(ts.isna().sum())} row(s) have no timestamp in `ts` (row {int(np.flatnonzero(ts.isna())[0]) + 1} first)")
    return impressions.assign(ts=ts, user_id=impressions["user_id"].astype(str), item_id=impressions["item_id"].astype(str))


def _service_views(store: Any, name: str) -> dict[str, list[str]]:
    """view name -> feature names of a feature service (clear error when the service does not exist)."""
    try:
        service = store.get_feature_service(name)
    except Exception as exc:  # Feast raises FeatureServiceNotFoundException
        known = sorted(s.name for s in store.list_feature_services())
        hint = " (the LUM services appear once embeddings are ingested: run `lum features ingest`, then `lum features apply`)" if "lum" in name else ""
        raise FeatureStoreError(f"feature service '{name}' does not exist in the registry (known: {', '.join(known)}){hint}") from exc
    return {p.name: [f.name for f in p.features] for p in service.feature_view_projections}


def _fast_dask_tokens_for_nested_columns() -> None:
    """Make Dask name object arrays of lists/arrays (our embedding and history columns) without pickling them.

    Dask names every intermediate result by hashing its data; for an object array it pickles the whole array,
    up to three times, to prove the hash is deterministic. Feast's file store renames and persists the source
    several times per join, so a 150k-row embedding column cost about a minute per join. A random token is
    correct here: these frames are computed once, in this process, and never looked up by name again.
    """
    import uuid

    from dask.tokenize import normalize_token

    numpy_normalizer = normalize_token.dispatch(np.ndarray)
    if getattr(numpy_normalizer, "_lum_nested", False):
        return

    def normalize(x: np.ndarray):
        if x.dtype.hasobject and x.shape:
            try:
                "-".join(x.flat)  # all strings: Dask's own fast path hashes them
            except TypeError:  # lists, arrays, None: what Dask would pickle
                return ("lum-nested", uuid.uuid4().hex, x.shape)
        return numpy_normalizer(x)

    normalize._lum_nested = True  # type: ignore[attr-defined]
    normalize_token.register(np.ndarray)(normalize)


def _known_keys(store: Any, view: str, keys: list[str]) -> tuple[pd.DataFrame, int]:
    """The distinct join keys present in a feature view's offline source, and the source's number of rows."""
    table = read_view_source(store, view, keys)
    return table.to_pandas().drop_duplicates(), table.num_rows


def _refuse_what_ray_cannot_join(store: Any, views: Iterable[str], requests: pd.Series) -> None:
    """Before Ray starts: Feast 0.67's Ray store floors times to the second (see `_ray_time_shift`) and has no TTL code
    at all (it would join a vector of any age)."""
    fraction = np.mod(requests.astype("datetime64[ns, UTC]").astype("int64").to_numpy(), 1_000_000_000) != 0
    if fraction.any():
        raise FeatureStoreError(
            f"the ray offline store joins at whole seconds only (Feast floors its timestamps to the second), but request time "
            f"{requests.iloc[int(np.flatnonzero(fraction)[0])]} has a fraction of a second: use the duckdb or file offline store for this log "
            "(`lum features apply --offline-store duckdb`)")
    for view in views:
        ttl = store.get_feature_view(view).ttl
        if ttl and ttl.total_seconds() > 0:
            raise FeatureStoreError(
                f"feature view '{view}' has a TTL of {ttl}, which Feast's ray offline store does not apply (it joins values of any age): "
                "make it 0 (`lum features apply --lum-ttl-days 0`: forever) or use the duckdb or file offline store")


def _ray_time_shift(store: Any, view: str) -> pd.Timedelta:
    """What to subtract from the request times so Feast's Ray store joins exactly what the other engines join.

    Feast 0.67's Ray store floors every timestamp to the second before its `merge_asof`
    (`feast.infra.ray_shared_utils.normalize_timestamp_columns`). Our counters are stamped one microsecond after
    the event they include (offline_tables.py), so a request at the event's own second would join the counters
    that count its own label. With whole-second request times and source stamps that all sit at a whole second
    (snapshots, item periods) or all one microsecond after one (counters, histories), the join is exact again when
    the request times of the second kind move back by one microsecond. Anything else is refused, never joined (the
    request times were checked by `_refuse_what_ray_cannot_join` before the first join).
    """
    stamps = read_view_source(store, view, ["event_timestamp"]).column("event_timestamp")
    offsets = set(np.unique(np.mod(stamps.cast(pa.timestamp("ns", tz="UTC")).cast(pa.int64()).to_numpy(zero_copy_only=False), 1_000_000_000)).tolist())
    if offsets <= {0}:
        return pd.Timedelta(0)
    if offsets == {1_000}:
        return pd.Timedelta(microseconds=1)
    raise FeatureStoreError(
        f"feature view '{view}' has timestamps at {len(offsets)} different fractions of a second; the ray offline store floors them to the "
        "second and would join rows from after a request: use the duckdb or file offline store for this log")


def _historical(store: Any, entity: pd.DataFrame, refs: list[str], merge_budget: int, desc: str, progress: bool) -> pd.DataFrame:
    """Feast's point-in-time join in chunks; returns the answer keyed by `row_id` (rows Feast dropped are absent).

    Feast's file store merges every entity row with every source row of its key before filtering by time, so
    a chunk holds about `merge_budget / (source rows per key)` entity rows: memory stays bounded, and chunks
    are as large as that allows because each call re-reads the whole source.

    Entity rows whose key never occurs in the view's source are left out before Feast sees them: they cannot
    have a value, and Feast's Dask join fails on the empty timestamps they produce when a source has several
    files ("Divisions calculation failed ... nulls").
    """
    view = refs[0].split(":")[0]
    keys = [c for c in ("user_id", "item_id", "condition") if c in entity.columns]
    known, source_rows = _known_keys(store, view, keys)
    entity = entity.merge(known, on=keys, how="inner")
    chunk_rows = max(10_000, merge_budget * max(len(known), 1) // max(source_rows, 1))
    ray = store.config.offline_store.type == "ray"
    if ray:
        # Ray's store partitions the join over its workers itself and pays a fixed cost per call (about 2 s here)
        chunk_rows = max(len(entity), 1)
        entity = entity.assign(event_timestamp=entity["event_timestamp"] - _ray_time_shift(store, view))
    parts = []
    for start in tqdm(range(0, len(entity), chunk_rows), desc=desc, disable=bars_off(progress), unit="chunk", leave=False):
        chunk = entity.iloc[start : start + chunk_rows]
        parts.append(store.get_historical_features(entity_df=chunk, features=refs, full_feature_names=True).to_df())
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["row_id"])
    prefixes = tuple(f"{ref.split(':')[0]}__" for ref in refs)
    features = {c: c.split("__", 1)[1] for c in out.columns if isinstance(c, str) and c.startswith(prefixes)}
    if not len(out):
        return pd.DataFrame(columns=[f.split(":")[1] for f in refs], index=pd.Index([], name="row_id"))
    answer = out.drop_duplicates("row_id").set_index("row_id")[list(features)].rename(columns=features)
    return _ray_lists_repaired(answer) if ray else answer


def _ray_lists_repaired(answer: pd.DataFrame) -> pd.DataFrame:
    """Ray's list answers spelt as the other engines spell them (a loop over every value: only Ray's answers need it).

    Feast's file and DuckDB stores answer a missing list feature with None; its Ray store (0.67) with an empty list,
    and a list of one element as that element alone (pandas unpacks it). A vector is never empty, so an empty one is
    missing; a history of one item is a list again.
    """
    for column in answer.columns:
        if answer[column].dtype != object or column not in VECTOR_FEATURES + tuple(SEQUENCE_COLUMNS):
            continue
        values = answer[column].to_numpy(dtype=object).copy()
        for i, v in enumerate(values):
            if isinstance(v, np.ndarray) and v.ndim == 0:
                v = values[i] = v.item()
            if isinstance(v, (list, np.ndarray)):
                if column in VECTOR_FEATURES and len(v) == 0:
                    values[i] = None
            elif v is not None and not (isinstance(v, float) and np.isnan(v)):
                values[i] = [v]
        answer[column] = values
    return answer


def _distinct(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """The distinct (key, ts) pairs of `frame`, numbered in `row_id`."""
    pairs = frame[[key, "ts"]].drop_duplicates().reset_index(drop=True)
    pairs["row_id"] = np.arange(len(pairs), dtype=np.int64)
    return pairs


Join = Callable[[Any, pd.DataFrame, list[str], int, str, bool], pd.DataFrame]


def build_training_set(repo: FeatureRepo, impressions: pd.DataFrame, config: TrainingSetConfig, progress: bool = False,
                       join: Join | None = None) -> pa.Table:
    """One row per impression (same order) with every feature of `config.feature_service`, point-in-time correct.

    `join`: the point-in-time join of one view (default: Feast's, through the repo's offline store); another
    function with `_historical`'s contract replaces it (benchmarks/bench_offline_join.py's floor does).
    """
    join = join or _historical
    frame = _check_impressions(impressions, config.context_columns).reset_index(drop=True)
    _fast_dask_tokens_for_nested_columns()
    store = repo.store()
    views = _service_views(store, config.feature_service)
    require_view_sources(store, list(views))  # a missing file named before the first join, not as a bare path from Feast
    if store.config.offline_store.type == "ray":
        _refuse_what_ray_cannot_join(store, views, frame["ts"])
    settings = repo.settings()
    uses_lum = "lum_user_interest" in views
    conditions = list(config.conditions or settings.get("conditions") or [])
    if uses_lum and not conditions:
        raise FeatureStoreError(f"{repo.root}: no LUM query conditions are selected; run `lum features ingest` then `lum features apply`")
    if uses_lum:
        known = set(settings.get("conditions") or [])
        unknown = [c for c in conditions if c not in known]
        if unknown:
            raise FeatureStoreError(
                f"condition(s) {', '.join(unknown)} were not ingested for {settings.get('model_version')}; ingested: {', '.join(sorted(known))}"
            )

    base_cols = ["user_id", "item_id", "ts"] + (["label"] if "label" in frame.columns else [])
    out = frame[base_cols + [c for c in config.context_columns if c not in base_cols]].copy()
    out.insert(0, "row_id", np.arange(len(frame), dtype=np.int64))

    # One Feast call per view, each on the distinct (key, request time) pairs (a slate shares its user and time):
    # the file store drops an entity row from the whole answer when any view of the call lacks a value for it,
    # so views asked together would lose each other's values.
    requests = _distinct(out, "user_id")
    for view in [v for v in ("user_stats", "user_recent_items", "item_stats", "item_info", "lum_item") if v in views]:
        key = "item_id" if view in ("item_stats", "item_info", "lum_item") else "user_id"
        pairs = requests if key == "user_id" else _distinct(out, key)
        got = join(store, pairs.rename(columns={"ts": "event_timestamp"}), [f"{view}:{f}" for f in views[view]],
                          config.merge_budget, view, progress)
        answer = pairs.join(got, on="row_id")
        out = out.merge(answer.drop(columns="row_id"), on=[key, "ts"], how="left", validate="many_to_one")

    # LUM user interests: (user, condition, request time), pivoted to one column per condition
    if uses_lum:
        expanded = pd.concat([requests.assign(condition=c) for c in conditions], ignore_index=True)
        expanded["key"] = np.arange(len(expanded), dtype=np.int64)
        entity = expanded.rename(columns={"ts": "event_timestamp", "row_id": "request", "key": "row_id"})
        got = join(store, entity, ["lum_user_interest:embedding", "lum_user_interest:model_version"], config.merge_budget, "LUM features", progress)
        expanded = expanded.join(got, on="key")
        selected = settings.get("model_version")
        stale = expanded["model_version"].notna() & (expanded["model_version"] != selected)
        expanded.loc[stale, "embedding"] = None
        wide = requests[["user_id", "ts"]].copy()
        for c in conditions:
            part = expanded[expanded["condition"] == c].set_index("row_id")["embedding"]
            wide[lum_user_column(c)] = part.reindex(requests["row_id"]).to_numpy()
        out = out.merge(wide, on=["user_id", "ts"], how="left", validate="many_to_one")
        out = out.rename(columns={"item_embedding": LUM_ITEM_COLUMN}).drop(columns=["item_model_version"], errors="ignore")

    return _finish(out, frame, config, settings, views, conditions if uses_lum else [])


def _finish(out: pd.DataFrame, frame: pd.DataFrame, config: TrainingSetConfig, settings: dict[str, Any], views: dict[str, list[str]],
            conditions: list[str]) -> pa.Table:
    """Derived columns, flags, list defaults and the contract metadata."""
    out = out.sort_values("row_id", kind="stable").reset_index(drop=True)
    assert len(out) == len(frame) and (out["row_id"].to_numpy() == np.arange(len(frame))).all(), "a training row was lost or reordered"
    if "user_stats" in views:
        since = (out["ts"] - pd.Timestamp("1970-01-01", tz="UTC")).dt.total_seconds() - out.pop("user_last_event_s")
        out["user_hours_since_last"] = since / 3600.0
        out["missing_user_stats"] = out["user_n_events"].isna().astype(np.int8)
    if "item_stats" in views:
        out["missing_item_stats"] = out["item_n_impressions"].isna().astype(np.int8)
    lum_user_cols = [lum_user_column(c) for c in conditions]
    if conditions:
        missing = out[lum_user_cols + [LUM_ITEM_COLUMN]].isna().any(axis=1)
        out[MISSING_LUM_COLUMN] = missing.astype(np.int8)
    dim = settings.get("lum_dim")
    vector_columns = {*lum_user_cols, LUM_ITEM_COLUMN}
    arrays = {}
    for name in out.columns:
        if name in SEQUENCE_COLUMNS:  # no history yet: an empty list, not null
            kind = pa.float64() if name == names.HISTORY_TIMES else pa.string()
            arrays[name] = _list_array(out[name], kind, empty_when_missing=True)
        elif name in vector_columns:
            arrays[name] = _list_array(out[name], pa.float32())
        elif name == "ts":
            arrays[name] = pa.array(out[name]).cast(pa.timestamp("us", tz="UTC"))
        elif name == "label":
            arrays[name] = pa.array(out[name].astype(np.int8))
        else:
            arrays[name] = pa.array(out[name])
    metadata = contract_metadata(out.columns, config.context_columns, conditions, dim, settings.get("model_version"), config.feature_service)
    table = pa.table(arrays)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})


def _list_array(column: pd.Series, value_type: pa.DataType, empty_when_missing: bool = False) -> pa.ListArray:
    """An object column of per-row arrays/lists (None or NaN where missing) as one Arrow list array.

    Builds the offsets and the flat values with numpy instead of a Python list per row: the embedding columns of a
    368k-row training set took 24 s as lists of Python floats. Missing rows are null, or empty lists when
    `empty_when_missing`.
    """
    values = column.to_numpy(dtype=object)
    present = np.fromiter((isinstance(v, (list, np.ndarray)) for v in values), dtype=bool, count=len(values))
    lengths = np.zeros(len(values), dtype=np.int64)
    lengths[present] = [len(v) for v in values[present]]
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    kept = [np.asarray(v) for v in values[present] if len(v)]
    flat = np.concatenate(kept) if kept else np.array([], dtype=object if pa.types.is_string(value_type) else np.float32)
    if pa.types.is_floating(value_type):
        flat = flat.astype(value_type.to_pandas_dtype(), copy=False)
    mask = None if empty_when_missing else pa.array(~present)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, value_type), mask=mask).cast(pa.list_(value_type))


def contract_metadata(columns: Iterable[str], context_columns: Iterable[str], conditions: list[str], dim: int | None,
                      model_version: str | None, feature_service: str | None) -> dict[str, Any]:
    """The `lum.training_set` metadata naming a training-set table's column groups (offline and online rows)."""
    columns = set(columns)
    return {
        "context_columns": list(context_columns),
        "counter_columns": [c for c in COUNTER_COLUMNS if c in columns],
        "sequence_columns": [c for c in SEQUENCE_COLUMNS if c in columns],
        "lum_conditions": {slug(c): c for c in conditions},
        "lum_dim": dim if conditions else None,
        "model_version": model_version if conditions else None,
        "feature_service": feature_service,
        "label": "label", "user": "user_id", "item": "item_id", "time": "ts",
    }


def training_set_metadata(table: pa.Table) -> dict[str, Any]:
    meta = table.schema.metadata or {}
    if METADATA_KEY not in meta:
        raise FeatureStoreError("this table is not a LUM training set (no lum.training_set metadata)")
    return json.loads(meta[METADATA_KEY])


def lum_vector_as_of(repo: FeatureRepo, rows: pd.DataFrame) -> pd.Series | None:
    """[N] the as-of time of the LUM user vector each row (user_id, ts) joins: the newest of the selected version at
    or before the row's time and within the view's TTL (`lum_ttl_days`), as the point-in-time join picks it (NaT where
    none); None when the repo has no LUM version selected. Request time minus this is the feature's freshness lag."""
    settings = repo.settings()
    if not settings.get("model_version"):
        return None
    source = read_view_source(repo.store(), "lum_user_interest", ["user_id", "event_timestamp"])
    stamps = source.to_pandas().drop_duplicates().rename(columns={"event_timestamp": "lum_as_of"})
    stamps["user_id"] = stamps["user_id"].astype(str)
    stamps["lum_as_of"] = pd.to_datetime(stamps["lum_as_of"], utc=True).astype("datetime64[ns, UTC]")
    left = pd.DataFrame({"user_id": rows["user_id"].astype(str).to_numpy(), "order": np.arange(len(rows)),
                         "ts": pd.DatetimeIndex(pd.to_datetime(rows["ts"], utc=True)).astype("datetime64[ns, UTC]")})
    joined = pd.merge_asof(left.sort_values("ts"), stamps.sort_values("lum_as_of"), left_on="ts", right_on="lum_as_of", by="user_id",
                           direction="backward", allow_exact_matches=True)
    ttl = pd.Timedelta(days=float(settings.get("lum_ttl_days") or 0))
    if ttl > pd.Timedelta(0):
        joined.loc[joined["ts"] - joined["lum_as_of"] > ttl, "lum_as_of"] = pd.NaT
    return joined.sort_values("order")["lum_as_of"].reset_index(drop=True)
