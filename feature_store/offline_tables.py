"""Ordinary ranker features, computed point-in-time from the event log into Feast offline tables.

Every table here has one row per (entity, moment its value changed), stamped so that Feast's point-in-time
join can never show a row at time t anything from an event at or after t:

    a feature row computed from all events with ts <= e is stamped  e + 1 microsecond

so a request at t joins the newest row stamped <= t, i.e. the stats of exactly the events strictly before t
(the label of an event is taken as known right after it: clicks are logged as they happen).

    user_stats.parquet         user_id, event_timestamp, user_n_events, user_n_clicks, user_ctr,
                               user_recent_ctr (last `recent_window` impressions), user_last_event_s,
                               user_recent_label_bits (the last `recent_window` labels as bits, newest in bit 0:
                               not a ranker feature, the state a real-time stream updates user_recent_ctr from)
    item_stats.parquet         item_id, event_timestamp, item_n_impressions, item_n_clicks, item_ctr
                               (smoothed towards the global rate), refreshed at the end of every period
                               (default a day): a row stamped b counts the events before b
    user_recent_items.parquet  user_id, event_timestamp, hist_item_ids, hist_categories, hist_ts
                               (the last `history_items` engaged items, newest last; hist_ts: each one's event
                               time in seconds since the epoch, for a ranker that weighs behaviours by age)
    item_info.parquet          item_id, event_timestamp (1970-01-02: content is static), item_category
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from contracts.files import write_parquet_atomic, write_text_atomic
from contracts.names import (
    CATEGORY_COLUMN,
    HISTORY_CATEGORIES,
    HISTORY_ITEMS,
    HISTORY_TIMES,
    ITEM_COUNTERS,
    LABEL_BITS_COLUMN,
    USER_STATS_COLUMNS,
)

# The layout of the tables below: a run whose tables were written in another format rebuilds them (2: user_recent_items
# gained hist_ts, the times a target-attention ranker ages its behaviours by;
# 3: user_stats gained user_recent_label_bits, the state the real-time stream updates user_recent_ctr from)
TABLES_FORMAT = 3
ONE_US = pd.Timedelta(microseconds=1)
STATS_CONFIG_FILE = "stats_config.json"
EPOCH = pd.Timestamp("1970-01-01", tz="UTC")
STATIC = pd.Timestamp("1970-01-02", tz="UTC")  # the timestamp of values that never change (after Feast's earliest start)


@dataclass(frozen=True)
class StatsConfig:
    recent_window: int = 50  # impressions in `user_recent_ctr`
    history_items: int = 20  # engaged items kept in `hist_item_ids`
    ctr_prior_strength: float = 20.0  # pseudo-impressions pulling a new item's CTR to the global rate
    history_labels: str = "positive"  # which events count as engaged: "positive" (label 1) or "all"
    item_stats_period: str = "1D"  # item counters are refreshed at the end of every such period


def _sorted_events(events: pd.DataFrame, key: str) -> pd.DataFrame:
    frame = events[[key, "item_id" if key == "user_id" else "user_id", "ts", "label"]].copy()
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    return frame.sort_values([key, "ts"], kind="stable").reset_index(drop=True)


def _last_per_moment(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """Keep the last row of every (key, ts): its cumulative values include all events at that moment."""
    last = frame.drop_duplicates([key, "ts"], keep="last").copy()
    last["event_timestamp"] = last["ts"] + ONE_US
    return last


def user_stats(events: pd.DataFrame, config: StatsConfig) -> pd.DataFrame:
    frame = _sorted_events(events, "user_id")
    group = frame.groupby("user_id", sort=False)
    frame["user_n_events"] = group.cumcount() + 1.0
    frame["user_n_clicks"] = group["label"].cumsum().astype(np.float64)
    frame["user_ctr"] = frame["user_n_clicks"] / frame["user_n_events"]
    # clicks among the last `recent_window` impressions: a difference of cumulative sums within the user
    lagged = group["user_n_clicks"].shift(config.recent_window).fillna(0.0)
    frame["user_recent_ctr"] = (frame["user_n_clicks"] - lagged) / np.minimum(frame["user_n_events"], config.recent_window)
    frame["user_last_event_s"] = (frame["ts"] - EPOCH).dt.total_seconds()
    frame[LABEL_BITS_COLUMN] = recent_label_bits(frame["label"].to_numpy(), frame["user_id"].to_numpy(dtype=object), config.recent_window)
    last = _last_per_moment(frame, "user_id")
    return last[["user_id", "event_timestamp", *USER_STATS_COLUMNS, LABEL_BITS_COLUMN]]


def recent_label_bits(labels: np.ndarray, users: np.ndarray, window: int) -> np.ndarray:
    """[N] int64: bit j set when the user's event j places back (0 = this one) within `window` was a click. Rows are
    one user's events in time order, users contiguous. user_recent_ctr = popcount(bits) / min(n_events, window)."""
    if window > 62:
        raise ValueError(f"recent_window {window} does not fit the 62 label bits of user_recent_label_bits")
    labels = np.asarray(labels, dtype=np.int64)
    start = np.zeros(len(labels), dtype=np.int64)
    if len(labels):
        new_user = np.r_[True, users[1:] != users[:-1]]
        start = np.maximum.accumulate(np.where(new_user, np.arange(len(labels)), 0))
    bits = np.zeros(len(labels), dtype=np.int64)
    index = np.arange(len(labels))
    for back in range(window):
        source = index - back
        valid = source >= start
        bits[valid] |= labels[source[valid]] << back
    return bits


def item_stats(events: pd.DataFrame, config: StatsConfig) -> pd.DataFrame:
    """Item counters refreshed every `item_stats_period` (a daily batch by default).

    A row stamped at the end of a period b holds the counts of all the item's events before b. Per-event rows
    (as for users) would be exact to the microsecond, but a popular item then has thousands of rows and Feast's
    file store joins every request against all of them (it merges on the key, then filters by time): 368k
    requests against 1.8M per-event item rows needed more than 24 GB. Item popularity moves slowly, so a
    period-old counter costs little; user counters, which move with every click, stay per event.
    """
    frame = events[["item_id", "ts", "label"]].copy()
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    frame["period_end"] = frame["ts"].dt.floor(config.item_stats_period) + pd.Timedelta(config.item_stats_period)
    per = frame.groupby(["item_id", "period_end"], sort=True)["label"].agg(impressions="size", clicks="sum").reset_index()
    group = per.groupby("item_id", sort=False)
    per["item_n_impressions"] = group["impressions"].cumsum().astype(np.float64)
    per["item_n_clicks"] = group["clicks"].cumsum().astype(np.float64)
    # the global click rate of everything before the period's end is the prior of the smoothing
    totals = frame.groupby("period_end")["label"].agg(["size", "sum"]).cumsum()
    prior = (totals["sum"] / totals["size"]).reindex(per["period_end"]).to_numpy()
    a = config.ctr_prior_strength
    per["item_ctr"] = (per["item_n_clicks"] + a * prior) / (per["item_n_impressions"] + a)
    per["event_timestamp"] = per["period_end"]
    return per[["item_id", "event_timestamp", *ITEM_COUNTERS]]


def user_recent_items(events: pd.DataFrame, items: pd.DataFrame | None, config: StatsConfig) -> pd.DataFrame:
    frame = _sorted_events(events, "user_id")
    if config.history_labels == "positive":
        frame = frame[frame["label"] == 1].reset_index(drop=True)
    category = _category_lookup(items)
    cats = frame["item_id"].map(category).fillna("").to_numpy(dtype=object)
    item_ids = frame["item_id"].to_numpy(dtype=object)
    users = frame["user_id"].to_numpy(dtype=object)
    starts = np.zeros(len(frame), dtype=np.int64)  # index of each row's user's first engaged event
    if len(frame):
        new_user = np.r_[True, users[1:] != users[:-1]]
        starts = np.maximum.accumulate(np.where(new_user, np.arange(len(frame)), 0))
    n = config.history_items
    lo = np.maximum(starts, np.arange(len(frame)) - n + 1)
    frame[HISTORY_ITEMS] = [list(item_ids[a : b + 1]) for a, b in zip(lo, range(len(frame)))]
    frame[HISTORY_CATEGORIES] = [list(cats[a : b + 1]) for a, b in zip(lo, range(len(frame)))]
    seconds = ((frame["ts"] - EPOCH).dt.total_seconds()).to_numpy(dtype=np.float64)
    frame[HISTORY_TIMES] = [seconds[a : b + 1].tolist() for a, b in zip(lo, range(len(frame)))]
    last = _last_per_moment(frame, "user_id")
    return last[["user_id", "event_timestamp", HISTORY_ITEMS, HISTORY_CATEGORIES, HISTORY_TIMES]]


def _category_lookup(items: pd.DataFrame | None) -> pd.Series:
    if items is None or "category" not in items.columns:
        return pd.Series(dtype=object)
    return items.set_index(items["item_id"].astype(str))["category"].astype(str)


def item_info(events: pd.DataFrame, items: pd.DataFrame | None) -> pd.DataFrame:
    ids = pd.Index(events["item_id"].astype(str).unique())
    if items is not None:
        ids = ids.union(pd.Index(items["item_id"].astype(str)))
    category = _category_lookup(items)
    return pd.DataFrame({"item_id": ids.to_numpy(), "event_timestamp": STATIC, CATEGORY_COLUMN: ids.map(category).to_numpy()})


STATS_SCHEMAS = {
    "user_stats": pa.schema([("user_id", pa.string()), ("event_timestamp", pa.timestamp("us", tz="UTC")),
                             *[(c, pa.float64()) for c in USER_STATS_COLUMNS], (LABEL_BITS_COLUMN, pa.int64())]),
    "item_stats": pa.schema([("item_id", pa.string()), ("event_timestamp", pa.timestamp("us", tz="UTC")),
                             *[(c, pa.float64()) for c in ITEM_COUNTERS]]),
    "user_recent_items": pa.schema([("user_id", pa.string()), ("event_timestamp", pa.timestamp("us", tz="UTC")),
                                    (HISTORY_ITEMS, pa.list_(pa.string())), (HISTORY_CATEGORIES, pa.list_(pa.string())),
                                    (HISTORY_TIMES, pa.list_(pa.float64()))]),
    "item_info": pa.schema([("item_id", pa.string()), ("event_timestamp", pa.timestamp("us", tz="UTC")), (CATEGORY_COLUMN, pa.string())]),
}


def write_stats_tables(events: pd.DataFrame, items: pd.DataFrame | None, out_dir: Path, config: StatsConfig) -> dict[str, int]:
    """Compute the four tables and write them to `out_dir/<name>.parquet` (temporary name, then rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    events = events.assign(user_id=events["user_id"].astype(str), item_id=events["item_id"].astype(str))
    tables = {
        "user_stats": user_stats(events, config),
        "item_stats": item_stats(events, config),
        "user_recent_items": user_recent_items(events, items, config),
        "item_info": item_info(events, items),
    }
    write_text_atomic(json.dumps(asdict(config)), out_dir / STATS_CONFIG_FILE)  # what the real-time stream applies
    counts = {}
    for name, frame in tables.items():
        table = pa.Table.from_pandas(frame, schema=STATS_SCHEMAS[name], preserve_index=False)
        write_parquet_atomic(table, out_dir / f"{name}.parquet")
        counts[name] = table.num_rows
    return counts
