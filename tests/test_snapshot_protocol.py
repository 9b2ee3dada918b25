"""The deployable protocol beside the rolling one: daily snapshots, their point-in-time join, freshness, two protocols
on one split in one run (issue 20, item 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from contracts.names import lum_user_column
from lum.embed_job import read_user_embeddings
from pipelines.cli import main
from pipelines.run.config import ConfigError, parse_run_config

RUN = {
    "data": {"source": "simulator", "preset": "tiny"},
    # the deployable protocol first: it owns the main feature repo and fills the online store
    "protocols": [{"split": "global", "features": "snapshot", "engine": "torch"}, {"split": "global", "features": "rolling"}],
    "lm": {"pretrain": {"preset": "tiny", "epochs": 2, "rows_per_batch": 4, "threads": 1}},
    "embed": {"job": {"engine": "torch"}},
    "rankers": {"models": ["lightgbm"], "variants": ["base", "lum"], "lightgbm": {"threads": 1}, "features": {"request_features": True}},
    "report": {"n_bootstrap": 10},
    "retrieval": {"enabled": False},  # tested once, on a copy of the shared tiny run (tests/test_pipeline.py)
}


@pytest.fixture(scope="module")
def two_protocols(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("snapshot")
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(root / "run"), **RUN}))
    result = CliRunner().invoke(main, ["run", "--config", str(config)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return root / "run"


def test_two_feature_modes_of_one_split_keep_their_own_repo_rankers_and_scores(two_protocols):
    run = two_protocols
    steps = json.loads((run / "run_state.json").read_text())["steps"]
    for name in ("global+snapshot: embed", "global+snapshot: lightgbm lum", "global+rolling: embed", "global+rolling: lightgbm lum"):
        assert steps[name]["status"] == "done", name
    assert steps["global+rolling: pretrain"].get("reused") or steps["global+rolling: pretrain"]["status"] == "done"
    assert len(list((run / "models").iterdir())) == 1  # one LM for the split
    for repo in ("feature_repo", "feature_repo@rolling"):
        assert (run / repo / "feature_store.yaml").exists()
    assert (run / "rankers" / "global-lightgbm-lum" / "ranker.json").exists()
    assert (run / "rankers" / "global@rolling-lightgbm-lum" / "ranker.json").exists()
    snapshot = pq.read_table(run / "scores" / "global.parquet").to_pandas()
    rolling = pq.read_table(run / "scores" / "global@rolling.parquet").to_pandas()
    assert len(snapshot) == len(rolling) and {"score__lightgbm__base", "score__lightgbm__lum"} <= set(snapshot.columns)
    # the base variant does not read LUM features: the same scores under both protocols
    np.testing.assert_allclose(snapshot["score__lightgbm__base"], rolling["score__lightgbm__base"], atol=1e-6)
    assert not np.allclose(snapshot["score__lightgbm__lum"], rolling["score__lightgbm__lum"])


def test_snapshots_are_daily_and_each_row_joins_the_newest_one_before_it(two_protocols):
    run = two_protocols
    embeddings = read_user_embeddings(run / "embeddings" / "global-tiny-snapshot").to_pandas()
    stamps = pd.to_datetime(embeddings["event_timestamp"], utc=True)
    assert (stamps == stamps.dt.floor("1D")).all()  # every as-of time is a day boundary: the daily batch job
    scores = pq.read_table(run / "scores" / "global.parquet").to_pandas()
    lag = pd.to_datetime(scores["ts"], utc=True) - pd.to_datetime(scores["lum_as_of"], utc=True)
    present = lag.notna()
    assert present.mean() > 0.7  # the others: users without an engaged event before that day's snapshot
    assert (lag[present] >= pd.Timedelta(0)).all() and (lag[present] < pd.Timedelta(days=1)).all()
    rolling = pq.read_table(run / "scores" / "global@rolling.parquet").to_pandas()
    rolling_lag = pd.to_datetime(rolling["ts"], utc=True) - pd.to_datetime(rolling["lum_as_of"], utc=True)
    assert (rolling_lag[rolling_lag.notna()] == pd.Timedelta(0)).all()  # one vector per request, at the request's time
    assert rolling_lag.notna().mean() >= present.mean()  # a rolling vector also sees the events of the request's own day

    # the training set's vector of a row is the embedding of (user, condition) at the newest as-of at or before it
    test = pq.read_table(run / "training_sets" / "global-test-ranker_lum_pooled.parquet").to_pandas()
    condition = sorted(embeddings["condition"].unique())[0]
    table = embeddings[embeddings["condition"] == condition].assign(event_timestamp=stamps)
    for row in test.sample(25, random_state=0).itertuples():
        before = table[(table.user_id == row.user_id) & (table.event_timestamp <= row.ts)]
        got = getattr(row, lum_user_column(condition))
        if before.empty:
            assert got is None
        else:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(before.sort_values("event_timestamp").embedding.iloc[-1]))


def test_a_snapshot_never_moves_when_events_at_or_after_its_as_of_time_change(two_protocols, tmp_path):
    """No leakage: the embedding of an as-of time only reads events strictly before it."""
    from lum.embed_job import AsOf, EmbeddingJob, EmbedJobConfig

    run = two_protocols
    events = pq.read_table(run / "data" / "events.parquet").to_pandas()
    as_of = pd.Timestamp(events["ts"].quantile(0.7)).ceil("1D")
    changed = events.copy()
    later = changed["ts"] >= as_of
    changed.loc[later, "item_id"] = changed.loc[later, "item_id"].sample(frac=1.0, random_state=1).to_numpy()
    changed.loc[later, "label"] = 1 - changed.loc[later, "label"]
    outputs = []
    for name, frame in (("original", events), ("changed", changed)):
        path = tmp_path / f"{name}.parquet"
        frame.to_parquet(path)
        job = EmbeddingJob(run / "models" / "global-tiny", path, AsOf(times=(as_of,)), tmp_path / name,
                           EmbedJobConfig(engine="torch", shards=1, conditions="all"))
        job.run(progress=False)
        outputs.append(read_user_embeddings(tmp_path / name).to_pandas())
    original, after = outputs
    assert len(original) > 0 and original[["user_id", "condition"]].equals(after[["user_id", "condition"]])
    np.testing.assert_array_equal(np.stack(original.embedding), np.stack(after.embedding))


def test_the_report_puts_the_deployable_and_the_upper_bound_side_by_side_with_the_freshness_lag(two_protocols):
    run = two_protocols
    report = json.loads((run / "report" / "report.json").read_text())
    names = [p["name"] for p in report["protocols"]]
    assert names == ["global+snapshot", "global+rolling"]
    snapshot, rolling = report["protocols"]
    assert 0 < snapshot["freshness"]["hours"]["p50"] < 24 and snapshot["freshness"]["hours"]["max"] < 24
    assert rolling["freshness"]["hours"]["max"] == 0
    assert sum(b["share"] for b in snapshot["freshness"]["buckets"]) == pytest.approx(1.0)
    text = (run / "report" / "report.md").read_text()
    assert "Protocols side by side" in text and "deployable" in text and text.count("Freshness of the LUM features") == 2


def test_the_online_store_serves_the_deployable_protocols_last_snapshot(two_protocols):
    from feature_store.online import FeatureClient

    run = two_protocols
    embeddings = read_user_embeddings(run / "embeddings" / "global-tiny-snapshot").to_pandas()
    last = pd.to_datetime(embeddings["event_timestamp"], utc=True).max()
    events = pq.read_table(run / "data" / "events.parquet", columns=["ts"]).to_pandas()
    assert last > events["ts"].max()  # the snapshot after the last event: what a service reads next
    user = embeddings.user_id.iloc[0]
    answer = FeatureClient(run / "feature_repo").get_ranking_features(user, None, [])
    assert answer.user_vector_found.all() and set(answer.user_vector_as_of) == {last}


def test_protocols_may_share_a_split_only_with_other_features_and_the_same_fractions():
    with pytest.raises(ConfigError, match="same features"):
        parse_run_config({"protocols": [{"split": "global"}, {"split": "global"}]})
    with pytest.raises(ConfigError, match="same fractions"):
        parse_run_config({"protocols": [{"split": "global", "features": "snapshot"},
                                        {"split": "global", "features": "rolling", "fractions": [0.5, 0.3, 0.2]}]})
    config = parse_run_config({"protocols": [{"split": "global", "features": "snapshot"}, {"split": "global", "features": "rolling"}]})
    assert [config.protocol_key(p) for p in config.protocols] == ["global", "global@rolling"]


def test_a_run_folder_refuses_to_mix_another_embedding_folder_of_the_same_version_into_a_repo(two_protocols):
    """Re-using a run folder with the feature modes swapped would ingest rolling vectors beside the snapshots."""
    from feature_store.repo import FeatureStoreError
    from pipelines.run.execute import refuse_other_embeddings

    run = two_protocols
    refuse_other_embeddings(run / "feature_repo", run / "embeddings" / "global-tiny-snapshot")  # its own folder: fine
    with pytest.raises(FeatureStoreError, match="global-tiny-snapshot.*another config"):
        refuse_other_embeddings(run / "feature_repo", run / "embeddings" / "global-tiny-rolling")


def test_lum_demo_rolling_runs_what_configs_demo_side_by_side_yaml_says():
    from pipelines.cli.run import demo_config
    from pipelines.run.config import config_dict, load_run_config

    configs = Path(__file__).parents[1] / "configs"
    side = load_run_config(configs / "demo-side-by-side.yaml")
    assert config_dict(demo_config("runs/demo-side-by-side", rolling=True)) == config_dict(side)
    # the same run as the demo's plus the rolling protocol: its snapshot protocol gives the demo's numbers
    demo = load_run_config(configs / "demo.yaml")
    assert config_dict(side.protocols[0]) == config_dict(demo.protocols[0]) and len(side.protocols) == 2
    assert config_dict(side.lm) == config_dict(demo.lm)
    # the same rankers, and two more variants (lum, lum+pooled) beside the demo's
    side_rankers, demo_rankers = config_dict(side.rankers), config_dict(demo.rankers)
    assert set(demo_rankers.pop("variants")) < set(side_rankers.pop("variants")) and side_rankers == demo_rankers
    # configs/demo-contexts.yaml is the demo with snapshots under every request context: nothing else differs
    contexts = config_dict(load_run_config(configs / "demo-contexts.yaml"))
    plain = config_dict(demo)
    asked = contexts["embed"].pop("conditions")
    assert len(asked) == 32 and all(c.count("|") == 2 for c in asked) and plain["embed"].pop("conditions") != asked
    assert {k: v for k, v in contexts.items() if k != "run_dir"} == {k: v for k, v in plain.items() if k != "run_dir"}


def test_an_embedding_folder_made_with_another_engine_is_not_reused(two_protocols):
    from dataclasses import replace

    from contracts.embeddings import read_embedding_manifest
    from lum.config import EmbedJobConfig
    from pipelines.run.execute import refuse_other_job_settings

    folder = two_protocols / "embeddings" / "global-tiny-snapshot"
    made = read_embedding_manifest(folder)
    refuse_other_job_settings(folder, made, EmbedJobConfig(engine="torch"))  # what made it: fine
    with pytest.raises(FileExistsError, match="engine: 'torch' there, 'vllm' in the config"):
        refuse_other_job_settings(folder, made, EmbedJobConfig(engine="vllm"))
    with pytest.raises(FileExistsError, match="shards: 8 there, 3 in the config"):
        refuse_other_job_settings(folder, made, replace(EmbedJobConfig(engine="torch"), shards=3))


def test_the_scored_test_window_holds_the_configured_rankers_only(two_protocols):
    """A ranker folder left by an earlier config of the run folder never reaches the report."""
    from pipelines.paths import RunPaths
    from pipelines.steps.rankers import score_test_window

    paths = RunPaths(two_protocols)
    only = pq.read_table(score_test_window(paths, "global", progress=False, rankers=[("lightgbm", "base")])).column_names
    assert [c for c in only if c.startswith("score__")] == ["score__lightgbm__base"]
    restored = pq.read_table(score_test_window(paths, "global", progress=False, rankers=[("lightgbm", "base"), ("lightgbm", "lum")]))
    assert {"score__lightgbm__base", "score__lightgbm__lum"} <= set(restored.column_names)
