"""The Feast feature store: point-in-time training sets, ingestion checks, versions, online lookups (SQLite,
Redis, HTTP through `feast serve`), incremental freshness and the TTL.

One Feast repo is built once for the module (a tiny simulated run, a tiny LM, torch-engine embeddings at two
snapshot times plus rolling embeddings) and shared by the tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store.online import FeatureClient, materialize
from feature_store.repo import FeatureRepo, FeatureStoreError
from feature_store.serve import FeatureServer
from feature_store.training_set import TrainingSetConfig, _list_array, build_training_set, training_set_metadata
from lum.embed_job import AsOf, EmbeddingJob, EmbedJobConfig
from pipelines.data.contract import read_events
from pipelines.data.sources.simulator import preset, simulate_to_run
from pipelines.data.split import SplitConfig, split_run
from pipelines.paths import RunPaths
from pipelines.steps.features import build_window_training_set, context_columns, prepare_repo
from tests.conftest import redis_copy_of_run

pytestmark = pytest.mark.e2e  # a tiny LM, Feast repos, Redis and `feast serve`

T1 = pd.Timestamp("2025-01-15", tz="UTC")
T2 = pd.Timestamp("2025-01-22", tz="UTC")
CONDITIONS = "surface=home,surface=search"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _embed(model_dir: Path, events: Path, as_of: AsOf, out: Path, engine) -> Path:
    job = EmbeddingJob(model_dir, events, as_of, out, EmbedJobConfig(conditions=CONDITIONS, engine="torch", shards=2))
    job.open_engine(engine)
    job.run(progress=False)
    return out


@pytest.fixture(scope="module")
def torch_engine(tiny_lm):
    from lum.embed import TorchEngine

    return TorchEngine(str(tiny_lm[0]))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_lm, torch_engine):
    """A tiny simulated run with its Feast repo: offline tables, snapshot T1 materialized, then T2 incrementally."""
    paths = RunPaths(tmp_path_factory.mktemp("features") / "run")
    simulate_to_run(preset("tiny"), paths, progress=False)
    split_run(paths, SplitConfig("per-user"))
    split_run(paths, SplitConfig("global"))
    model_dir = tiny_lm[0]
    snap1 = _embed(model_dir, paths.events, AsOf(times=(T1,)), paths.embeddings("snap1"), torch_engine)
    snap2 = _embed(model_dir, paths.events, AsOf(times=(T2,)), paths.embeddings("snap2"), torch_engine)
    rolling = _embed(model_dir, paths.events, AsOf(rows_path=str(paths.split_file("per-user", "test"))), paths.embeddings("rolling"), torch_engine)

    repo = FeatureRepo(paths.feature_repo)
    repo.init(lum_ttl_days=5)
    first = repo.ingest(snap1, item_valid_from="2025-01-01")
    repo, views, _ = prepare_repo(paths)
    materialize(repo)
    client = FeatureClient(repo)
    user = pq.read_table(paths.events, columns=["user_id"]).column("user_id")[0].as_py()
    after_t1 = client.get_ranking_features(user, None, ["i1"], request_time=T1 + pd.Timedelta(days=1), counters="newest")
    repo.ingest(snap2)
    repo.ingest(rolling)
    prepare_repo(paths)
    state = materialize(repo)
    return {"paths": paths, "repo": repo, "version": first["version"], "views": views, "after_t1": after_t1, "user": user,
            "state": state, "snap1": snap1, "snap2": snap2, "rolling": rolling, "model_dir": model_dir}


def _vectors(embed_dir: Path) -> pd.DataFrame:
    frame = pd.concat([pq.read_table(p).to_pandas() for p in sorted((embed_dir / "users").glob("*.parquet"))], ignore_index=True)
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
    return frame


# ---------------------------------------------------------------------- offline: training sets
def test_repo_registers_the_views_and_the_plain_feast_cli_reads_it(run):
    assert {"lum_user_interest", "lum_item", "user_stats", "item_stats", "user_recent_items", "item_info"} <= set(run["views"])
    feast = Path(sys.executable).with_name("feast")
    listed = subprocess.run([str(feast), "feature-services", "list"], cwd=run["repo"].root, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    for service in ("ranker_base", "ranker_pooled", "ranker_lum", "ranker_lum_pooled"):
        assert service in listed.stdout


def test_training_set_keeps_every_row_in_input_order(run):
    paths = run["paths"]
    test_rows = read_events(paths.split_file("global", "test"))[0].to_pandas()
    rng = np.random.default_rng(0)
    impressions = test_rows.iloc[rng.permutation(len(test_rows))[:1500]].reset_index(drop=True)
    extra = impressions.iloc[:3].copy()
    extra["user_id"] = ["nobody", impressions.user_id[0], impressions.user_id[1]]
    extra["item_id"] = [impressions.item_id[0], "no-such-item", impressions.item_id[1]]
    extra.loc[extra.index[2], "ts"] = pd.Timestamp("2024-06-01", tz="UTC")  # before any data at all
    impressions = pd.concat([impressions, extra, impressions.iloc[:5]], ignore_index=True)  # duplicates too
    table = build_training_set(run["repo"], impressions, TrainingSetConfig("ranker_lum_pooled", context_columns=("surface", "device")))
    out = table.to_pandas()
    assert len(out) == len(impressions)
    assert (out.user_id.to_numpy() == impressions.user_id.astype(str).to_numpy()).all()
    assert (out.item_id.to_numpy() == impressions.item_id.astype(str).to_numpy()).all()
    assert (out.ts == impressions.ts).all()
    n = len(impressions) - 5
    unknown_user, unknown_item, too_early = out.iloc[n - 3], out.iloc[n - 2], out.iloc[n - 1]
    assert unknown_user.missing_user_stats == 1 and unknown_user.missing_lum == 1 and list(unknown_user.hist_item_ids) == []
    assert unknown_item.missing_item_stats == 1 and unknown_item.missing_lum == 1 and unknown_item.lum_item is None
    assert too_early.missing_user_stats == 1 and too_early.missing_item_stats == 1
    meta = training_set_metadata(table)
    assert meta["lum_conditions"] == {"surface_home": "surface=home", "surface_search": "surface=search"}
    assert meta["context_columns"] == ["surface", "device"] and meta["model_version"] == run["version"]


def test_list_columns_keep_values_and_tell_missing_from_empty():
    column = pd.Series([np.array([0.5, -1.25], dtype=np.float32), None, [3.0], float("nan"), np.array([], dtype=np.float32)])
    vectors = _list_array(column, pa.float32())
    assert vectors.type == pa.list_(pa.float32())
    assert vectors.to_pylist() == [[0.5, -1.25], None, [3.0], None, []]
    history = pd.Series([np.array(["i1", "i2"], dtype=object), None, ["i3"], float("nan")])
    assert _list_array(history, pa.string(), empty_when_missing=True).to_pylist() == [["i1", "i2"], [], ["i3"], []]
    assert _list_array(pd.Series([], dtype=object), pa.float32()).to_pylist() == []


def test_counters_and_history_use_only_events_strictly_before_the_row(run):
    paths = run["paths"]
    events = read_events(paths.events)[0].to_pandas()
    rows = events.sample(400, random_state=1).reset_index(drop=True)
    out = build_training_set(run["repo"], rows, TrainingSetConfig("ranker_pooled")).to_pandas()
    for row, got in zip(rows.itertuples(), out.itertuples()):
        before = events[(events.user_id == row.user_id) & (events.ts < row.ts)]
        if len(before) == 0:
            assert got.missing_user_stats == 1
            continue
        assert got.user_n_events == len(before) and got.user_n_clicks == before.label.sum()
        clicks = before[before.label == 1].sort_values("ts", kind="stable")
        assert list(got.hist_item_ids) == list(clicks.item_id.astype(str).iloc[-20:])
        # each history item's time is its click's, strictly before the row (the din variants age behaviours by it)
        expected_s = ((clicks.ts - pd.Timestamp("1970-01-01", tz="UTC")).dt.total_seconds()).iloc[-20:].tolist()
        np.testing.assert_allclose(list(got.hist_ts), expected_s, rtol=0, atol=1e-6)
        assert all(t < row.ts.timestamp() for t in got.hist_ts)
        assert got.user_hours_since_last == pytest.approx((row.ts - before.ts.max()).total_seconds() / 3600, abs=1e-6)
        day = row.ts.floor("1D")
        item_before = events[(events.item_id == row.item_id) & (events.ts < day)]
        if len(item_before):
            assert got.item_n_impressions == len(item_before) and got.item_n_clicks == item_before.label.sum()
        else:
            assert got.missing_item_stats == 1


def test_embeddings_join_point_in_time_and_respect_the_ttl(run):
    """Every joined vector is the newest ingested one with as-of <= the row's time and within the 5-day TTL."""
    paths = run["paths"]
    events = read_events(paths.events)[0].to_pandas()
    users = events.user_id.drop_duplicates().iloc[:30]
    times = [T1 - pd.Timedelta(hours=1), T1, T1 + pd.Timedelta(days=2), T2 + pd.Timedelta(hours=3), T2 + pd.Timedelta(days=6)]
    rows = pd.DataFrame([(u, "i1", t) for u in users for t in times], columns=["user_id", "item_id", "ts"])
    out = build_training_set(run["repo"], rows, TrainingSetConfig("ranker_lum")).to_pandas()
    ingested = pd.concat([_vectors(run[name]) for name in ("snap1", "snap2", "rolling")])
    home = ingested[ingested.condition == "surface=home"]
    outcomes = {"joined": 0, "none": 0, "expired": 0}
    for row in out.itertuples():
        mine = home[(home.user_id == row.user_id) & (home.event_timestamp <= row.ts)].sort_values("event_timestamp")
        got = row.lum_user__surface_home
        if len(mine) == 0 or mine.event_timestamp.iloc[-1] < row.ts - pd.Timedelta(days=5):
            assert got is None and row.missing_lum == 1
            outcomes["expired" if len(mine) else "none"] += 1
            continue
        np.testing.assert_array_equal(np.asarray(got), np.asarray(mine.embedding.iloc[-1]))
        outcomes["joined"] += 1
    assert min(outcomes.values()) >= 5, outcomes  # every case occurred


def test_rolling_embeddings_join_exactly_on_the_row_time(run):
    paths = run["paths"]
    build = build_window_training_set(paths, "per-user", "test", "ranker_lum", progress=False)
    out = pq.read_table(build).to_pandas()
    rolling = _vectors(run["rolling"])
    search = rolling[rolling.condition == "surface=search"].set_index(["user_id", "event_timestamp"])["embedding"]
    found = out[out.lum_user__surface_search.notna()]
    assert len(found) > 0.5 * len(out)
    for row in found.sample(200, random_state=0).itertuples():
        # the snapshot at T1/T2 may be newer than nothing, but a rolling vector stamped at the row's own time wins
        if (row.user_id, row.ts) in search.index:
            np.testing.assert_array_equal(np.asarray(row.lum_user__surface_search), np.asarray(search[(row.user_id, row.ts)]))


def test_request_columns_only_become_context_features(run):
    columns = context_columns(run["paths"].events)
    assert set(columns) == {"surface", "device", "daypart", "hour"}  # truth and ids are never features


# ---------------------------------------------------------------------- ingestion: checks and versions
def test_ingest_refuses_a_dimension_that_disagrees_with_the_manifest(run, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(run["snap1"], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["embedding_dim"] += 1
    manifest["settings"]["as_of"] = "changed"  # another job as far as ingestion knows
    (bad / "manifest.json").write_text(json.dumps(manifest))
    before = run["repo"].ingested_file.read_text()
    with pytest.raises(FeatureStoreError, match="dimension"):
        run["repo"].ingest(bad)
    assert run["repo"].ingested_file.read_text() == before


def test_ingest_refuses_nan_and_writes_nothing(run, tmp_path):
    bad = tmp_path / "nan"
    shutil.copytree(run["snap1"], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["settings"]["as_of"] = "2025-01-10T00:00:00+00:00"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    shard = sorted((bad / "users").glob("*.parquet"))[0]
    frame = pq.read_table(shard).to_pandas()
    frame.at[0, "embedding"] = np.full(len(frame.embedding[0]), np.nan, np.float32)
    frame["event_timestamp"] = pd.Timestamp("2025-01-10", tz="UTC")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pandas(frame, schema=pq.read_schema(shard), preserve_index=False), shard)
    files_before = sorted(p.name for p in (run["repo"].data / "lum_user" / run["version"]).iterdir())
    with pytest.raises(FeatureStoreError, match="NaN"):
        run["repo"].ingest(bad)
    assert sorted(p.name for p in (run["repo"].data / "lum_user" / run["version"]).iterdir()) == files_before


def test_ingesting_the_same_job_twice_is_a_no_op(run):
    assert run["repo"].ingest(run["snap1"])["skipped"] is True


def test_selecting_an_unknown_version_says_what_to_run(run):
    with pytest.raises(FeatureStoreError, match="lum features ingest"):
        run["repo"].select_version("lum-does-not-exist")


def test_unknown_feature_service_and_missing_timestamps_are_clear_errors(run):
    rows = pd.DataFrame({"user_id": ["u1"], "item_id": ["i1"], "ts": [T2]})
    with pytest.raises(FeatureStoreError, match="does not exist"):
        build_training_set(run["repo"], rows, TrainingSetConfig("ranker_nope"))
    with pytest.raises(FeatureStoreError, match="ts"):
        build_training_set(run["repo"], rows.drop(columns="ts"), TrainingSetConfig("ranker_base"))


def test_missing_registry_names_the_command(tmp_path):
    repo = FeatureRepo(tmp_path / "empty")
    with pytest.raises(FeatureStoreError, match="lum features apply"):
        repo.store()
    with pytest.raises(FeatureStoreError, match="lum features apply"):
        repo.settings()


# ---------------------------------------------------------------------- online
def test_online_store_answers_with_the_newest_embedding_after_incremental_materialization(run):
    assert run["state"]["modes"]["lum_user_interest"] == "incremental"
    assert run["state"]["modes"]["user_stats"] == "up to date"
    client = FeatureClient(run["repo"])
    first = _vectors(run["snap1"])
    later = pd.concat([_vectors(run["snap2"]), _vectors(run["rolling"])])  # everything ingested after the first materialization
    for frame, answer_at in ((first, run["after_t1"]), (later, None)):
        mine = frame[(frame.user_id == run["user"]) & (frame.condition == "surface=home")].sort_values("event_timestamp")
        newest = mine.iloc[-1]
        if frame is later:
            answer_at = client.get_ranking_features(run["user"], None, ["i1"], request_time=newest.event_timestamp, counters="newest")
        np.testing.assert_allclose(answer_at.user_vectors[0], np.asarray(newest.embedding), rtol=1e-6)
        assert answer_at.user_vector_as_of[0] == newest.event_timestamp.floor("s")
    assert run["after_t1"].user_vector_as_of[0] == T1


def test_online_lookup_of_unknown_user_and_items_gives_flags_not_exceptions(run):
    client = FeatureClient(run["repo"])
    answer = client.get_ranking_features("nobody", ["surface=home"], ["i1", "no-such-item", "i2"])
    assert not answer.user_found and not answer.user_vector_found.any()
    assert np.isnan(answer.user_counters["user_n_events"])
    assert answer.item_found.tolist() == [True, False, True]
    assert answer.item_vector_found.tolist() == [True, False, True]
    assert answer.item_vectors.shape == (3, client.dim) and not answer.item_vectors[1].any()
    frame = answer.to_frame({"surface": "home"})
    assert len(frame) == 3 and frame.missing_lum.tolist() == [1, 1, 1] and frame.missing_item_stats.tolist() == [0, 1, 0]


def test_online_ttl_is_enforced_and_future_vectors_are_never_served(run):
    client = FeatureClient(run["repo"])
    far = pd.Timestamp("2030-01-01", tz="UTC")
    as_of = client.get_ranking_features(run["user"], ["surface=home"], [], request_time=far, counters="newest").user_vector_as_of[0]
    fresh = client.get_ranking_features(run["user"], ["surface=home"], [], request_time=as_of + pd.Timedelta(days=1), counters="newest")
    stale = client.get_ranking_features(run["user"], ["surface=home"], [], request_time=as_of + pd.Timedelta(days=6), counters="newest")
    early = client.get_ranking_features(run["user"], ["surface=home"], [], request_time=as_of - pd.Timedelta(seconds=1), counters="newest")
    assert fresh.user_vector_found[0] and not fresh.user_vector_stale[0]
    assert not stale.user_vector_found[0] and stale.user_vector_stale[0]
    assert not early.user_vector_found[0] and not early.user_vector_stale[0]


def test_online_counters_for_a_past_request_are_refused_not_served_from_its_future(run):
    client = FeatureClient(run["repo"])
    end = pd.Timestamp(run["state"]["end"])
    newest = client.get_ranking_features(run["user"], None, ["i1"])  # no request time: the newest values
    assert newest.user_found
    with pytest.raises(FeatureStoreError, match=r"user_stats for user .* is as of .* after the request time .* counters from its future"):
        client.get_ranking_features(run["user"], None, ["i1"], request_time=T1)
    with pytest.raises(FeatureStoreError, match=r"item_stats for item i1 is as of"):
        client.get_ranking_features("nobody", [], ["i1"], request_time=T1)
    at_end = client.get_ranking_features(run["user"], None, ["i1"], request_time=end)  # after every counter: served
    assert at_end.user_counters == newest.user_counters
    knowingly = client.get_ranking_features(run["user"], None, ["i1"], request_time=T1, counters="newest")
    assert knowingly.user_counters == newest.user_counters


def test_online_matches_offline_for_the_same_moment(run):
    client = FeatureClient(run["repo"])
    at = pd.Timestamp(run["state"]["end"])
    answer = client.get_ranking_features(run["user"], None, ["i1", "i2"], request_time=at)
    rows = pd.DataFrame({"user_id": run["user"], "item_id": ["i1", "i2"], "ts": at})
    offline = build_training_set(run["repo"], rows, TrainingSetConfig("ranker_lum_pooled")).to_pandas()
    online = answer.to_frame()
    for column in ("user_n_events", "user_ctr", "item_n_impressions", "item_ctr"):
        np.testing.assert_allclose(online[column].to_numpy(float), offline[column].to_numpy(float), rtol=1e-9)
    assert list(online.hist_item_ids[0]) == list(offline.hist_item_ids[0])
    assert list(online.hist_ts[0]) == list(offline.hist_ts[0]) and len(online.hist_ts[0]) == len(online.hist_item_ids[0])
    np.testing.assert_allclose(np.asarray(online.lum_user__surface_home[0]), np.asarray(offline.lum_user__surface_home[0]), rtol=1e-6)


def test_redis_online_store_gives_the_same_answer_as_sqlite(run, redis_url, tmp_path):
    # a second repo over the same offline data, with the real Redis server as its online store
    _, repo = redis_copy_of_run(run["paths"].root, tmp_path / "redis-run", redis_url)
    state = materialize(repo)
    assert state["online_store"]["kind"] == "redis" and set(state["modes"].values()) == {"full"}
    items = ["i1", "i2", "no-such-item"]
    from_redis = FeatureClient(repo).get_ranking_features(run["user"], None, items)
    from_sqlite = FeatureClient(run["repo"]).get_ranking_features(run["user"], None, items)
    np.testing.assert_array_equal(from_redis.user_vectors, from_sqlite.user_vectors)
    np.testing.assert_array_equal(from_redis.item_vectors, from_sqlite.item_vectors)
    assert from_redis.item_found.tolist() == from_sqlite.item_found.tolist() == [True, True, False]
    assert from_redis.hist_item_ids == from_sqlite.hist_item_ids and from_redis.hist_ts == from_sqlite.hist_ts


def test_http_route_through_feast_serve_matches_the_python_client(run):
    with FeatureServer(run["repo"]) as server:
        via_http = FeatureClient(run["repo"], http_url=server.url).get_ranking_features(run["user"], None, ["i1", "no-such-item"])
        port = server.port
    via_python = FeatureClient(run["repo"]).get_ranking_features(run["user"], None, ["i1", "no-such-item"])
    via_sdk = FeatureClient(run["repo"], sdk=True).get_ranking_features(run["user"], None, ["i1", "no-such-item"])
    np.testing.assert_array_equal(via_sdk.user_vectors, via_python.user_vectors)
    np.testing.assert_array_equal(via_sdk.item_vectors, via_python.item_vectors)
    assert via_sdk.user_vector_as_of == via_python.user_vector_as_of and via_sdk.hist_item_ids == via_python.hist_item_ids
    assert via_sdk.hist_ts == via_python.hist_ts
    assert via_sdk.item_found.tolist() == via_python.item_found.tolist()
    np.testing.assert_allclose(via_http.user_vectors, via_python.user_vectors, rtol=1e-6)
    np.testing.assert_allclose(via_http.item_vectors, via_python.item_vectors, rtol=1e-6)
    assert via_http.item_found.tolist() == [True, False]
    assert via_http.user_counters["user_n_events"] == via_python.user_counters["user_n_events"]
    import socket

    with socket.socket() as sock:  # the server is gone
        assert sock.connect_ex(("127.0.0.1", port)) != 0


class _ResettingProxy:
    """A TCP proxy in front of a real `feast serve` that resets its first `resets` connections (as a worker restart
    does) and forwards the rest."""

    def __init__(self, target_port: int, resets: int):
        import socket
        import threading

        self.target_port, self.resets = target_port, resets
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import struct
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.resets > 0:
                self.resets -= 1
                client.recv(65536)  # the request arrives, then the connection is reset: no answer
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (a, b):
                try:
                    sock.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def test_the_http_client_retries_a_connection_that_feast_serve_resets(run):
    """Issue 21: a worker restart of `feast serve` resets a connection; the client asks again instead of failing."""
    from feature_store.online import _HttpTransport

    with FeatureServer(run["repo"]) as server:
        proxy = _ResettingProxy(server.port, resets=2)
        try:
            answer = FeatureClient(run["repo"], http_url=f"http://127.0.0.1:{proxy.port}").get_ranking_features(run["user"], None, ["i1"])
            assert proxy.resets == 0 and answer.item_found.tolist() == [True]
            proxy.resets = 1
            no_retry = _HttpTransport(f"http://127.0.0.1:{proxy.port}", retries=0)
            with pytest.raises(Exception, match="(?i)connection"):  # the control: without retries the reset is an error
                no_retry.read(["user_stats:user_n_events"], {"user_id": [run["user"]]})
        finally:
            proxy.close()
    expected = FeatureClient(run["repo"]).get_ranking_features(run["user"], None, ["i1"])
    np.testing.assert_allclose(answer.user_vectors, expected.user_vectors, rtol=1e-6)


def test_cli_get_prints_the_request_and_apply_errors_without_data(run, tmp_path):
    from click.testing import CliRunner

    from pipelines.cli import main

    result = CliRunner().invoke(main, ["features", "get", "--run", str(run["paths"].root), "--user", run["user"], "--items", "i1,zzz"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert [i["found"] for i in payload["items"]] == [True, False]
    assert payload["conditions"][0]["condition"] == "surface=home" and payload["conditions"][0]["found"]
    result = CliRunner().invoke(main, ["features", "apply", "--run", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "lum data make" in result.output


def test_two_model_versions_coexist_and_the_selected_one_is_served(run, tmp_path):
    """A second version (here: snap1's vectors relabelled) lives beside the first; selection decides what is joined."""
    import pyarrow as pa

    paths = RunPaths(tmp_path / "versions")
    shutil.copytree(run["paths"].root, paths.root)
    repo = FeatureRepo(paths.feature_repo)
    other = tmp_path / "other-version"
    shutil.copytree(run["snap1"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["settings"]["model_version"] = "lum-other"
    (other / "manifest.json").write_text(json.dumps(manifest))
    for path in [*sorted((other / "users").glob("*.parquet")), other / "items.parquet"]:
        table = pq.read_table(path)
        doubled = pa.array([list(np.asarray(v) * 2) for v in table.column("embedding").to_pylist()], pa.list_(pa.float32()))
        table = table.set_column(table.schema.get_field_index("embedding"), "embedding", doubled)
        table = table.set_column(table.schema.get_field_index("model_version"), "model_version", pa.array(["lum-other"] * table.num_rows))
        pq.write_table(table, path)
    assert repo.ingest(other, item_valid_from="2025-01-01", select=False)["version"] == "lum-other"
    assert set(repo.ingested()) == {run["version"], "lum-other"}
    rows = pd.DataFrame({"user_id": [run["user"]], "item_id": ["i1"], "ts": [T1 + pd.Timedelta(hours=1)]})
    before = build_training_set(repo, rows, TrainingSetConfig("ranker_lum"))
    repo.select_version("lum-other")
    prepare_repo(paths)
    after = build_training_set(repo, rows, TrainingSetConfig("ranker_lum"))
    assert training_set_metadata(after)["model_version"] == "lum-other"
    first, second = before.column("lum_user__surface_home")[0].as_py(), after.column("lum_user__surface_home")[0].as_py()
    np.testing.assert_allclose(np.asarray(second), 2 * np.asarray(first), rtol=1e-6)


def test_an_interrupted_ingest_leaves_nothing_feast_reads_and_a_rerun_completes(run, tmp_path, monkeypatch):
    """Shards are staged outside the version's source folder and moved in with one rename: a Ctrl-C (or kill)
    mid-copy leaves the served data as it was; ingesting again finishes the job."""
    import dask.dataframe as dd

    import feature_store.repo as repo_module

    paths = RunPaths(tmp_path / "interrupted")
    shutil.copytree(run["paths"].root, paths.root)
    repo = FeatureRepo(paths.feature_repo)
    job = tmp_path / "snap3"
    shutil.copytree(run["snap1"], job)
    t3 = pd.Timestamp("2025-01-27", tz="UTC")
    manifest = json.loads((job / "manifest.json").read_text())
    manifest["settings"]["as_of"] = t3.isoformat()
    (job / "manifest.json").write_text(json.dumps(manifest))
    for path in sorted((job / "users").glob("*.parquet")):
        table = pq.read_table(path)
        stamps = pa.array([t3] * table.num_rows).cast(table.schema.field("event_timestamp").type)
        pq.write_table(table.set_column(table.schema.get_field_index("event_timestamp"), "event_timestamp", stamps), path)
    assert len(manifest["shards"]) >= 2
    source = repo.data / "lum_user" / run["version"]

    def served_rows() -> int:  # what Feast's file store reads: Dask over every file under the folder
        return len(dd.read_parquet(str(source)).compute())

    before, ingested_before = served_rows(), repo.ingested_file.read_text()
    copies = {"n": 0}
    real_copy = repo_module.copy_file_atomic

    def interrupted_copy(src, dst):
        copies["n"] += 1
        if copies["n"] == 2:
            raise KeyboardInterrupt
        real_copy(src, dst)

    monkeypatch.setattr(repo_module, "copy_file_atomic", interrupted_copy)
    with pytest.raises(KeyboardInterrupt):
        repo.ingest(job)
    assert served_rows() == before and repo.ingested_file.read_text() == ingested_before
    monkeypatch.setattr(repo_module, "copy_file_atomic", real_copy)
    result = repo.ingest(job)
    assert not result["skipped"] and served_rows() == before + result["rows"]
    assert not any((repo.data / "staging").iterdir())


def test_item_cache_serves_repeated_candidates_and_follows_a_new_materialization(run, tmp_path):
    """Cached candidates are not read again; after a version switch and materialization a long-lived client
    serves the new item vectors (the cache is dropped when the materialization record changes)."""
    paths = RunPaths(tmp_path / "cache")
    shutil.copytree(run["paths"].root, paths.root)
    repo = FeatureRepo(paths.feature_repo)
    client = FeatureClient(repo)
    uncached = FeatureClient(repo, item_cache=False)
    asked: list[list[str]] = []
    read = client.transport.read
    client.transport.read = lambda features, entities: asked.append(list(entities.get("item_id", []))) or read(features, entities)
    items = ["i1", "no-such-item", "i2", "i1"]
    first = client.get_ranking_features(run["user"], None, items)
    second = client.get_ranking_features(run["user"], None, ["i2", "i3", "i1"])
    assert set(asked[0]) == {"i1", "no-such-item", "i2"} and set(asked[1]) == {"i3"}  # only the new candidate is read
    reference = uncached.get_ranking_features(run["user"], None, ["i2", "i3", "i1"])
    for got, want in ((first, uncached.get_ranking_features(run["user"], None, items)), (second, reference)):
        np.testing.assert_array_equal(got.item_vectors, want.item_vectors)
        assert got.item_found.tolist() == want.item_found.tolist() and got.item_category == want.item_category
        for name in got.item_counters:
            np.testing.assert_array_equal(got.item_counters[name], want.item_counters[name])
    assert first.item_vector_found.tolist() == [True, False, True, True]

    # a second version (doubled vectors) selected and materialized: the same client now serves it
    other = tmp_path / "other-version"
    shutil.copytree(run["snap1"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["settings"]["model_version"] = "lum-cache-test"
    (other / "manifest.json").write_text(json.dumps(manifest))
    import pyarrow as pa

    for path in [*sorted((other / "users").glob("*.parquet")), other / "items.parquet"]:
        table = pq.read_table(path)
        doubled = pa.array([list(np.asarray(v) * 2) for v in table.column("embedding").to_pylist()], pa.list_(pa.float32()))
        table = table.set_column(table.schema.get_field_index("embedding"), "embedding", doubled)
        table = table.set_column(table.schema.get_field_index("model_version"), "model_version", pa.array(["lum-cache-test"] * table.num_rows))
        pq.write_table(table, path)
    repo.ingest(other, item_valid_from="2025-01-01", select=False)
    repo.select_version("lum-cache-test")
    prepare_repo(paths)
    materialize(repo, full=True)
    after = client.get_ranking_features(run["user"], None, ["i1"])
    assert client.model_version == "lum-cache-test" and set(asked[-1]) == {"i1"}  # read again, not served from the old cache
    np.testing.assert_allclose(after.item_vectors[0], 2 * first.item_vectors[0], rtol=1e-6)


def test_applying_a_copied_repo_leaves_the_original_online_store_intact(run, tmp_path):
    """Feast's registry names each SQLite online table by absolute path; a copied repo's `feast apply` used to
    drop the original's tables. The copy must forget those records and keep to its own online store."""
    def answer(repo: FeatureRepo):
        return FeatureClient(repo, item_cache=False).get_ranking_features(run["user"], None, ["i1"])

    before = answer(run["repo"])
    assert before.user_found and before.item_found.all()
    copy = RunPaths(tmp_path / "copy")
    shutil.copytree(run["paths"].root, copy.root)
    prepare_repo(copy)  # runs `feast apply` in the copy
    after = answer(run["repo"])
    assert after.user_found and after.item_found.all()
    np.testing.assert_array_equal(after.item_vectors, before.item_vectors)
    copied = answer(FeatureRepo(copy.feature_repo))  # the copy keeps its own (copied) online tables
    np.testing.assert_array_equal(copied.item_vectors, before.item_vectors)
