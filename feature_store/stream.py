"""The real-time behaviour stream: user counters and recent behaviours updated per event through Feast's push API.

Batch `materialize` fills the online store with each user's values as of the offline tables' end. Between two
materializations, a ranking stack's new events reach the store through `push_events` (`lum features push`,
`POST /events` on `lum serve`): for every user of the batch it reads the user's current online row (counters,
recent behaviours and the last labels as bits, `user_stream_state`), applies the events in time order exactly as
`offline_tables.py` computes them, and pushes one row per (user, moment) stamped 1 microsecond after the moment
(the offline tables' convention) to `user_stats_push` and `user_recent_items_push`. So a request at t sees every
behaviour strictly before t, as every training row does, without a materialize.

    user_n_events += 1 per event; user_n_clicks += label; user_ctr = clicks / events
    bits = ((bits << 1) | label) & (2^recent_window - 1); user_recent_ctr = popcount(bits) / min(events, window)
    user_last_event_s = the event's time; engaged events (label 1, or every event when the repo's history_labels
    is "all") append (item, its category from item_info, time) to the history, keeping the last history_items

Item counters stay a daily batch (`item_stats`, refreshed per period by `materialize`), as in the offline tables.

A batch is checked whole before anything is written: a missing or null field, a label other than 0 / 1, or an
event older than what the store already holds for its user is a `StreamInputError` naming the row and the field,
and nothing of the batch is applied. Events at the same moment as the user's newest one are fine (their moment's
row is pushed again with the new totals).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from contracts.names import HISTORY_CATEGORIES, HISTORY_ITEMS, HISTORY_TIMES, ID_NORMAL_FORM, LABEL_BITS_COLUMN, MAX_ID_BYTES, USER_STATS_COLUMNS
from feature_store.offline_tables import EPOCH, ONE_US, STATS_CONFIG_FILE, StatsConfig
from feature_store.repo import FeatureRepo, FeatureStoreError

REQUIRED = ("user_id", "item_id", "ts", "label")
PUSH_SOURCES = {"user_stats": "user_stats_push", "user_recent_items": "user_recent_items_push"}


class StreamInputError(FeatureStoreError):
    """A batch of events the stream refuses; the message names the row and the field. Nothing of it was applied."""


@dataclass
class UserState:
    """One user's streamed state (what the online store holds for them)."""

    n_events: float = 0.0
    n_clicks: float = 0.0
    last_event_s: float | None = None
    bits: int = 0
    items: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


def stream_config(repo: FeatureRepo) -> StatsConfig:
    """The settings the repo's offline tables were built with (written beside them)."""
    path = repo.data / "stats" / STATS_CONFIG_FILE
    if not path.exists():
        raise FeatureStoreError(f"{path} is missing: rebuild the offline tables (`lum features apply --run RUN`) before pushing events")
    return StatsConfig(**json.loads(path.read_text()))


def check_events(events: pd.DataFrame, source: str = "events") -> pd.DataFrame:
    """The batch with user_id / item_id as strings, ts as UTC timestamps and label as int; a clear error otherwise."""
    missing = [c for c in REQUIRED if c not in events.columns]
    if missing:
        raise StreamInputError(f"{source}: missing field(s) {', '.join(missing)} (an event needs {', '.join(REQUIRED)}); nothing was applied")
    for column in REQUIRED:
        null = events[column].isna().to_numpy()
        if null.any():
            raise StreamInputError(f"{source}: row {int(np.flatnonzero(null)[0])}: field '{column}' is empty; nothing was applied")
    out = events.reset_index(drop=True).copy()
    for column in ("user_id", "item_id"):
        text = out[column].astype(str)
        bad = (text.str.len() == 0) | (text.str.encode("utf-8").str.len() > MAX_ID_BYTES)  # the import's limit
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise StreamInputError(f"{source}: row {row}: field '{column}' must be a non-empty id of at most {MAX_ID_BYTES:,} UTF-8 bytes; "
                                   "nothing was applied")
        out[column] = text.str.normalize(ID_NORMAL_FORM)  # as the import stores ids and the lookups spell them
    try:
        out["ts"] = pd.to_datetime(out["ts"], utc=True, format="ISO8601") if out["ts"].dtype == object else pd.to_datetime(out["ts"], utc=True)
    except (ValueError, TypeError) as exc:
        raise StreamInputError(f"{source}: field 'ts' must be a timestamp (ISO 8601 or a datetime): {exc}; nothing was applied") from None
    labels = pd.to_numeric(out["label"], errors="coerce")
    bad = ~labels.isin([0, 1]).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        value = events["label"].iloc[row]
        value = value.item() if hasattr(value, "item") else value  # numpy scalars print as plain values
        raise StreamInputError(f"{source}: row {row}: field 'label' is {value!r}, expected 0 or 1; nothing was applied")
    out["label"] = labels.astype(np.int64)
    return out


def _current_state(store: Any, users: list[str]) -> dict[str, UserState]:
    """Each user's counters, label bits and recent behaviours as the online store holds them now (one read)."""
    features = [f"user_stats:{c}" for c in ("user_n_events", "user_n_clicks", "user_last_event_s")]
    features += [f"user_stream_state:{LABEL_BITS_COLUMN}"]
    features += [f"user_recent_items:{c}" for c in (HISTORY_ITEMS, HISTORY_CATEGORIES, HISTORY_TIMES)]
    got = store.get_online_features(features=features, entity_rows=[{"user_id": u} for u in users]).to_dict()
    states = {}
    for i, user in enumerate(users):
        n_events = got["user_n_events"][i]
        bits = got[LABEL_BITS_COLUMN][i]
        if n_events is not None and bits is None:
            raise FeatureStoreError(
                f"user {user!r} has counters online but no {LABEL_BITS_COLUMN}: the online store was filled before the stream "
                "existed; run `lum features materialize --full` once")
        times = got[HISTORY_TIMES][i]
        states[user] = UserState(
            float(n_events or 0.0), float(got["user_n_clicks"][i] or 0.0), got["user_last_event_s"][i], int(bits or 0),
            list(got[HISTORY_ITEMS][i] or []), list(got[HISTORY_CATEGORIES][i] or []), [] if times is None else [float(t) for t in times])
    return states


def _categories(store: Any, items: list[str]) -> dict[str, str]:
    if not items:
        return {}
    got = store.get_online_features(features=["item_info:item_category"], entity_rows=[{"item_id": i} for i in items]).to_dict()
    return {item: ("" if c is None else str(c)) for item, c in zip(items, got["item_category"])}


def push_events(repo: FeatureRepo, events: pd.DataFrame, source: str = "events") -> dict[str, Any]:
    """Apply a batch of events to the online store (see the module docstring); returns what was pushed."""
    from feast.data_source import PushMode

    batch = check_events(events, source)
    config = stream_config(repo)
    store = repo.store()
    if batch.empty:
        return {"events": 0, "users": 0, "rows": {name: 0 for name in PUSH_SOURCES}}
    batch["second"] = (batch["ts"] - EPOCH).dt.total_seconds()
    batch = batch.sort_values(["user_id", "ts"], kind="stable")
    users = list(dict.fromkeys(batch["user_id"]))
    states = _current_state(store, users)
    # refuse the whole batch before writing anything: an event older than the user's newest one would rewrite history
    for user, rows in batch.groupby("user_id", sort=False):
        last = states[user].last_event_s
        if last is not None and rows["second"].iloc[0] < last - 1e-6:
            row = int(rows.index[0])
            raise StreamInputError(
                f"{source}: row {row}: event of user {user!r} at {rows['ts'].iloc[0]} is older than the newest event the store "
                f"holds for them ({pd.Timestamp(last, unit='s', tz='UTC')}); events must arrive in time order per user; nothing was applied")
    engaged_all = config.history_labels == "all"
    categories = _categories(store, sorted(set(batch["item_id"])))
    mask = (1 << config.recent_window) - 1
    stats_rows, history_rows = [], []
    for user, rows in batch.groupby("user_id", sort=False):
        state = states[user]
        history_changed = False
        for item, label, second in zip(rows["item_id"], rows["label"], rows["second"]):
            state.n_events += 1.0
            state.n_clicks += float(label)
            state.bits = ((state.bits << 1) | int(label)) & mask
            state.last_event_s = float(second)
            if label == 1 or engaged_all:
                state.items = [*state.items, item][-config.history_items:]
                state.categories = [*state.categories, categories.get(item, "")][-config.history_items:]
                state.times = [*state.times, float(second)][-config.history_items:]
                history_changed = True
        # the online store keeps each key's newest row only: one row per user, as of its newest event (+1 us)
        stamp = rows["ts"].iloc[-1] + ONE_US
        stats_rows.append({
            "user_id": user, "event_timestamp": stamp,
            "user_n_events": state.n_events, "user_n_clicks": state.n_clicks, "user_ctr": state.n_clicks / state.n_events,
            "user_recent_ctr": bin(state.bits).count("1") / min(state.n_events, config.recent_window),
            "user_last_event_s": state.last_event_s, LABEL_BITS_COLUMN: state.bits,
        })
        if history_changed:
            history_rows.append({"user_id": user, "event_timestamp": stamp, HISTORY_ITEMS: list(state.items),
                                 HISTORY_CATEGORIES: list(state.categories), HISTORY_TIMES: list(state.times)})
    stats = pd.DataFrame(stats_rows, columns=["user_id", "event_timestamp", *USER_STATS_COLUMNS, LABEL_BITS_COLUMN])
    store.push(PUSH_SOURCES["user_stats"], stats, to=PushMode.ONLINE)
    if history_rows:
        store.push(PUSH_SOURCES["user_recent_items"], pd.DataFrame(history_rows), to=PushMode.ONLINE)
    return {"events": int(len(batch)), "users": len(users), "rows": {"user_stats": len(stats_rows), "user_recent_items": len(history_rows)}}
