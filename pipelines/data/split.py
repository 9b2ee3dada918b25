"""Splitting an event log into pretraining, ranker-training and test windows.

Two protocols:

* `global` - windows by time for everybody: events before t1 pretrain the behaviour LM, [t1, t2) train the
  ranker, [t2, end] test it. The production view: yesterday's model and features, today's traffic. The
  boundaries are time quantiles (`fractions`) or explicit times (`at`).
* `per-user` - each user's events in time order: the first part is history (the LM's pretraining data), the
  next part ranker training, the last part test (`fractions` of each user's events, or the last `last_k`
  events). The protocol of the LUM and HSTU papers on public data. Note that one user's test events may be
  earlier in calendar time than another user's pretraining events; only each user's own order is kept.

In both, a user's windows are ordered strictly in time (ties never straddle a boundary: all events of a user
at the same time fall in the same window), and every feature for a row at time t must still use only events
strictly before t: the split decides which rows a step trains or tests on, not what history it may read.

Each window's summary: users, items, events, positive rate, time range, and two shares of rows without history:
`cold_row_share` (the user has no event strictly before the row: even a rolling feature has nothing) and
`no_prior_window_share` (the user has no event in an earlier window: a snapshot feature made at the window's
start has nothing). On ml-latest-small users rate in bursts, so a global 60/20/20 split leaves about 90% of
test rows with no event in an earlier window; a per-user split leaves none.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from contracts.files import write_json_atomic
from contracts.settings import Field, config_class
from pipelines.data.contract import read_events, readable_time, utc_timestamp, write_parquet_atomic
from pipelines.paths import RunPaths

WINDOWS: tuple[str, ...] = ("pretrain", "train", "test")
Protocol = Literal["global", "per-user"]


def _valid_fractions(value: tuple[float, float, float]) -> tuple[float, float, float]:
    if min(value) < 0 or abs(sum(value) - 1.0) > 1e-6:
        raise PydanticCustomError("fractions", f"split fractions must be three non-negative numbers summing to 1, got "
                                               f"{' '.join(f'{v:g}' for v in value)} (sum {sum(value):g})")
    return value


def _ordered_times(value: tuple[str, str] | None) -> tuple[str, str] | None:
    if value is None:
        return value
    for text in value:
        readable_time(text)
    if utc_timestamp(value[0]) > utc_timestamp(value[1]):
        raise PydanticCustomError("order", f"split times must be ordered: train start {value[0]} is after test start {value[1]}")
    return value


# The window shares, checked where they are given (`--fractions`, a run config's protocols[].fractions): a bad value
# is refused when the settings are read, before the data step runs.
Fractions = Annotated[tuple[float, float, float], AfterValidator(_valid_fractions)]
SplitTimes = Annotated[tuple[str, str] | None, AfterValidator(_ordered_times)]


@config_class
class SplitConfig:
    """How a run's events are split into pretraining, ranker-training and test windows."""

    protocol: Protocol = Field("global", description="global: windows by time (production view); per-user: each user's last events held out.")
    fractions: Fractions = Field((0.6, 0.2, 0.2), description="Shares of the pretraining, ranker-training and test windows.")
    at: SplitTimes = Field(None, description="global: explicit train start and test start times (ISO).")
    last_k: tuple[int, int] | None = Field(None, description="per-user: the last k events of each user for train and for test.")

    def __post_init__(self) -> None:
        if self.protocol not in ("global", "per-user"):
            raise ValueError(f"unknown split protocol '{self.protocol}': expected global or per-user")
        if self.at is not None and self.protocol != "global":
            raise ValueError("explicit split times (--at) apply to the global protocol only")
        if self.last_k is not None and (self.protocol != "per-user" or len(self.last_k) != 2 or min(self.last_k) < 0):
            raise ValueError("--last-k takes two non-negative counts (train, test) and applies to the per-user protocol")


def _user_codes(table: pa.Table) -> np.ndarray:
    return np.asarray(pc.dictionary_encode(table.column("user_id")).combine_chunks().indices.to_numpy(zero_copy_only=False))


def _ts_us(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column("ts").cast(pa.int64()).to_numpy(), dtype=np.int64)


def cold_rows(table: pa.Table) -> np.ndarray:
    """[N] bool: the row's user has no event strictly before the row's time (in the whole table)."""
    ts = _ts_us(table)
    first = pd.Series(ts).groupby(_user_codes(table)).transform("min").to_numpy()
    return ts <= first


def assign_windows(table: pa.Table, config: SplitConfig) -> np.ndarray:
    """[N] int8 window index per row: 0 pretrain, 1 train, 2 test."""
    ts = _ts_us(table)
    if config.protocol == "global":
        if config.at is not None:
            t1, t2 = (utc_timestamp(t) for t in config.at)
            b1, b2 = t1.value // 1000, t2.value // 1000
            if b1 > b2:
                raise ValueError(f"split times must be ordered: train start {t1} is after test start {t2}")
        else:
            f1 = config.fractions[0]
            f2 = f1 + config.fractions[1]
            b1, b2 = (int(np.quantile(ts, q, method="lower")) if q < 1 else int(ts.max()) + 1 for q in (f1, f2))
            if f1 == 0:
                b1 = int(ts.min())
        return np.where(ts < b1, 0, np.where(ts < b2, 1, 2)).astype(np.int8)

    # per-user: a time threshold per user, taken at the boundary index of that user's sorted events, so that
    # events sharing a timestamp land in the same window
    codes = _user_codes(table)
    order = np.lexsort((ts, codes))
    sorted_codes, sorted_ts = codes[order], ts[order]
    n_users = int(codes.max()) + 1 if len(codes) else 0
    counts = np.bincount(codes, minlength=n_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if config.last_k is not None:
        k_train, k_test = config.last_k
        idx_test = np.maximum(counts - k_test, 0)
        idx_train = np.maximum(idx_test - k_train, 0)
    else:
        idx_train = np.round(counts * config.fractions[0]).astype(np.int64)
        idx_test = np.round(counts * (config.fractions[0] + config.fractions[1])).astype(np.int64)
    never = np.iinfo(np.int64).max

    def threshold(boundary: np.ndarray) -> np.ndarray:
        inside = boundary < counts
        out = np.full(n_users, never, dtype=np.int64)
        out[inside] = sorted_ts[starts[inside] + boundary[inside]]
        return out

    t_train, t_test = threshold(idx_train), threshold(idx_test)
    window_sorted = np.where(sorted_ts < t_train[sorted_codes], 0, np.where(sorted_ts < t_test[sorted_codes], 1, 2))
    window = np.empty(len(ts), dtype=np.int8)
    window[order] = window_sorted
    return window


def first_window_rows(table: pa.Table, window: np.ndarray) -> np.ndarray:
    """[N] bool: the row's user has no events in any earlier window (no history for features made at its start)."""
    first_window = pd.Series(window).groupby(_user_codes(table)).transform("min").to_numpy()
    return first_window == window


def summarize(table: pa.Table, cold: np.ndarray, no_prior_window: np.ndarray | None = None) -> dict[str, Any]:
    """Counts and shares of one window. `cold`: rows with no earlier event of their user at all;
    `no_prior_window`: rows whose user has no event in an earlier window."""
    ts = _ts_us(table)
    n = table.num_rows
    return {
        "events": n,
        "users": pc.count_distinct(table.column("user_id")).as_py() if n else 0,
        "items": pc.count_distinct(table.column("item_id")).as_py() if n else 0,
        "positive_rate": float(pc.mean(table.column("label")).as_py()) if n else None,
        "ts_min": pd.Timestamp(int(ts.min()), unit="us", tz="UTC").isoformat() if n else None,
        "ts_max": pd.Timestamp(int(ts.max()), unit="us", tz="UTC").isoformat() if n else None,
        "cold_row_share": float(cold.mean()) if n else None,
        "no_prior_window_share": float(no_prior_window.mean()) if n and no_prior_window is not None else None,
    }


def _how(config: SplitConfig) -> str:
    """The option that placed the boundaries, as the user gave it."""
    if config.at is not None:
        return f"--at {config.at[0]} {config.at[1]}"
    if config.last_k is not None:
        return f"--last-k {config.last_k[0]} {config.last_k[1]}"
    return f"--protocol {config.protocol} --fractions {' '.join(f'{f:g}' for f in config.fractions)}"


def _asked_empty(config: SplitConfig, index: int) -> bool:
    """True when the settings themselves ask for an empty window (a zero share or count), not the data."""
    if config.at is not None:
        return False
    if config.last_k is not None:
        return index > 0 and config.last_k[index - 1] == 0
    return config.fractions[index] == 0


def check_windows(table: pa.Table, window: np.ndarray, config: SplitConfig) -> None:
    """ValueError when a window is empty although the settings asked for events in it: the LM would pretrain on
    nothing, or a ranker train or be tested on nothing, and fail much later (or report metrics of zero rows)."""
    if table.num_rows == 0:
        return
    counts = np.bincount(window, minlength=len(WINDOWS))
    empty = [name for index, name in enumerate(WINDOWS) if counts[index] == 0 and not _asked_empty(config, index)]
    if empty:
        ts = _ts_us(table)
        first, last = (pd.Timestamp(int(t), unit="us", tz="UTC").isoformat() for t in (ts.min(), ts.max()))
        shown = ", ".join(f"{name} {int(n):,}" for name, n in zip(WINDOWS, counts))
        raise ValueError(f"{_how(config)} leaves the {' and '.join(empty)} window(s) empty (events per window: {shown}; the "
                         f"{table.num_rows:,} events run from {first} to {last}); choose boundaries inside that range")


def split_events(table: pa.Table, config: SplitConfig) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Split `table` into the three windows; returns the tables and the summary. A window left empty although
    the settings asked for events in it is an error (`check_windows`)."""
    window = assign_windows(table, config)
    check_windows(table, window, config)
    cold = cold_rows(table)
    no_prior = first_window_rows(table, window)
    tables: dict[str, pa.Table] = {}
    summary: dict[str, Any] = {"config": asdict(config), "windows": {}}
    for index, name in enumerate(WINDOWS):
        mask = window == index
        tables[name] = table.filter(pa.array(mask))
        summary["windows"][name] = summarize(tables[name], cold[mask], no_prior[mask])
    summary["all"] = summarize(table, cold)
    return tables, summary


def dataset_fingerprint(paths: RunPaths) -> str:
    """Identifies the data a split was made from (dataset.json changes whenever the data step reruns)."""
    return hashlib.sha256(paths.dataset_info.read_bytes()).hexdigest()[:16]


def split_run(paths: RunPaths, config: SplitConfig) -> dict[str, Any]:
    """Split the run's events into `splits/<protocol>/`; summary.json is written last and marks completion."""
    table, _contract = read_events(paths.events)
    tables, summary = split_events(table, config)
    summary["dataset_fingerprint"] = dataset_fingerprint(paths)
    out_dir = paths.split_dir(config.protocol)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths.split_summary(config.protocol).unlink(missing_ok=True)
    for name, window_table in tables.items():
        write_parquet_atomic(window_table, paths.split_file(config.protocol, name))
    write_json_atomic(summary, paths.split_summary(config.protocol), default=float)  # numpy scalars as floats
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of a split summary, one line per window."""
    rows = {**summary["windows"], "all": summary["all"]}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame["positive_rate"] = frame["positive_rate"].map(lambda v: "-" if v is None or pd.isna(v) else f"{v:.3f}")
    for col in ("cold_row_share", "no_prior_window_share"):
        frame[col] = frame[col].map(lambda v: "-" if v is None or pd.isna(v) else f"{v:.1%}")
    frame = frame.rename(columns={"cold_row_share": "no_earlier_event", "no_prior_window_share": "no_earlier_window"})
    for col in ("ts_min", "ts_max"):
        frame[col] = frame[col].map(lambda v: (v or "-")[:19])
    return frame.to_string()
