"""Next-item metrics and baselines, with exact expectations on hand-made data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lum.evaluate import EvalConfig, _metrics, _rank_in_lists, baseline_ranks, evaluate_next_item, format_evaluation
from lum.model import load_model
from lum.tokenizer import BehaviourTokenizer, TokenizerConfig, fit_tokenizer

T0 = pd.Timestamp("2024-01-01", tz="UTC")


def test_hit_rate_and_ndcg_are_exact():
    ranks = np.array([0, 1, 9, 10, 500])
    metrics = _metrics(ranks, 10)
    assert metrics["hr@10"] == pytest.approx(3 / 5)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(11)) / 5)
    lists = np.array([["a", "b"], ["c", "d"]], dtype=object)
    assert _rank_in_lists(lists, np.array(["b", "x"])).tolist() == [1, 2]


def test_baselines_rank_popular_and_recent_items():
    rows = [("u1", "a", 0), ("u1", "b", 1), ("u2", "a", 2), ("u3", "a", 3), ("u3", "c", 4), ("u2", "c", 5)]
    history = pd.DataFrame(rows, columns=["user_id", "item_id", "minute"]).assign(
        ts=lambda f: T0 + pd.to_timedelta(f.pop("minute"), unit="min"), label=1, mode="m"
    )
    targets = pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["b", "a"], "ts": [T0 + pd.Timedelta(minutes=9)] * 2, "label": 1, "mode": "m"})
    tokenizer = fit_tokenizer(history, TokenizerConfig(("mode",), min_item_count=1, min_condition_count=1))
    ranks = baseline_ranks(tokenizer, history, pd.concat([history, targets]), targets, k=2)
    # popularity: a (3), c (2) -> b is absent (rank k=2), a is first
    assert ranks["popularity"].tolist() == [2, 0]
    # recent, most recent first: u1 -> b, a ; u2 -> c, a
    assert ranks["recent"].tolist() == [0, 1]


def test_evaluation_of_a_trained_model_reports_every_method_and_condition(tiny_lm, tiny_sim):
    from pipelines.data.split import SplitConfig, split_events

    folder, manifest = tiny_lm
    events, _ = tiny_sim
    tables, _ = split_events(events, SplitConfig("per-user"))
    history = pd.concat([tables["pretrain"].to_pandas(), tables["train"].to_pandas()], ignore_index=True)
    tokenizer = BehaviourTokenizer.load(folder, expected_fingerprint=manifest["tokenizer_fingerprint"])
    result = evaluate_next_item(load_model(folder).model, tokenizer, history, tables["test"].to_pandas(), EvalConfig(max_users=100))
    assert result["users"] == 100
    assert set(result["overall"]) == {"model", "popularity", "recent"}
    assert sum(v["users"] for v in result["per_condition"].values()) == 100
    assert all(0 <= m["hr@10"] <= 1 for m in result["overall"].values())
    assert "HR@10 per condition" in format_evaluation(result)
    with pytest.raises(ValueError, match="test window holds no behaviours"):
        evaluate_next_item(load_model(folder).model, tokenizer, history, tables["test"].to_pandas().iloc[:0], EvalConfig())
