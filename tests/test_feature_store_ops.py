"""Operating a run's feature store (issue 35): copied and moved run folders, unsafe model versions, a killed full
materialization, and lookups while a full materialization runs. Real Feast, SQLite and Redis throughout.

Every test works on its own copy of the shared `tiny_run` (tests/conftest.py); the fixture's run is never written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from feature_store.materialize import STAGING_DB, MaterializeInProgress, full_marker, materialize, swap_marker
from feature_store.online import FeatureClient
from feature_store.repo import FeatureRepo, FeatureStoreError, foreign_registry_paths
from feature_store.training_set import TrainingSetConfig, build_training_set
from pipelines.cli import main
from pipelines.paths import RunPaths

FEAST = Path(sys.executable).with_name("feast")


def _own_copy(run: Path, dest: Path) -> FeatureRepo:
    """A copy of a run folder whose Feast registry names its own files (`apply` as the code before issue 35 had it:
    it never touches another folder's online store), so the copy can stand for "the original" of a test."""
    shutil.copytree(run, dest)
    repo = FeatureRepo(RunPaths(dest).feature_repo)
    repo.apply()
    return repo


def _table_counts(repo: FeatureRepo) -> dict[str, int]:
    """Rows of every table of a repo's SQLite online store (read-only)."""
    with sqlite3.connect(f"file:{repo.data / 'online.db'}?mode=ro", uri=True) as db:
        names = [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {n: db.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}


def _requests(run: Path, n: int = 40) -> pd.DataFrame:
    """The first `n` impressions of the run's test window (the fixture's file, read only)."""
    return pq.read_table(RunPaths(run).split_file("global", "test")).slice(0, n).to_pandas()[["user_id", "item_id", "ts"]]


def _get(run: Path, user: str, items: list[str]) -> dict:
    result = CliRunner().invoke(main, ["features", "get", "--run", str(run), "--user", user, "--items", ",".join(items)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.stdout)  # the JSON answer; a warning (a copied repo re-applied) goes to stderr


# ---------------------------------------------------------------------- 1. copied and moved run folders
def test_a_copied_run_serves_and_joins_its_own_files_and_a_plain_feast_apply_in_it_leaves_the_original_intact(tiny_run, tmp_path):
    run, _, _ = tiny_run
    original = _own_copy(run, tmp_path / "A")
    tables = _table_counts(original)
    assert tables and min(tables.values()) > 0
    rows = _requests(run)
    user, items = rows["user_id"].iloc[0], list(rows["item_id"].iloc[:3])
    config = TrainingSetConfig("ranker_lum")
    reference = build_training_set(original, rows, config)
    served = _get(tmp_path / "A", user, items)
    assert served["user_found"] and all(i["found"] for i in served["items"])

    shutil.copytree(tmp_path / "A", tmp_path / "B")
    shutil.copytree(tmp_path / "A", tmp_path / "C")
    # the plain `feast apply` docs/feature-store.md suggests, in the copy B: Feast "replaced" A's online tables
    # (recorded in the copied registry with A's path) by dropping them in A's online.db
    done = subprocess.run([str(FEAST), "apply"], cwd=RunPaths(tmp_path / "B").feature_repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _table_counts(original) == tables
    assert foreign_registry_paths(RunPaths(tmp_path / "B").feature_repo) == []

    # A moves away: B (applied by the plain CLI) and C (never applied since the copy) read only their own files
    (tmp_path / "A").rename(tmp_path / "A-moved")
    for name in ("B", "C"):
        copy = FeatureRepo(RunPaths(tmp_path / name).feature_repo)
        assert _get(tmp_path / name, user, items) == served
        got = build_training_set(copy, rows, config)
        assert got.equals(reference), name
        assert foreign_registry_paths(copy.root) == []


def test_an_offline_source_that_is_gone_is_named_with_the_hint_that_the_run_folder_may_have_moved(tiny_run, tmp_path):
    run, _, _ = tiny_run
    shutil.copytree(run, tmp_path / "D")
    repo = FeatureRepo(RunPaths(tmp_path / "D").feature_repo)
    repo.store()  # the copy's registry now names its own files
    gone = repo.data / "stats" / "user_stats.parquet"
    gone.rename(tmp_path / "elsewhere.parquet")
    with pytest.raises(FeatureStoreError, match=f"^{gone}: .*feature view 'user_stats'.*may have moved"):
        build_training_set(repo, _requests(run, 5), TrainingSetConfig("ranker_base"))
    result = CliRunner().invoke(main, ["features", "materialize", "--run", str(tmp_path / "D")])
    assert result.exit_code == 1 and str(gone) in result.output and "may have moved" in result.output, result.output


# ---------------------------------------------------------------------- 2. model versions are safe names
@pytest.mark.e2e  # `lum` subprocesses, a wheel build, `feast ui` or `feast apply`: seconds each
def test_an_unsafe_model_version_in_lum_features_yaml_is_refused_naming_the_file_and_the_value(tmp_path):
    paths = RunPaths(tmp_path / "run")
    repo = FeatureRepo(paths.feature_repo)
    repo.data.mkdir(parents=True)
    settings = {"model_version": "../../etc", "conditions": ["request"], "lum_ttl_days": 30, "stats_ttl_days": 0,
                "online_store": {"kind": "sqlite", "redis_url": "localhost:6379"}, "offline_store": {"kind": "duckdb"}}
    repo.settings_file.write_text(yaml.safe_dump(settings))
    expected = f"{repo.settings_file} \\(model_version\\): model version '../../etc' is not a valid name"
    with pytest.raises(FeatureStoreError, match=expected):
        repo.settings()
    with pytest.raises(FeatureStoreError, match=expected):
        repo.init()
    result = CliRunner().invoke(main, ["features", "materialize", "--run", str(paths.root)])
    assert result.exit_code == 1 and str(repo.settings_file) in result.output and "'../../etc'" in result.output, result.output
    # the plain `feast apply` in the folder: definitions.py reads the file through the same check
    shutil.copy(Path(__file__).resolve().parents[1] / "feature_store" / "repo_template" / "definitions.py", repo.root / "definitions.py")
    (repo.root / "feature_store.yaml").write_text(yaml.safe_dump({"project": "lum", "provider": "local", "registry": "data/registry.db",
                                                                  "online_store": {"type": "sqlite", "path": "data/online.db"},
                                                                  "entity_key_serialization_version": 3}))
    done = subprocess.run([str(FEAST), "apply"], cwd=repo.root, capture_output=True, text=True)
    assert done.returncode != 0 and "'../../etc' is not a valid name" in done.stderr + done.stdout
    assert not (repo.data / "registry.db").exists()


def test_lum_embed_refuses_a_model_version_the_feature_store_would_refuse_before_any_work(tiny_lm, tmp_path):
    from lum.embed_job import AsOf, EmbeddingJob, EmbedJobConfig, EmbedJobError

    model_dir, _ = tiny_lm
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    manifest_path = model / "lum_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model_version"] = "../../etc"
    manifest_path.write_text(json.dumps(manifest))
    out = tmp_path / "embeddings"
    with pytest.raises(EmbedJobError, match=f"^{manifest_path}: model version '../../etc' is not a valid name"):
        EmbeddingJob(model, tmp_path / "events.parquet", AsOf.parse("2025-01-10"), out, EmbedJobConfig(engine="torch"))
    assert not out.exists()


# ---------------------------------------------------------------------- 3. a killed full materialization
def _writing_started(repo: FeatureRepo) -> bool:
    """A full materialization is writing the LUM user vectors: into the staging store (this code), or into the
    live table it emptied first (the code before issue 35)."""
    for path, must_be_full in ((repo.data / STAGING_DB, True), (repo.data / "online.db", False)):
        if not path.exists():
            continue
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.05) as db:
                n = db.execute('SELECT count(*) FROM "lum_lum_user_interest"').fetchone()[0]
        except sqlite3.OperationalError:  # no such table (yet), or locked
            n = None if must_be_full else 0
        if (must_be_full and n) or (not must_be_full and n == 0):
            return True
    return False


def test_a_killed_full_materialize_is_redone_by_the_next_plain_one(tiny_run, tmp_path):
    run, _, _ = tiny_run
    repo = _own_copy(run, tmp_path / "K")
    before = _table_counts(repo)
    assert before["lum_lum_user_interest"] > 0
    record = repo.materialized_file.read_text()
    job = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "features", "materialize", "--full", "--run", str(tmp_path / "K")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not _writing_started(repo):
            assert job.poll() is None, "the full materialization ended before it was caught writing"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(job.pid, signal.SIGKILL)  # what a Ctrl-\, an OOM kill or a lost machine does: no cleanup runs
    finally:
        job.kill()
        job.wait()
    assert repo.materialized_file.read_text() == record  # the killed run recorded nothing
    assert full_marker(repo).exists()  # ... except that it started

    result = CliRunner().invoke(main, ["features", "materialize", "--run", str(tmp_path / "K")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "had not finished" in result.output and "up to date" not in result.output, result.output
    assert _table_counts(repo) == before
    assert not full_marker(repo).exists() and not (repo.data / STAGING_DB).exists()
    user = _requests(run, 1)["user_id"].iloc[0]
    assert FeatureClient(repo).get_ranking_features(user, None, ["i1"]).user_vector_found.all()


# ---------------------------------------------------------------------- 4. lookups during a full materialization
def _answer(features) -> tuple:
    """What a lookup served, comparable across lookups (the vectors as bytes)."""
    return (json.dumps(features.user_counters, sort_keys=True), tuple(features.user_vector_found), features.user_vectors.tobytes(),
            tuple(features.hist_item_ids), tuple(features.item_found), features.item_vectors.tobytes(), tuple(features.item_vector_found),
            tuple(features.item_category), tuple((k, v.tobytes()) for k, v in sorted(features.item_counters.items())))


def _lookups_during(repo: FeatureRepo, requests: list[tuple[str, list[str]]], work) -> list:
    """Run `work()` while a thread repeats the requests through one long-lived client; every lookup's answer or error."""
    client = FeatureClient(repo)
    seen: list = []
    done = threading.Event()

    def ask() -> None:
        while not done.is_set():
            for user, items in requests:
                try:
                    seen.append((user, _answer(client.get_ranking_features(user, None, items))))
                except Exception as exc:  # noqa: BLE001 - every error is checked by the test
                    seen.append((user, exc))

    thread = threading.Thread(target=ask)
    thread.start()
    try:
        time.sleep(0.5)
        work()
        time.sleep(0.5)
    finally:
        done.set()
        thread.join()
    return seen


def _check_all_old_or_all_new(seen: list, old: dict, new: dict, refused_ok: bool) -> None:
    kinds = {"old": 0, "new": 0, "refused": 0}
    for user, got in seen:
        if isinstance(got, MaterializeInProgress) and refused_ok:
            kinds["refused"] += 1
            continue
        assert not isinstance(got, Exception), f"a lookup during the full materialization raised {got!r}"
        assert got in (old[user], new[user]), f"user {user}: a lookup mixed old and new values (or lacked some)"
        kinds["old" if got == old[user] else "new"] += 1
    assert kinds["old"] and kinds["new"], kinds


def _old_and_new(tmp_path: Path, repo: FeatureRepo, end: pd.Timestamp, requests) -> tuple[dict, dict]:
    """Each request's answer from the store as it is, and from a copy materialized with --full to `end`."""
    client = FeatureClient(repo)
    old = {user: _answer(client.get_ranking_features(user, None, items)) for user, items in requests}
    shutil.copytree(repo.root.parent, tmp_path / "reference")
    reference = FeatureRepo(RunPaths(tmp_path / "reference").feature_repo)
    materialize(reference, end=end, full=True)
    client = FeatureClient(reference)
    new = {user: _answer(client.get_ranking_features(user, None, items)) for user, items in requests}
    assert all(old[u] != new[u] for u, _ in requests)  # the two states differ for every request
    return old, new


def _ops_requests(run: Path) -> tuple[list[tuple[str, list[str]]], pd.Timestamp]:
    rows = pq.read_table(RunPaths(run).split_file("global", "test")).to_pandas()
    users = list(dict.fromkeys(rows["user_id"]))[:4]
    items = list(dict.fromkeys(rows["item_id"]))[:30]
    return [(u, items) for u in users], pd.Timestamp(rows["ts"].min())


def test_lookups_during_a_full_sqlite_materialize_see_all_old_or_all_new_values(tiny_run, tmp_path):
    run, _, _ = tiny_run
    repo = _own_copy(run, tmp_path / "M")
    requests, end = _ops_requests(run)
    old, new = _old_and_new(tmp_path, repo, end, requests)
    seen = _lookups_during(repo, requests, lambda: materialize(repo, end=end, full=True))
    _check_all_old_or_all_new(seen, old, new, refused_ok=False)  # SQLite: swapped in at once, nobody is refused
    assert not swap_marker(repo).exists() and not full_marker(repo).exists()


def test_lookups_during_a_full_redis_materialize_are_all_old_all_new_or_refused(tiny_run, tmp_path, redis_url):
    from tests.conftest import redis_copy_of_run

    run, _, _ = tiny_run
    _, repo = redis_copy_of_run(run, tmp_path / "R", redis_url)
    materialize(repo)
    requests, end = _ops_requests(run)
    client = FeatureClient(repo)
    old = {user: _answer(client.get_ranking_features(user, None, items)) for user, items in requests}
    seen = _lookups_during(repo, requests, lambda: materialize(repo, end=end, full=True))
    client = FeatureClient(repo)
    new = {user: _answer(client.get_ranking_features(user, None, items)) for user, items in requests}
    assert all(old[u] != new[u] for u, _ in requests)
    _check_all_old_or_all_new(seen, old, new, refused_ok=True)
    assert not swap_marker(repo).exists()


def test_the_ranking_service_answers_503_while_a_full_materialization_replaces_the_store(tiny_run, tmp_path):
    """`lum serve` maps MaterializeInProgress to 503 (retry shortly), in process and over HTTP, and serves again after."""
    import requests

    from pipelines.serve import BackgroundServer, RankingError, RankingService, ranker_folder

    run, _, _ = tiny_run
    shutil.copytree(run, tmp_path / "S")
    repo = FeatureRepo(RunPaths(tmp_path / "S").feature_repo)
    service = RankingService(ranker_folder(tmp_path / "S", "lightgbm", "lum"), repo, allow_rolling=True)
    row = pq.read_table(RunPaths(run).split_file("global", "test")).slice(0, 1).to_pylist()[0]
    body = {"user_id": row["user_id"], "context": {c: row[c] for c in service.context_columns}, "item_ids": ["i1", "i2"]}
    assert len(service.rank(body).body["scores"]) == 2
    # the marker as a full materialization on Redis keeps it while it rewrites the views
    swap_marker(repo).write_text(json.dumps({"started": "2025-02-01T00:00:00+00:00", "full": True}))
    with pytest.raises(RankingError, match="a full materialization is replacing the online store's values") as caught:
        service.rank(body)
    assert caught.value.status == 503
    with BackgroundServer(service) as server:
        reply = requests.post(f"{server.url}/rank", json=body, timeout=30)
        assert reply.status_code == 503 and "full materialization" in reply.json()["detail"]
        swap_marker(repo).unlink()
        reply = requests.post(f"{server.url}/rank", json=body, timeout=30)
        assert reply.status_code == 200 and len(reply.json()["scores"]) == 2


def test_repo_settings_are_one_typed_definition_with_their_defaults(tmp_path):
    """lum_features.yaml is read through RepoSettings: its defaults are the template's (no second copy in
    definitions.py), an unknown key or a wrong type is refused naming the file, and an old file without an
    offline_store keeps Feast's file store."""
    from feature_store.repo import FeatureStoreError, RepoSettings, read_settings

    defaults = RepoSettings().to_mapping()
    assert defaults["lum_ttl_days"] == 30 and defaults["stats_ttl_days"] == 0 and defaults["offline_store"]["kind"] == "duckdb"
    template = (Path(__file__).resolve().parents[1] / "feature_store" / "repo_template" / "definitions.py").read_text()
    assert "lum_ttl_days\", 30" not in template and 'SETTINGS["lum_ttl_days"]' in template
    path = tmp_path / "lum_features.yaml"
    path.write_text("model_version: null\nconditions: []\nlum_ttl_days: 7\n")
    read = read_settings(path)
    assert read["lum_ttl_days"] == 7 and read["offline_store"]["kind"] == "file"  # written before the setting existed
    for text, expected in (("lum_ttl_dayz: 7\n", "unknown setting(s) lum_ttl_dayz"), ("lum_ttl_days: soon\n", "lum_ttl_days must be a number"),
                           ("lum_dim: -3\n", "lum_dim must be a positive integer"), ("conditions: surface=home\n", "conditions must be a list"),
                           ("online_store: {kind: sqlite, port: 1}\n", "unexpected keyword argument 'port'")):
        path.write_text(text)
        with pytest.raises(FeatureStoreError, match=re.escape(expected)) as caught:
            read_settings(path)
        assert str(path) in str(caught.value)
