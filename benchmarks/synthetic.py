"""TEST AND BENCHMARK DATA ONLY: a synthetic training-set table in the feature store's contract.

The label depends on three things a ranker can learn, each through different features:
  taste     the item's category equals the user's hidden favourite category (the pooled history reveals it: 70%
            of a user's recent items come from that category; ids alone need many rows per user to learn it)
  interest  dot(hidden user-interest vector under the row's surface, item vector): the LUM columns carry noisy
            copies of exactly these vectors, so the LUM variants can read it and the others can hardly learn it
            (it changes with the surface, and a user has few rows)
  quality   an item effect and a user effect, visible through the item / user counters
It also holds columns that must never become features: `feedback` (post-event, derived from the label) and
`p_click` / `relevance` (the simulator's ground truth).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from contracts.names import COUNTER_COLUMNS, SEQUENCE_COLUMNS, TRAINING_SET_METADATA_KEY, lum_user_column, slug

SURFACES = ("home", "search", "item_detail")
DEVICES = ("mobile", "desktop")


@dataclass(frozen=True)
class SyntheticConfig:
    rows: int = 20_000
    users: int = 1_000
    items: int = 2_000
    categories: int = 20
    lum_dim: int = 16
    days: int = 14
    history_len: int = 20
    seed: int = 0
    lum_noise: float = 0.3  # noise added to the hidden vectors, relative to their unit length
    missing_lum_users: float = 0.05  # share of users without LUM vectors
    missing_lum_items: float = 0.02
    cold_users: float = 0.05  # share of users without counters
    cold_items: float = 0.05
    base_logit: float = -1.5
    w_taste: float = 1.5
    w_interest: float = 1.5
    w_quality: float = 1.0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _list_column(values: np.ndarray, lengths: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    mask = None if valid is None else pa.array(~valid)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=mask)


def _vector_column(vectors: np.ndarray, valid: np.ndarray) -> pa.Array:
    """[N, D] -> list<float32>, null where not valid."""
    kept = vectors[valid].astype(np.float32).ravel()
    return _list_column(kept, np.where(valid, vectors.shape[1], 0), valid)


def synthetic_training_set(config: SyntheticConfig = SyntheticConfig()) -> pa.Table:
    """One row per impression, in random time order, with the `lum.training_set` metadata."""
    rng = np.random.default_rng(config.seed)
    n, d, s = config.rows, config.lum_dim, len(SURFACES)
    # the hidden world
    taste = rng.integers(config.categories, size=config.users)
    item_category = rng.permutation(np.arange(config.items) % config.categories)
    common = rng.normal(size=(config.users, 1, d))
    hidden_user = _unit(0.5 * common + rng.normal(size=(config.users, s, d)))  # [U, S, D] interest per surface
    hidden_item = _unit(rng.normal(size=(config.items, d)))  # [I, D]
    quality = rng.normal(size=config.items) * 0.7
    user_bias = rng.normal(size=config.users) * 0.5
    by_category = np.argsort(item_category, kind="stable")
    category_start = np.searchsorted(item_category[by_category], np.arange(config.categories))
    category_size = np.bincount(item_category, minlength=config.categories)

    def item_of_category(categories: np.ndarray) -> np.ndarray:
        return by_category[category_start[categories] + (rng.random(len(categories)) * category_size[categories]).astype(np.int64)]

    # impressions
    user = rng.integers(config.users, size=n)
    surface = rng.integers(s, size=n)
    device = (rng.random(n) < 0.3).astype(np.int64)
    hour = rng.integers(24, size=n)
    shown_taste = rng.random(n) < 0.3
    item = np.where(shown_taste, item_of_category(taste[user]), rng.integers(config.items, size=n))
    seconds = rng.random(n) * config.days * 86_400
    ts = (np.datetime64("2025-01-01T00:00:00", "us") + (seconds * 1e6).astype("timedelta64[us]")).astype("datetime64[us]")
    interest = np.einsum("nd,nd->n", hidden_user[user, surface], hidden_item[item]) * np.sqrt(d)  # about N(0, 1)
    logit = (
        config.base_logit
        + config.w_taste * (item_category[item] == taste[user])
        + config.w_interest * interest
        + config.w_quality * quality[item]
        + user_bias[user]
    )
    p_click = _sigmoid(logit)
    label = (rng.random(n) < p_click).astype(np.int8)
    feedback = np.where(label == 1, rng.integers(3, 6, size=n), rng.integers(0, 3, size=n))

    # counters: noisy views of the user and item effects; null for cold users / items
    cold_user = rng.random(config.users) < config.cold_users
    cold_item = rng.random(config.items) < config.cold_items
    user_events = rng.poisson(40, size=config.users) + 1.0
    user_ctr = np.clip(_sigmoid(config.base_logit + user_bias + rng.normal(size=config.users) * 0.2), 0, 1)
    item_impressions = rng.poisson(150, size=config.items) + 1.0
    item_ctr = np.clip(_sigmoid(config.base_logit + quality + rng.normal(size=config.items) * 0.2), 0, 1)
    counters = {
        "user_n_events": user_events[user],
        "user_n_clicks": np.round(user_events * user_ctr)[user],
        "user_ctr": user_ctr[user],
        "user_recent_ctr": np.clip(user_ctr[user] + rng.normal(size=n) * 0.05, 0, 1),
        "user_hours_since_last": rng.exponential(10.0, size=n),
        "item_n_impressions": item_impressions[item],
        "item_n_clicks": np.round(item_impressions * item_ctr)[item],
        "item_ctr": item_ctr[item],
    }
    for name in counters:
        cold = cold_user[user] if name.startswith("user_") else cold_item[item]
        counters[name] = np.where(cold, np.nan, counters[name])

    # history: the user's recent engaged items, 70% from the favourite category, newest last
    hist_len = rng.integers(0, config.history_len + 1, size=n)
    owner = np.repeat(user, hist_len)
    hist_cat = np.where(rng.random(len(owner)) < 0.7, taste[owner], rng.integers(config.categories, size=len(owner)))
    hist_item = item_of_category(hist_cat)
    # each history item's time: hours before the row, oldest first (newest last, as the feature store writes them)
    hist_row = np.repeat(np.arange(n), hist_len)
    hours_ago = rng.exponential(48.0, size=len(owner))
    hours_ago = hours_ago[np.lexsort((-hours_ago, hist_row))]
    hist_ts = ts.astype("datetime64[us]").astype(np.int64)[hist_row] / 1e6 - hours_ago * 3600.0

    # LUM: noisy copies of the hidden vectors; a combined condition reuses the home vector with fresh noise
    conditions = [f"surface={x}" for x in SURFACES] + ["surface=home|device=mobile"]
    condition_vectors = [hidden_user[:, k] for k in range(s)] + [hidden_user[:, 0]]
    lum_user_ok = rng.random(config.users) >= config.missing_lum_users
    lum_item_ok = rng.random(config.items) >= config.missing_lum_items
    noise = config.lum_noise / np.sqrt(d)

    columns: dict[str, pa.Array] = {
        "row_id": pa.array(np.arange(n, dtype=np.int64)),
        "user_id": pa.array([f"u{x}" for x in user]),
        "item_id": pa.array([f"i{x}" for x in item]),
        "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
        "label": pa.array(label, pa.int8()),
        "surface": pa.array(np.asarray(SURFACES)[surface]),
        "device": pa.array(np.asarray(DEVICES)[device]),
        "daypart": pa.array(np.asarray(["night", "morning", "afternoon", "evening"])[hour // 6]),
        "hour": pa.array(hour.astype(np.int64)),
        "item_category": pa.array([f"c{x}" for x in item_category[item]]),
        **{name: pa.array(values, pa.float64(), from_pandas=True) for name, values in counters.items()},
        "hist_item_ids": _list_column(np.asarray([f"i{x}" for x in hist_item], dtype=object), hist_len),
        "hist_categories": _list_column(np.asarray([f"c{x}" for x in hist_cat], dtype=object), hist_len),
        "hist_ts": _list_column(hist_ts.astype(np.float64), hist_len),
    }
    missing_lum = ~lum_user_ok[user] | ~lum_item_ok[item]
    for name, vectors in zip(conditions, condition_vectors):
        observed = vectors[user] + rng.normal(size=(n, d)) * noise
        columns[lum_user_column(name)] = _vector_column(observed, lum_user_ok[user])
    columns["lum_item"] = _vector_column(hidden_item[item] + rng.normal(size=(n, d)) * noise, lum_item_ok[item])
    columns["missing_user_stats"] = pa.array(cold_user[user].astype(np.int8))
    columns["missing_item_stats"] = pa.array(cold_item[item].astype(np.int8))
    columns["missing_lum"] = pa.array(missing_lum.astype(np.int8))
    # never features: post-event and ground truth
    columns["feedback"] = pa.array(feedback.astype(np.int64))
    columns["p_click"] = pa.array(p_click)
    columns["relevance"] = pa.array(interest)

    metadata = {
        "context_columns": ["surface", "device", "daypart", "hour"],
        "counter_columns": list(COUNTER_COLUMNS),
        "sequence_columns": list(SEQUENCE_COLUMNS),
        "lum_conditions": {slug(c): c for c in conditions},
        "lum_dim": d,
        "model_version": "synthetic-v1",
        "label": "label",
        "user": "user_id",
        "item": "item_id",
        "time": "ts",
    }
    table = pa.table(columns)
    return table.replace_schema_metadata({TRAINING_SET_METADATA_KEY.encode(): json.dumps(metadata).encode()})


def split_by_time(table: pa.Table, test_fraction: float = 0.2) -> tuple[pa.Table, pa.Table]:
    """(earlier rows, the latest `test_fraction` of rows): a train / test split for tests and benchmarks."""
    import pyarrow.compute as pc

    times = pc.cast(table.column("ts"), pa.int64()).to_numpy()
    cut = np.quantile(times, 1 - test_fraction)
    return table.filter(pa.array(times < cut)), table.filter(pa.array(times >= cut))
