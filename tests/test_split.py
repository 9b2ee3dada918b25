"""Splits: no overlap, windows ordered in time (per user for per-user), exact summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.data.contract import EventContract, validate_events
from pipelines.data.split import SplitConfig, assign_windows, split_events

T0 = pd.Timestamp("2024-01-01", tz="UTC")


def log(rows: list[tuple[str, str, int, int]]) -> pa.Table:
    """(user, item, minutes after T0, label) -> a validated events table."""
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "minutes", "label"])
    frame["ts"] = T0 + pd.to_timedelta(frame.pop("minutes"), unit="min")
    return validate_events(pa.Table.from_pandas(frame, preserve_index=False), EventContract(), "test").events


def test_global_split_by_fractions_is_ordered_and_complete(tiny_sim):
    events, _ = tiny_sim
    tables, summary = split_events(events, SplitConfig("global", (0.6, 0.2, 0.2)))
    assert sum(t.num_rows for t in tables.values()) == events.num_rows
    pre, train, test = (tables[w].column("ts").to_pandas() for w in ("pretrain", "train", "test"))
    assert pre.max() < train.min() and train.max() < test.min()
    assert abs(len(pre) / events.num_rows - 0.6) < 0.02 and abs(len(test) / events.num_rows - 0.2) < 0.02
    assert summary["all"]["events"] == events.num_rows
    assert summary["windows"]["test"]["positive_rate"] == pytest.approx(pc_mean(tables["test"]))


def pc_mean(table: pa.Table) -> float:
    return float(np.mean(table.column("label").to_numpy()))


def test_global_split_at_explicit_times():
    table = log([("a", "x", 0, 1), ("a", "y", 10, 0), ("b", "x", 20, 1), ("b", "z", 30, 0), ("a", "z", 40, 1)])
    at = ((T0 + pd.Timedelta(minutes=10)).isoformat(), (T0 + pd.Timedelta(minutes=30)).isoformat())
    tables, summary = split_events(table, SplitConfig("global", at=at))
    assert [tables[w].num_rows for w in ("pretrain", "train", "test")] == [1, 2, 2]
    # train rows: a@10 follows a@0 in pretrain; b@20 is b's first event anywhere
    assert summary["windows"]["train"]["cold_row_share"] == 0.5
    assert summary["windows"]["train"]["no_prior_window_share"] == 0.5
    # test rows b@30 and a@40 both have history in earlier windows
    assert summary["windows"]["test"]["no_prior_window_share"] == 0.0
    at_late = (at[0], (T0 + pd.Timedelta(minutes=20)).isoformat())
    _, late = split_events(table, SplitConfig("global", at=at_late))
    # test rows b@20, b@30, a@40: b has no event before minute 20, yet b@30 has b@20 strictly before it
    assert late["windows"]["test"]["no_prior_window_share"] == pytest.approx(2 / 3)
    assert late["windows"]["test"]["cold_row_share"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="must be ordered"):
        split_events(table, SplitConfig("global", at=(at[1], at[0])))


def test_per_user_split_orders_each_users_events(tiny_sim):
    events, _ = tiny_sim
    window = assign_windows(events, SplitConfig("per-user", (0.6, 0.2, 0.2)))
    frame = events.select(["user_id", "ts"]).to_pandas().assign(window=window)
    spans = frame.groupby(["user_id", "window"]).ts.agg(["min", "max"]).unstack("window")
    for earlier, later in ((0, 1), (1, 2), (0, 2)):
        both = spans[("max", earlier)].notna() & spans[("min", later)].notna()
        assert (spans.loc[both, ("max", earlier)] < spans.loc[both, ("min", later)]).all()
    # every user with enough distinct request times has events in all three windows
    assert (frame.groupby("user_id").window.nunique() == 3).mean() > 0.8


def test_per_user_ties_never_straddle_a_boundary():
    # user a: 5 events, two at minute 30; 60/20/20 would cut between them
    table = log([("a", "p", 0, 1), ("a", "q", 10, 0), ("a", "r", 20, 1), ("a", "s", 30, 1), ("a", "t", 30, 0)])
    window = assign_windows(table, SplitConfig("per-user", (0.6, 0.2, 0.2)))
    assert window.tolist() == [0, 0, 0, 2, 2]


def test_per_user_last_k():
    rows = [("a", f"i{k}", k, k % 2) for k in range(6)] + [("b", "i0", 0, 1), ("b", "i1", 1, 0)]
    tables, summary = split_events(log(rows), SplitConfig("per-user", last_k=(2, 1)))
    test = tables["test"].to_pandas()
    assert sorted(zip(test.user_id, test.item_id)) == [("a", "i5"), ("b", "i1")]
    train = tables["train"].to_pandas()
    assert sorted(zip(train.user_id, train.item_id)) == [("a", "i3"), ("a", "i4"), ("b", "i0")]
    assert tables["pretrain"].column("item_id").to_pylist() == ["i0", "i1", "i2"]
    assert summary["windows"]["test"]["no_prior_window_share"] == 0.0  # b's test row follows b's train row


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"protocol": "random"}, "protocol\n  Input should be .global. or .per-user."),
        ({"fractions": (0.5, 0.2, 0.2)}, "summing to 1"),
        ({"protocol": "per-user", "at": ("2024-01-01", "2024-01-02")}, "global protocol only"),
        ({"protocol": "global", "last_k": (1, 1)}, "per-user protocol"),
    ],
)
def test_bad_split_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SplitConfig(**kwargs)


def test_movielens_bursts_make_a_global_split_cold(ml_latest_small):
    from pipelines.data.sources.movielens import load_movielens

    events = load_movielens(ml_latest_small).events
    _, global_summary = split_events(events, SplitConfig("global"))
    _, per_user_summary = split_events(events, SplitConfig("per-user"))
    assert global_summary["windows"]["test"]["no_prior_window_share"] > 0.8
    assert per_user_summary["windows"]["test"]["no_prior_window_share"] == 0.0
    assert per_user_summary["windows"]["test"]["users"] == 610
