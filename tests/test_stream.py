"""The real-time behaviour stream (feature_store/stream.py): events pushed through Feast's push API make the online
features of a request equal the offline training set's, on SQLite and on a real Redis, with no materialize between
requests; a malformed or out-of-order batch is refused whole; `lum features push` and `POST /events`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from feature_store.online import FeatureClient, materialize
from feature_store.repo import FeatureRepo
from feature_store.stream import StreamInputError, push_events
from feature_store.training_set import TrainingSetConfig, build_training_set
from pipelines.cli import main
from pipelines.data.sources.simulator import preset, simulate_to_run
from pipelines.data.split import SplitConfig, split_run
from pipelines.paths import RunPaths
from pipelines.steps.features import context_columns, prepare_repo
from ranker.config import LightGBMConfig
from ranker.train import RankerConfig, train_ranker
from tests.conftest import redis_copy_of_run

pytestmark = pytest.mark.e2e  # a simulated run's Feast repo materialized and a ranker trained per module, Redis, `lum features push`

T0 = pd.Timestamp("2025-01-20", tz="UTC")  # the online store is materialized up to here; the stream takes over
STREAMED = ("user_n_events", "user_n_clicks", "user_ctr", "user_recent_ctr", "user_hours_since_last")
ITEM_SIDE = ("item_n_impressions", "item_n_clicks", "item_ctr")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny simulated run whose online store holds everything before T0, and a LightGBM din ranker trained offline."""
    paths = RunPaths(tmp_path_factory.mktemp("stream") / "run")
    simulate_to_run(preset("tiny"), paths, progress=False)
    split_run(paths, SplitConfig("global"))
    repo, _, _ = prepare_repo(paths)
    materialize(repo, end=T0)
    events = pq.read_table(paths.events).to_pandas()
    events["ts"] = pd.to_datetime(events["ts"], utc=True)
    context = context_columns(paths.events)
    before = events[events["ts"] < T0].sample(4000, random_state=0).sort_values("ts").reset_index(drop=True)
    train = build_training_set(repo, before, TrainingSetConfig("ranker_pooled", context_columns=context))
    config = RankerConfig(model="lightgbm", variant="din", lightgbm=LightGBMConfig(n_estimators=60, threads=1))
    ranker = train_ranker(train, config)
    return {"paths": paths, "repo": repo, "events": events, "context": context, "ranker": ranker}


def _replay(repo: FeatureRepo, run: dict, requests: int = 12) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """Push the day after T0 event by event in time order; before each sampled request, read its online features.
    Returns (online frame, offline training-set rows) per sampled request."""
    events = run["events"]
    day = events[(events["ts"] >= T0) & (events["ts"] < T0 + pd.Timedelta(days=1))].sort_values("ts", kind="stable").reset_index(drop=True)
    keys = day[["user_id", "ts"]].drop_duplicates()
    sampled = keys.iloc[np.linspace(len(keys) // 4, len(keys) - 1, requests).astype(int)]
    client = FeatureClient(repo)
    pushed = 0
    out = []
    streamed_users = 0  # sampled requests whose user had events between T0 and the request: only the stream brings them
    for user, at in sampled.itertuples(index=False):
        upto = int((day["ts"] < at).sum())  # every event strictly before the request (day is sorted by time)
        if upto > pushed:
            push_events(repo, day.iloc[pushed:upto])
            pushed = upto
        streamed_users += int(((day["user_id"] == user) & (day["ts"] < at)).any())
        rows = day[(day["user_id"] == user) & (day["ts"] == at)]
        context = {c: rows[c].iloc[0] for c in run["context"]}
        online = client.get_ranking_features(user, None, rows["item_id"].astype(str).tolist(), request_time=at).to_frame(context)
        offline = build_training_set(run["repo"], rows.reset_index(drop=True), TrainingSetConfig("ranker_pooled", context_columns=tuple(run["context"])))
        out.append((online, offline.to_pandas()))
    assert pushed > 100 and streamed_users >= 3, (pushed, streamed_users)
    return out


def _assert_equal_to_offline(pairs, ranker) -> None:
    for online, offline in pairs:
        for column in STREAMED + ITEM_SIDE:
            np.testing.assert_allclose(online[column].to_numpy(float), offline[column].to_numpy(float), rtol=0, atol=1e-5, err_msg=column)
        for column in ("hist_item_ids", "hist_categories"):
            assert [list(v) for v in online[column]] == [list(v) for v in offline[column]], column
        np.testing.assert_allclose(np.concatenate([np.asarray(v, float) for v in online["hist_ts"]]),
                                   np.concatenate([np.asarray(v, float) for v in offline["hist_ts"]]), rtol=0, atol=1e-6)
        np.testing.assert_allclose(ranker.score(online), ranker.score(offline), rtol=0, atol=1e-5)


def test_pushed_events_make_online_inputs_and_scores_equal_the_training_sets(run):
    pairs = _replay(run["repo"], run)
    assert any(o["user_n_events"].iloc[0] > 0 for o, _ in pairs)
    _assert_equal_to_offline(pairs, run["ranker"])


def test_the_stream_on_a_real_redis_gives_the_training_sets_values(run, redis_url, tmp_path):
    _, repo = redis_copy_of_run(run["paths"].root, tmp_path / "redis-run", redis_url)
    materialize(repo, end=T0)
    pairs = _replay(repo, {**run, "repo": repo})
    _assert_equal_to_offline(pairs, run["ranker"])


def _online_counters(repo: FeatureRepo, user: str) -> dict:
    got = repo.store().get_online_features(features=["user_stats:user_n_events", "user_recent_items:hist_item_ids"],
                                           entity_rows=[{"user_id": user}]).to_dict()
    return {"n": got["user_n_events"][0], "hist": got["hist_item_ids"][0]}


@pytest.fixture()
def fresh_repo(run, tmp_path):
    """A copy of the run whose online store holds everything before T0 (tests below change it)."""
    paths = RunPaths(tmp_path / "copy")
    shutil.copytree(run["paths"].root, paths.root)
    repo = FeatureRepo(paths.feature_repo)
    prepare_repo(paths)
    materialize(repo, end=T0, full=True)
    return paths, repo


@pytest.mark.parametrize("change, message", [
    ({"label": 2}, r"row 1: field 'label' is 2, expected 0 or 1"),
    ({"item_id": None}, r"row 1: field 'item_id' is empty"),
    ({"ts": "yesterday"}, r"field 'ts' must be a timestamp"),
])
def test_a_malformed_event_is_refused_and_nothing_of_its_batch_is_applied(run, fresh_repo, change, message):
    _, repo = fresh_repo
    user = run["events"][run["events"]["ts"] < T0]["user_id"].iloc[0]
    before = _online_counters(repo, user)
    good = {"user_id": user, "item_id": "i1", "ts": (T0 + pd.Timedelta(hours=1)).isoformat(), "label": 1}
    batch = pd.DataFrame([good, {**good, **change}])
    with pytest.raises(StreamInputError, match=message):
        push_events(repo, batch)
    assert _online_counters(repo, user) == before
    with pytest.raises(StreamInputError, match=r"missing field\(s\) label"):
        push_events(repo, batch.drop(columns=["label"]))


def test_an_event_older_than_the_users_newest_is_refused(run, fresh_repo):
    _, repo = fresh_repo
    user = run["events"][run["events"]["ts"] < T0]["user_id"].iloc[0]
    newer = {"user_id": user, "item_id": "i1", "ts": T0 + pd.Timedelta(hours=2), "label": 1}
    push_events(repo, pd.DataFrame([newer]))
    after = _online_counters(repo, user)
    with pytest.raises(StreamInputError, match="older than the newest event the store holds"):
        push_events(repo, pd.DataFrame([{**newer, "ts": T0 + pd.Timedelta(hours=1)}]))
    assert _online_counters(repo, user) == after and after["hist"][-1] == "i1"


def test_lum_features_push_reads_a_file_or_stdin_and_names_a_bad_field(run, fresh_repo, tmp_path):
    paths, repo = fresh_repo
    user = run["events"][run["events"]["ts"] < T0]["user_id"].iloc[0]
    n = _online_counters(repo, user)["n"]
    events = pd.DataFrame([{"user_id": user, "item_id": "i2", "ts": T0 + pd.Timedelta(hours=3), "label": 0},
                           {"user_id": user, "item_id": "i3", "ts": T0 + pd.Timedelta(hours=3, minutes=1), "label": 1}])
    events.to_csv(tmp_path / "new.csv", index=False)
    result = CliRunner().invoke(main, ["features", "push", str(tmp_path / "new.csv"), "--run", str(paths.root)])
    assert result.exit_code == 0, result.output
    assert "pushed 2 events of 1 users" in result.output
    assert _online_counters(repo, user)["n"] == n + 2
    line = json.dumps({"user_id": user, "item_id": "i4", "ts": (T0 + pd.Timedelta(hours=4)).isoformat(), "label": "yes"})
    bad = CliRunner().invoke(main, ["features", "push", "-", "--run", str(paths.root)], input=line + "\n")
    assert bad.exit_code != 0 and "stdin: row 0: field 'label' is 'yes', expected 0 or 1" in bad.output
    assert _online_counters(repo, user)["n"] == n + 2
