"""Next-item metrics and baselines, with exact expectations on hand-made data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lum.evaluate import (
    EvalConfig,
    _metrics,
    _rank_in_lists,
    baseline_ranks,
    evaluate_next_item,
    format_evaluation,
    leave_last_out,
    query_conditions,
)
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


def test_max_users_samples_targets_and_zero_or_none_means_every_user():
    # `lum evaluate --max-users 0` is documented as "all users" (docs/lm.md)
    test = pd.DataFrame({"user_id": [f"u{i}" for i in range(6)], "item_id": "a", "label": 1, "mode": "m",
                         "ts": [T0 + pd.Timedelta(minutes=i) for i in range(6)]})
    tokenizer = fit_tokenizer(test, TokenizerConfig(("mode",), min_item_count=1, min_condition_count=1))
    assert len(leave_last_out(tokenizer, test, test, EvalConfig(max_users=4))) == 4
    assert len(leave_last_out(tokenizer, test, test, EvalConfig(max_users=0))) == 6
    assert len(leave_last_out(tokenizer, test, test, EvalConfig(max_users=None))) == 6
    with pytest.raises(ValueError):
        EvalConfig(max_users=-1)


def test_the_query_never_holds_a_condition_known_only_after_the_target():
    """MovieLens' feedback level is derived from the rating being predicted: the default query takes its most
    frequent value in the history instead of the target's, keeps request-time columns, and a fixed query overrides."""
    history = pd.DataFrame({"user_id": ["u1"] * 5, "item_id": list("abcde"), "label": 1, "ts": [T0 + pd.Timedelta(minutes=i) for i in range(5)],
                            "surface": ["home", "home", "search", "home", "search"], "feedback": ["liked", "liked", "liked", "disliked", "loved"]})
    tokenizer = fit_tokenizer(history, TokenizerConfig(("surface", "feedback"), min_item_count=1, min_condition_count=1))
    targets = pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["a", "b"], "label": 1, "ts": [T0 + pd.Timedelta(hours=1)] * 2,
                            "surface": ["search", "home"], "feedback": ["loved", "disliked"]})
    name = np.vectorize(lambda i: tokenizer.vocab[i])
    own, _ = query_conditions(tokenizer, targets, history, "target", ("feedback",))
    assert name(own).tolist() == ["C:surface=search|feedback=loved", "C:surface=home|feedback=disliked"]
    default, facts = query_conditions(tokenizer, targets, history, "request", ("feedback",))
    assert name(default).tolist() == ["C:surface=search|feedback=liked", "C:surface=home|feedback=liked"]
    assert facts["fixed_values"] == {"feedback": "liked"}
    fixed, _ = query_conditions(tokenizer, targets, history, "feedback=disliked", ("feedback",))
    # search + disliked was never seen: the tokenizer backs off to the coarser token, as for any rare condition
    assert name(fixed).tolist() == ["C:surface=search", "C:surface=home|feedback=disliked"]
    with pytest.raises(ValueError, match="evaluate.query 'colour=red'"):
        query_conditions(tokenizer, targets, history, "colour=red", ("feedback",))


def test_evaluation_of_a_trained_model_reports_every_method_and_condition(tiny_lm, tiny_sim):
    from pipelines.data.split import SplitConfig, split_events

    folder, manifest = tiny_lm
    events, _ = tiny_sim
    tables, _ = split_events(events, SplitConfig("per-user"))
    history = pd.concat([tables["pretrain"].to_pandas(), tables["train"].to_pandas()], ignore_index=True)
    tokenizer = BehaviourTokenizer.load(folder, expected_fingerprint=manifest["tokenizer_fingerprint"])
    from lum.config import SasRecConfig

    config = EvalConfig(max_users=100, sasrec=True, sasrec_model=SasRecConfig(epochs=4))  # a few epochs: this test is about the report's shape
    result = evaluate_next_item(load_model(folder).model, tokenizer, history, tables["test"].to_pandas(), config)
    assert result["users"] == 100
    assert set(result["overall"]) == {"model", "popularity", "recent", "sasrec"}
    assert set(result["overall"]["model"]) == {"hr@10", "ndcg@10", "recall@50"}
    assert all(m["recall@50"] >= m["hr@10"] for m in result["overall"].values())
    assert result["sasrec"]["best_epoch"] >= 1 and result["item_tokenization"] == "id"
    assert sum(v["users"] for v in result["per_condition"].values()) == 100
    assert all(0 <= m["hr@10"] <= 1 for m in result["overall"].values())
    assert "HR@10 per condition" in format_evaluation(result)
    with pytest.raises(ValueError, match="test window holds no behaviours"):
        evaluate_next_item(load_model(folder).model, tokenizer, history, tables["test"].to_pandas().iloc[:0], EvalConfig())


def test_the_sasrec_baseline_learns_a_sequence_and_stops_on_its_own_validation_split():
    from lum.sasrec import SasRecConfig, train_sasrec

    # every user walks the 30 items in order from a random start: the next item is always the successor
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{(start + t) % 30}", T0 + pd.Timedelta(minutes=t)) for u, start in enumerate(rng.integers(0, 30, 200)) for t in range(12)]
    behaviours = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"])
    trained = train_sasrec(behaviours, SasRecConfig(epochs=60, patience=2, max_len=10, batch_size=16, lr=5e-3))
    assert trained.validation_ndcg10 > 0.8  # the validation targets are each training user's last behaviour
    histories = [[f"i{(s + t) % 30}" for t in range(5)] for s in range(30)]
    top = trained.top_items(histories, 1)[:, 0]
    assert np.mean(top == np.array([f"i{(s + 5) % 30}" for s in range(30)], dtype=object)) > 0.9
    with pytest.raises(ValueError, match="at least two items"):
        train_sasrec(behaviours.assign(item_id="i0"))
