"""feature_store.offline_tables on a hand-built log of a few events (the e2e tests in tests/test_feature_store.py join
them through Feast): a row stamped e + 1 us holds the counters of every event up to e, user counters per event and
per moment, item counters per period with the smoothed CTR, the label bits the stream updates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from feature_store.offline_tables import StatsConfig, item_stats, recent_label_bits, user_stats

T = pd.Timestamp("2025-01-01 10:00", tz="UTC")
US = pd.Timedelta(microseconds=1)


def _events() -> pd.DataFrame:
    """u1: click, no click, click (two events at one moment, T+2min), then a no click a day later; u2: one no click."""
    rows = [("u1", "i1", T, 1), ("u1", "i2", T + pd.Timedelta(minutes=1), 0), ("u1", "i1", T + pd.Timedelta(minutes=2), 1),
            ("u1", "i3", T + pd.Timedelta(minutes=2), 0), ("u1", "i1", T + pd.Timedelta(days=1), 0), ("u2", "i1", T, 0)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "label"])
    return frame.iloc[[5, 4, 0, 1, 2, 3]].reset_index(drop=True)  # not in time order (events of one moment: in log order)


def test_user_stats_are_cumulative_per_moment_and_stamped_one_microsecond_after_it():
    stats = user_stats(_events(), StatsConfig(recent_window=2))
    u1 = stats[stats.user_id == "u1"].reset_index(drop=True)
    # one row per (user, moment): the two events at T+2min are one row holding both
    assert list(u1.event_timestamp) == [T + US, T + pd.Timedelta(minutes=1) + US, T + pd.Timedelta(minutes=2) + US, T + pd.Timedelta(days=1) + US]
    assert list(u1.user_n_events) == [1, 2, 4, 5]
    assert list(u1.user_n_clicks) == [1, 1, 2, 2]
    assert list(u1.user_ctr) == pytest.approx([1.0, 0.5, 0.5, 0.4])
    # the last 2 impressions (within a moment in the log's order: the click, then the no click)
    assert list(u1.user_recent_ctr) == pytest.approx([1.0, 0.5, 0.5, 0.0])
    assert u1.user_last_event_s.iloc[-1] == (T + pd.Timedelta(days=1) - pd.Timestamp("1970-01-01", tz="UTC")).total_seconds()
    u2 = stats[stats.user_id == "u2"]
    assert len(u2) == 1 and u2.user_n_events.iloc[0] == 1 and u2.user_ctr.iloc[0] == 0.0


def test_recent_label_bits_hold_each_users_last_labels_newest_in_bit_0():
    labels = np.array([1, 0, 1, 1, 0, 1])
    users = np.array(["a", "a", "a", "a", "b", "b"], dtype=object)
    bits = recent_label_bits(labels, users, window=3)
    assert bits.tolist() == [0b1, 0b10, 0b101, 0b1011 & 0b111, 0b0, 0b01]  # b's bits never see a's labels
    # user_recent_ctr is popcount(bits) / min(n_events, window)
    assert [bin(b).count("1") for b in bits] == [1, 1, 2, 2, 0, 1]
    with pytest.raises(ValueError, match="recent_window 63 does not fit the 62 label bits"):
        recent_label_bits(labels, users, window=63)
    assert recent_label_bits(np.array([], dtype=np.int64), np.array([], dtype=object), 5).tolist() == []


def test_item_stats_count_whole_periods_and_smooth_the_ctr_towards_the_global_rate_before_the_period_end():
    config = StatsConfig(ctr_prior_strength=2.0, item_stats_period="1D")
    stats = item_stats(_events(), config).set_index(["item_id", "event_timestamp"])
    day1, day2 = pd.Timestamp("2025-01-02", tz="UTC"), pd.Timestamp("2025-01-03", tz="UTC")
    # i1 on day 1: 3 impressions (u1 twice, u2), 2 clicks; the global rate of day 1: 2 clicks of 5 impressions
    row = stats.loc[("i1", day1)]
    assert (row.item_n_impressions, row.item_n_clicks) == (3, 2)
    assert row.item_ctr == pytest.approx((2 + 2.0 * 2 / 5) / (3 + 2.0))
    # a day later the counters include day 1's: cumulative, stamped at the end of the period that adds to them
    row = stats.loc[("i1", day2)]
    assert (row.item_n_impressions, row.item_n_clicks) == (4, 2)
    assert row.item_ctr == pytest.approx((2 + 2.0 * 2 / 6) / (4 + 2.0))
    assert ("i2", day2) not in stats.index  # no event of i2 on day 2: no new row (the day-1 row stays valid)
    assert stats.loc[("i3", day1)].item_n_clicks == 0
