"""The simulator: deterministic, follows the contract, and has the structure its docstring promises."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines.data.contract import read_events
from pipelines.data.sources.simulator import PRESETS, SIMULATOR_CONTRACT, examination, preset, simulate, simulate_to_run
from pipelines.paths import RunPaths


def test_same_seed_same_data_other_seed_other_data(tiny_sim):
    events, items = tiny_sim
    again_events, again_items = simulate(preset("tiny"))
    assert events.equals(again_events) and items.equals(again_items)
    other, _ = simulate(preset("tiny", seed=1))
    assert not other.equals(events)


def test_output_follows_the_contract(tiny_sim):
    events, items = tiny_sim
    assert events.schema.remove_metadata() == SIMULATOR_CONTRACT.arrow_schema().remove_metadata()
    frame = events.to_pandas()
    assert frame.user_id.nunique() == PRESETS["tiny"].n_users
    assert not frame.duplicated(["user_id", "item_id", "ts"]).any()
    assert set(frame.item_id) <= set(items.column("item_id").to_pylist())
    assert ((frame.p_click > 0) & (frame.p_click <= frame.relevance) & (frame.relevance < 1)).all()
    # the truth columns are never ranker features
    assert "p_click" not in SIMULATOR_CONTRACT.ranker_feature_columns()
    assert "relevance" not in SIMULATOR_CONTRACT.history_columns()
    assert SIMULATOR_CONTRACT.condition_names == ["surface", "device", "daypart"]


def test_labels_are_draws_of_the_stored_click_probability(mid_sim):
    events, _ = mid_sim
    n = len(events)
    assert 1_000_000 > n > 100_000
    # the mean label matches the mean true probability within 4 standard errors
    se = np.sqrt(events.p_click.mul(1 - events.p_click).sum()) / n
    assert abs(events.label.mean() - events.p_click.mean()) < 4 * se
    # and p_click ranks clicks well above chance
    high = events.p_click > events.p_click.quantile(0.8)
    assert events.label[high].mean() > 3 * events.label[~high].mean()


def test_position_bias(mid_sim):
    events, _ = mid_sim
    ctr = events.groupby("position").label.mean()
    assert ctr.iloc[0] > 1.5 * ctr.iloc[5] > 1.5 * ctr.iloc[9] * 0.75
    assert np.allclose(events.p_click / events.relevance, examination(events.position.to_numpy(), preset("default").position_decay))


def _category_prediction_hits(events: pd.DataFrame, items: pd.DataFrame) -> dict[str, float]:
    """Predict the category of each click from the user's earlier clicks three ways; return the hit rates."""
    category = items.set_index("item_id").category
    clicks = events[events.label == 1].assign(cat=lambda f: category.reindex(f.item_id).to_numpy())
    hits, total = Counter(), 0
    for _, g in clicks.sort_values(["user_id", "ts"]).groupby("user_id", sort=False):
        cats, context = g.cat.to_numpy(), (g.device + "/" + g.daypart).to_numpy()
        for n in range(10, len(cats)):
            earlier = cats[:n]
            overall = Counter(earlier).most_common(1)[0][0]
            recent = Counter(earlier[-5:]).most_common(1)[0][0]
            same_context = earlier[context[:n] == context[n]]
            by_context = Counter(same_context).most_common(1)[0][0] if len(same_context) else overall
            total += 1
            hits["overall"] += overall == cats[n]
            hits["recent"] += recent == cats[n]
            hits["context"] += by_context == cats[n]
    assert total > 5000
    return {k: v / total for k, v in hits.items()}


def test_context_and_recency_carry_information_beyond_the_user_id(mid_sim):
    """The condition of a request tells which interest is active, and recent clicks beat the whole history."""
    events, items = mid_sim
    hits = _category_prediction_hits(events, items)
    assert hits["context"] > hits["overall"] * 1.15
    assert hits["recent"] > hits["overall"] * 1.08


def test_conditions_change_click_probabilities(mid_sim):
    events, _ = mid_sim
    by_surface = events.groupby("surface").relevance.mean()
    assert by_surface["cart"] > by_surface["home"] * 1.2
    assert set(by_surface.index) == {"home", "search", "item_detail", "cart"}


def test_long_tail_and_new_items(mid_sim):
    events, items = mid_sim
    counts = events.item_id.value_counts()
    top_decile_share = counts.iloc[: len(items) // 10].sum() / len(events)
    assert top_decile_share > 0.3  # the 10% most shown items take more than 30% of impressions
    release = items.set_index("item_id").release_ts
    new_items = release[release > release.min()]
    assert len(new_items) == round(len(items) * preset("default").new_item_share)
    assert (events.ts.to_numpy() >= release.reindex(events.item_id).to_numpy()).all()  # never shown before release
    assert events.item_id.isin(new_items.index).mean() > 0.01


def test_streamed_run_folder_equals_the_in_memory_simulation(tmp_path):
    config = preset("tiny", chunk_users=120)  # 3 chunks
    events, items = simulate(config)
    paths = RunPaths(tmp_path)
    info = simulate_to_run(config, paths, progress=False)
    written, contract = read_events(paths.events)
    assert contract == SIMULATOR_CONTRACT
    assert written.equals(events.replace_schema_metadata(written.schema.metadata))
    assert pq.read_table(paths.items).equals(items)
    assert json.loads(paths.dataset_info.read_text()) == info and info["n_events"] == events.num_rows
    assert pq.ParquetFile(paths.events).metadata.num_row_groups == 3
    assert sorted(p.name for p in paths.data_dir.iterdir()) == ["dataset.json", "events.parquet", "items.parquet"]


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown simulator preset 'huge'"):
        preset("huge")


def test_request_truth_gives_the_relevance_of_any_item_and_judges_candidate_sets():
    """The simulator's hidden state per request reproduces the stored relevance of every shown item exactly, and the
    retrieval A/B credits a retriever exactly for the would-click items it adds."""
    from pipelines.data.sources.simulator import simulate_with_truth
    from pipelines.steps.retrieval_ab import RetrievalABConfig, retrieval_ab

    config = preset("tiny")
    events, items, truth = simulate_with_truth(config)
    assert events.equals(simulate(config)[0])  # capturing the truth draws no random numbers
    frame = events.to_pandas()
    index = truth.index_of(frame.request_id.to_numpy())
    item_index = frame.item_id.str[1:].astype(int).to_numpy()
    np.testing.assert_allclose(truth.relevance(index, item_index[:, None])[:, 0], frame.relevance.to_numpy(), rtol=0, atol=1e-12)
    with pytest.raises(KeyError, match="request ids not simulated: r-1"):
        truth.index_of(np.array(["r-1"]))
    requests = frame.drop_duplicates("request_id").iloc[:200].reset_index(drop=True)
    req = truth.index_of(requests.request_id.to_numpy())
    best = truth.best_items(req, 10)
    relevance = truth.relevance(req, best)
    assert (np.diff(relevance, axis=1) <= 1e-12).all() and (truth.release_us[best] <= truth.ts_us[req, None]).all()
    all_items = np.arange(len(truth.latent))
    released = truth.release_us <= truth.ts_us[req[0]]
    assert truth.relevance(req[:1], all_items[None, released])[0].max() == pytest.approx(relevance[0, 0])
    slates = [item_index[frame.request_id.to_numpy() == r] for r in requests.request_id]
    table = retrieval_ab(truth, requests, slates, {"oracle": list(best), "nothing": [np.zeros(0, np.int64)] * len(requests)},
                         RetrievalABConfig(n_bootstrap=50))
    rows = table.set_index("candidates")
    assert rows.loc["logged + oracle", "recall"] == 1.0 and rows.loc["logged + oracle", "recall_lift_low"] > 0
    assert rows.loc["logged + nothing", "recall"] == rows.loc["logged", "recall"] and rows.loc["logged + nothing", "oracle_ctr@10_lift"] == 0
    assert rows.loc["logged + oracle", "oracle_ctr@10"] > rows.loc["logged", "oracle_ctr@10"]
