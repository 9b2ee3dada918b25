"""Feast definitions of the LUM feature repo (read by `feast apply` and by `lum features apply`).

This file is copied into every run's feature repo (`runs/<name>/feature_repo/`); what varies between runs -
which model version is selected, its query conditions, the TTLs - is read from `lum_features.yaml` beside it,
so the plain `feast` CLI works in that folder too (`cd runs/demo/feature_repo && feast apply`), also in a copy
of a run folder (the sources below are this folder's files; see forget_other_repos_tables for the online tables).

Entities:      user (user_id), item (item_id), condition (condition: a query-condition name, e.g. surface=home)
Feature views: lum_user_interest  (user, condition) -> embedding Array(Float32), model_version
               lum_item           item -> item_embedding Array(Float32), item_model_version
               user_stats         user -> counters of the user's events strictly before the request
               item_stats         item -> counters of the item's impressions strictly before the request
               user_recent_items  user -> the last engaged items, their categories and times (newest last)
               user_stream_state  user -> user_recent_label_bits (not a feature: the state the real-time stream
                                  updates user_recent_ctr from)
               item_info          item -> item_category
Push sources:  user_stats_push (user_stats and user_stream_state), user_recent_items_push: `lum features push`
               and `POST /events` update them per event, so a request sees every behaviour before it without a
               materialize; their batch sources are the offline tables, which materialize and training sets read
Services:      ranker_base, ranker_pooled, ranker_lum, ranker_lum_pooled (the ranker variants)
"""

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.data_format import ParquetFormat
from feast.types import Array, Float32, Float64, Int64, String

# the column names the offline tables are written with (one definition, shared with the ranker's training set)
from contracts.names import (
    CATEGORY_COLUMN,
    HISTORY_CATEGORIES,
    HISTORY_ITEMS,
    HISTORY_TIMES,
    ITEM_COUNTERS,
    LABEL_BITS_COLUMN,
    USER_STATS_COLUMNS,
)
from feature_store.repo import RepoSettings, forget_other_repos_tables, read_settings

REPO = Path(__file__).resolve().parent
DATA = REPO / "data"
# A copied or moved repo's registry still records the original folder's SQLite online tables, and `feast apply`
# would DROP them there while "replacing" them with this folder's. Feast imports this file before it reads the
# registry, so the records are dropped here: a plain `feast apply` in a copy leaves the original's tables intact.
forget_other_repos_tables(REPO)
# checked: model_version names a folder under data/ (read_settings refuses `../..` and other unsafe names)
# every setting and its default: feature_store.repo.RepoSettings
SETTINGS = read_settings(REPO / "lum_features.yaml") if (REPO / "lum_features.yaml").exists() else RepoSettings().to_mapping()
MODEL_VERSION = SETTINGS.get("model_version")


def _days(value) -> timedelta:
    """A TTL in days; 0 means forever (Feast's convention)."""
    return timedelta(days=float(value or 0))


user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING, description="A user of the event log")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING, description="An item of the catalogue")
condition = Entity(name="condition", join_keys=["condition"], value_type=ValueType.STRING,
                   description="A LUM query condition, e.g. surface=home or surface=home|device=mobile")


OFFLINE_STORE = SETTINGS["offline_store"]["kind"]


def _source(name: str, path: Path) -> FileSource:
    return FileSource(name=f"{name}_source", path=str(path), timestamp_field="event_timestamp", file_format=ParquetFormat())


def _folder_source(name: str, folder: Path) -> FileSource:
    """A source of every Parquet file one level under `folder` (one subfolder per embedding job). Dask and Ray read a
    folder of folders; DuckDB reads a glob of the files."""
    return _source(name, folder / "*" / "*.parquet" if OFFLINE_STORE == "duckdb" else folder)


stats_ttl = _days(SETTINGS["stats_ttl_days"])
# the real-time behaviour stream: per-event rows pushed online (feature_store/stream.py); offline, the same tables
user_stats_push = PushSource(name="user_stats_push", batch_source=_source("user_stats", DATA / "stats" / "user_stats.parquet"))
user_recent_items_push = PushSource(name="user_recent_items_push",
                                    batch_source=_source("user_recent_items", DATA / "stats" / "user_recent_items.parquet"))
user_stats = FeatureView(
    name="user_stats",
    entities=[user],
    ttl=stats_ttl,
    schema=[Field(name=n, dtype=Float64) for n in USER_STATS_COLUMNS],
    source=user_stats_push,
    description="Counters of the user's events strictly before the request (a row per moment they changed, stamped 1 us after it)",
)
item_stats = FeatureView(
    name="item_stats",
    entities=[item],
    ttl=stats_ttl,
    schema=[Field(name=n, dtype=Float64) for n in ITEM_COUNTERS],
    source=_source("item_stats", DATA / "stats" / "item_stats.parquet"),
    description="Impressions, clicks and smoothed CTR of the item strictly before the request",
)
user_recent_items = FeatureView(
    name="user_recent_items",
    entities=[user],
    ttl=stats_ttl,
    schema=[Field(name=HISTORY_ITEMS, dtype=Array(String)), Field(name=HISTORY_CATEGORIES, dtype=Array(String)),
            Field(name=HISTORY_TIMES, dtype=Array(Float64))],
    source=user_recent_items_push,
    description="The user's last engaged items strictly before the request, newest last",
)
user_stream_state = FeatureView(
    name="user_stream_state",
    entities=[user],
    ttl=stats_ttl,
    schema=[Field(name=LABEL_BITS_COLUMN, dtype=Int64)],
    source=user_stats_push,
    description="The last labels of the user as bits (newest in bit 0): what the stream updates user_recent_ctr from",
)
item_info = FeatureView(
    name="item_info",
    entities=[item],
    ttl=timedelta(0),
    schema=[Field(name=CATEGORY_COLUMN, dtype=String)],
    source=_source("item_info", DATA / "stats" / "item_info.parquet"),
    description="Static item content",
)

ranker_base = FeatureService(name="ranker_base", features=[user_stats, item_stats, item_info],
                             description="The baseline ranker: ids, context and counters")
ranker_pooled = FeatureService(name="ranker_pooled", features=[user_stats, item_stats, item_info, user_recent_items],
                               description="Baseline + the user's recent items (pooled-history)")

if MODEL_VERSION:
    lum_user_interest = FeatureView(
        name="lum_user_interest",
        entities=[user, condition],
        ttl=_days(SETTINGS["lum_ttl_days"]),
        schema=[Field(name="embedding", dtype=Array(Float32)), Field(name="model_version", dtype=String)],
        source=_folder_source("lum_user_interest", DATA / "lum_user" / MODEL_VERSION),
        description="LUM user-interest vector per (user, query condition); event_timestamp is the as-of time",
        tags={"model_version": MODEL_VERSION},
    )
    lum_item = FeatureView(
        name="lum_item",
        entities=[item],
        ttl=timedelta(0),
        schema=[Field(name="item_embedding", dtype=Array(Float32)), Field(name="item_model_version", dtype=String)],
        source=_source("lum_item", DATA / "lum_item" / MODEL_VERSION / "items.parquet"),
        description="The LM's own vector of each item (its output row): user . item is the model's logit",
        tags={"model_version": MODEL_VERSION},
    )
    ranker_lum = FeatureService(name="ranker_lum", features=[user_stats, item_stats, item_info, lum_user_interest, lum_item],
                                description="Baseline + LUM user-interest vectors and item vectors", tags={"model_version": MODEL_VERSION})
    ranker_lum_pooled = FeatureService(
        name="ranker_lum_pooled", features=[user_stats, item_stats, item_info, user_recent_items, lum_user_interest, lum_item],
        description="Baseline + LUM + pooled-history", tags={"model_version": MODEL_VERSION})
