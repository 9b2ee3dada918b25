"""The ranking service (pipelines/serve.py, `lum serve`): for test-window requests, the online model inputs and
scores equal those of the offline point-in-time training set, with SQLite and with Redis, in process and over HTTP;
past requests whose counters are newer are refused; a FeatureClient shared by threads stays correct.

Uses the shared `tiny_run` (tests/conftest.py) and puts its online store back as it found it.
"""

from __future__ import annotations

import json
import re
import shutil
import threading

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from click.testing import CliRunner

from feature_store.online import FeatureClient, materialize
from feature_store.repo import FeatureRepo, OnlineStoreConfig
from pipelines.cli import main
from pipelines.serve import BackgroundServer, RankingError, RankingService, ServeError, default_protocol_key, ranker_folder
from ranker.export import flat_inputs, model_spec

MODELS = ("lightgbm", "dlrm")
ROLLING = True  # the tiny run's features are rolling (conftest TINY_RUN): served knowingly, as a replay would be
TOLERANCE = 1e-5


def _context(row: pd.Series, columns: list[str]) -> dict:
    return {c: (row[c].item() if hasattr(row[c], "item") else row[c]) for c in columns}


@pytest.fixture(scope="module")
def sample(tiny_run):
    """Four test-window requests (user, time, context, candidates) spread over the window, and their training-set rows."""
    run, _, _ = tiny_run
    table = pq.read_table(run / "training_sets" / "global-test-ranker_lum_pooled.parquet")
    frame = table.select(["user_id", "item_id", "ts", "surface", "device", "daypart", "hour", "missing_user_stats", "missing_lum"]).to_pandas()
    frame["row"] = np.arange(len(frame))
    groups = frame.groupby(["user_id", "ts"], sort=True)
    assert (groups[["surface", "device", "daypart", "hour"]].nunique() == 1).all().all()  # one context per request
    warm = [key for key, rows in groups if rows.missing_user_stats.eq(0).all() and rows.missing_lum.eq(0).all()]
    keys = sorted((warm[int(q * (len(warm) - 1))] for q in (0.1, 0.4, 0.7, 0.95)), key=lambda k: k[1])
    return table, [groups.get_group(k) for k in keys]


def _request(rows: pd.DataFrame, columns: list[str], **extra) -> dict:
    first = rows.iloc[0]
    return {"user_id": first.user_id, "context": _context(first, columns), "item_ids": rows.item_id.tolist(),
            "request_time": first.ts.isoformat(), **extra}


def _assert_same_inputs(online, offline) -> None:
    if isinstance(offline, np.ndarray):
        assert online.shape == offline.shape
        assert np.array_equal(np.isnan(online), np.isnan(offline))
        assert np.nanmax(np.abs(online - offline)) <= TOLERANCE
        return
    for a, b in zip(flat_inputs(online), flat_inputs(offline)):
        assert a.shape == b.shape
        assert (a.double() - b.double()).abs().max().item() <= TOLERANCE


def _assert_parity(service: RankingService, table: pa.Table, rows: pd.DataFrame, url: str | None = None) -> dict:
    """The request through the service (in process, or over HTTP at `url`) against the training set's rows."""
    offline_rows = table.take(pa.array(rows.row.to_numpy()))
    offline_inputs = service.ranker.featurize(offline_rows)
    offline_scores = service.ranker.score(offline_inputs)
    body = _request(rows, service.context_columns, return_inputs=True)
    if url is None:
        ranked = service.rank(body)
        _assert_same_inputs(ranked.inputs, offline_inputs)
        answer = ranked.body
    else:
        reply = requests.post(f"{url}/rank", json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        answer = reply.json()
    sent = answer["inputs"]  # the inputs as JSON, in the spec's order
    if isinstance(offline_inputs, np.ndarray):
        assert np.nanmax(np.abs(np.array(sent["features"], dtype=np.float64) - offline_inputs)) <= TOLERANCE
        assert np.array_equal(np.isnan(np.array(sent["features"], dtype=np.float64)), np.isnan(offline_inputs))
    else:
        dense, values, lengths = flat_inputs(offline_inputs)
        assert np.abs(np.array(sent["dense"]) - dense.numpy()).max() <= TOLERANCE
        assert sent["values"] == values.tolist() and sent["lengths"] == lengths.tolist()
    assert answer["item_ids"] == rows.item_id.tolist()
    assert np.abs(np.array(answer["scores"]) - offline_scores).max() <= TOLERANCE
    assert answer["request_time"] == pd.Timestamp(rows.ts.iloc[0]).isoformat()
    return answer


def _parity_over_time(repo: FeatureRepo, run, table: pa.Table, sample_rows: list[pd.DataFrame]) -> list[dict]:
    """For each request time t (ascending): the online store as of t (rows stamped <= t, as the point-in-time join
    sees them), then every model's answer against the training set; one request of each model over HTTP."""
    services: dict[str, RankingService] = {}
    answers = []
    for n, rows in enumerate(sample_rows):
        materialize(repo, end=pd.Timestamp(rows.ts.iloc[0]), full=n == 0)  # then incrementally up to the next request
        services = services or {m: RankingService(ranker_folder(run, m, "lum"), repo, allow_rolling=True) for m in MODELS}  # long-lived: they follow the store
        for model, service in services.items():
            answers.append(_assert_parity(service, table, rows))
    for service in services.values():
        with BackgroundServer(service) as server:
            answers.append(_assert_parity(service, table, sample_rows[-1], url=server.url))
    return answers


def test_online_inputs_and_scores_equal_the_offline_training_set_sqlite(tiny_run, sample):
    run, _, _ = tiny_run
    repo = FeatureRepo(run / "feature_repo")
    table, rows = sample
    try:
        answers = _parity_over_time(repo, run, table, rows)
    finally:
        materialize(repo, full=True)  # the run's online store as `lum run` left it
    assert all(a["features"]["user_found"] for a in answers)
    assert all(all(c["found"] for c in a["features"]["lum"].values()) for a in answers)


@pytest.fixture(scope="module")
def redis_repo(tiny_run, tmp_path_factory):
    """A copy of the run's feature repo with a real Redis server as its online store."""
    from feature_store.repo import FeatureStoreError
    from feature_store.serve import RedisServer

    run, _, _ = tiny_run
    try:
        server = RedisServer()
    except FeatureStoreError as exc:
        pytest.skip(f"{exc} (.ci/run installs Debian's redis-server)")
    with server:
        repo = FeatureRepo(tmp_path_factory.mktemp("serve-redis") / "feature_repo")
        shutil.copytree(run / "feature_repo", repo.root)
        repo.materialized_file.unlink()
        repo.init(online=OnlineStoreConfig("redis", server.url))
        repo.apply()
        yield repo


def test_online_inputs_and_scores_equal_the_offline_training_set_redis(tiny_run, sample, redis_repo):
    run, _, _ = tiny_run
    table, rows = sample
    answers = _parity_over_time(redis_repo, run, table, rows)
    assert json.loads(redis_repo.materialized_file.read_text())["online_store"]["kind"] == "redis"
    assert all(a["features"]["user_found"] for a in answers)


@pytest.fixture(scope="module")
def service(tiny_run):
    run, _, _ = tiny_run
    return RankingService(ranker_folder(run, "lightgbm", "lum"), run / "feature_repo", allow_rolling=ROLLING)


def test_a_past_request_with_newer_counters_is_refused_with_409(service, sample):
    _, rows = sample
    body = _request(rows[0], service.context_columns)  # the store is materialized to its end: this request's counters are newer
    when = str(pd.Timestamp(rows[0].ts.iloc[0]))
    refusal = (rf"the online store's (user_stats|user_recent_items|item_stats) for (user|item) \S+ is as of .* "
               rf"after the request time {re.escape(when)}: .* from its future")
    with pytest.raises(RankingError, match=refusal) as caught:
        service.rank(body)
    assert caught.value.status == 409
    with BackgroundServer(service) as server:
        reply = requests.post(f"{server.url}/rank", json=body, timeout=30)
        assert reply.status_code == 409 and re.search(refusal, reply.json()["detail"])
        now = requests.post(f"{server.url}/rank", json={**body, "request_time": None}, timeout=30)  # the store's clock
        assert now.status_code == 200 and len(now.json()["scores"]) == len(rows[0])
        later = requests.post(f"{server.url}/rank", json={**body, "request_time": "2030-01-01T00:00:00Z"}, timeout=30)
        assert later.status_code == 200  # after the store's clock is fine (counters are as of then or older)


def test_unknown_user_and_items_are_scored_with_found_flags(service, sample):
    _, rows = sample
    body = {**_request(rows[0], service.context_columns, request_time=None), "user_id": "nobody", "item_ids": [rows[0].item_id.iloc[0], "no-such-item"]}
    answer = service.rank(body).body
    assert len(answer["scores"]) == 2 and all(0 < s < 1 for s in answer["scores"])
    found = answer["features"]
    assert found["user_found"] is False and found["items_found"] == 1 and found["item_vectors_found"] == 1
    assert not any(c["found"] for c in found["lum"].values())


def test_healthz_spec_and_bad_requests_over_http(service, sample, tiny_run):
    run, _, _ = tiny_run
    _, rows = sample
    good = _request(rows[0], service.context_columns, request_time=None)
    with BackgroundServer(service) as server:
        health = requests.get(f"{server.url}/healthz", timeout=10).json()
        assert health["status"] == "ok" and health["ranker"] == "global-lightgbm-lum" and health["online_store"] == "sqlite"
        assert health["model_version"] == service.ranker.schema.model_version
        assert health["materialized_until"] == json.loads((run / "feature_repo" / "data" / "materialized.json").read_text())["end"]
        assert requests.get(f"{server.url}/spec", timeout=10).json() == json.loads(json.dumps(model_spec(service.ranker)))
        missing = requests.post(f"{server.url}/rank", json={**good, "context": {"surface": "home"}}, timeout=10)
        assert missing.status_code == 422 and "missing context column(s) device, daypart, hour" in missing.json()["detail"]
        extra = requests.post(f"{server.url}/rank", json={**good, "context": {**good["context"], "color": "red"}}, timeout=10)
        assert extra.status_code == 422 and "unknown context column(s) color" in extra.json()["detail"]
        assert requests.post(f"{server.url}/rank", json={**good, "item_ids": []}, timeout=10).status_code == 422
        bad_time = requests.post(f"{server.url}/rank", json={**good, "request_time": "yesterday-ish"}, timeout=10)
        assert bad_time.status_code == 422 and "request_time" in bad_time.json()["detail"]
        assert requests.post(f"{server.url}/rank", json={**good, "item_ids": ["i1"] * 1001}, timeout=10).status_code == 422


def test_the_service_refuses_to_start_when_the_spec_does_not_match(service, tmp_path, tiny_run):
    run, _, _ = tiny_run
    spec = model_spec(service.ranker)
    spec["features"][0], spec["features"][1] = spec["features"][1], spec["features"][0]
    (tmp_path / "model_spec.json").write_text(json.dumps(spec))
    with pytest.raises(ServeError, match="do not match its model spec: features: .* first difference at index 0"):
        RankingService(service.ranker_dir, run / "feature_repo", spec_path=tmp_path / "model_spec.json", allow_rolling=ROLLING)


def test_one_feature_client_shared_by_eight_threads(tiny_run, sample):
    """issue 21: with a small item cache, threads evicting each other's entries raised KeyError."""
    run, _, _ = tiny_run
    table, _ = sample
    items = sorted(set(table.column("item_id").to_pylist()))
    users = sorted(set(table.column("user_id").to_pylist()))[:20]
    client = FeatureClient(run / "feature_repo", item_cache_size=5)
    reference = FeatureClient(run / "feature_repo", item_cache=False)
    errors: list[str] = []
    wrong: list[str] = []

    def work(k: int) -> None:
        try:
            for r in range(20):
                start = (k * 7 + r * 3) % (len(items) - 12)
                asked = items[start : start + 12]
                got = client.get_ranking_features(users[(k + r) % len(users)], None, asked)
                if r % 10 == 0 and not np.array_equal(got.item_vectors, reference.get_ranking_features(got.user_id, None, asked).item_vectors):
                    wrong.append(f"thread {k} request {r}")
        except Exception as exc:  # noqa: BLE001  (any failure of a thread fails the test)
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not wrong, errors[:3] + wrong[:3]


def test_lum_serve_picks_the_ranker_and_names_what_is_missing(tiny_run, monkeypatch, tmp_path):
    run, _, _ = tiny_run
    assert default_protocol_key(run) == "global"
    started = {}
    monkeypatch.setattr("pipelines.serve.serve", lambda service, host, port, access_log, max_body_bytes: started.update(service=service, host=host, port=port))
    rolling = CliRunner().invoke(main, ["serve", "--run", str(run), "--model", "dlrm", "--port", "8123"])
    assert rolling.exit_code == 2 and "serves rolling LUM features" in rolling.output and "--allow-rolling" in rolling.output and not started
    result = CliRunner().invoke(main, ["serve", "--run", str(run), "--model", "dlrm", "--port", "8123", "--allow-rolling"])
    assert result.exit_code == 0, result.output
    assert started["service"].ranker_dir.name == "global-dlrm-lum" and started["host"] == "127.0.0.1" and started["port"] == 8123
    wrong = CliRunner().invoke(main, ["serve", "--run", str(run), "--variant", "lum+pooled"])
    assert wrong.exit_code == 2 and "global-lightgbm-lum+pooled holds no trained ranker" in wrong.output and "global-lightgbm-lum" in wrong.output
    empty = tmp_path / "empty"
    (empty / "rankers" / "global-lightgbm-lum").mkdir(parents=True)
    shutil.copy(run / "run_state.json", empty / "run_state.json")
    for name in ("ranker.json", "features.json", "lightgbm.txt"):
        shutil.copy(run / "rankers" / "global-lightgbm-lum" / name, empty / "rankers" / "global-lightgbm-lum" / name)
    no_store = CliRunner().invoke(main, ["serve", "--run", str(empty)])
    assert no_store.exit_code == 2 and "the online store was never materialized" in no_store.output
    no_state = CliRunner().invoke(main, ["serve", "--run", str(tmp_path)])
    assert no_state.exit_code == 2 and "run_state.json" in no_state.output


def test_post_events_reaches_the_next_rank_without_a_materialize(tiny_run, redis_repo):
    """POST /events (the real-time stream) on a copy of the run's store: the next /rank reads the new counters and
    the new behaviour; a malformed batch is a 422 naming the field, and nothing of it is applied."""
    run, _, _ = tiny_run
    end = pd.Timestamp(materialize(redis_repo, full=True)["end"])
    service = RankingService(ranker_folder(run, "lightgbm", "lum"), redis_repo, allow_rolling=ROLLING)
    user = pq.read_table(run / "data" / "events.parquet", columns=["user_id"]).column("user_id")[0].as_py()
    later = end + pd.Timedelta(hours=1)

    def counters() -> tuple[float, list[str]]:
        answer = service.client.get_ranking_features(user, None, ["i1"], request_time=later)
        return answer.user_counters["user_n_events"], answer.hist_item_ids

    n, history = counters()
    event = {"user_id": user, "item_id": "i7", "ts": (end + pd.Timedelta(minutes=30)).isoformat(), "label": 1}
    with BackgroundServer(service) as server:
        bad = requests.post(f"{server.url}/events", json={"events": [event, {**event, "label": "clicked"}]}, timeout=30)
        assert bad.status_code == 422 and "row 1: field 'label' is 'clicked', expected 0 or 1" in bad.json()["detail"]
        assert counters() == (n, history)
        assert requests.post(f"{server.url}/events", json={"events": []}, timeout=30).status_code == 422
        done = requests.post(f"{server.url}/events", json={"events": [event]}, timeout=30)
        assert done.status_code == 200 and done.json()["events"] == 1
        body = {"user_id": user, "context": {"surface": "home", "device": "mobile", "daypart": "evening", "hour": 20},
                "item_ids": ["i7", "i1"], "request_time": later.isoformat(), "return_inputs": True}
        ranked = requests.post(f"{server.url}/rank", json=body, timeout=30)
        assert ranked.status_code == 200, ranked.text
    assert counters() == (n + 1, [*history, "i7"][-20:])
    names = service.ranker.model.feature_name()
    features = np.array(ranked.json()["inputs"]["features"], dtype=np.float64)
    assert features[0, names.index("user_n_events")] == n + 1  # /rank scored with the pushed event counted


def test_rank_refuses_unknown_fields_wrong_types_long_ids_and_large_bodies(service, sample):
    """What a hostile or careless client sends is refused before any lookup, with the field named and nothing of the
    body echoed back; /metrics counts the answers."""
    _, requests_ = sample
    good = _request(requests_[0], service.context_columns, request_time=None)
    assert isinstance(good["context"]["hour"], int) and isinstance(good["context"]["surface"], str)
    with BackgroundServer(service) as server:
        def post(body: dict) -> requests.Response:  # json.dumps writes NaN as the token NaN, as some clients do
            return requests.post(f"{server.url}/rank", data=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)

        first = post(good)
        assert first.status_code == 200, first.text
        scores = first.json()["scores"]
        misspelt = post({**good, "request_tme": good["request_time"]})
        assert misspelt.status_code == 422 and "request_tme" in misspelt.text  # not answered with the newest values
        # counted from here: importing feast.metrics sets PROMETHEUS_MULTIPROC_DIR, and prometheus_client then keeps a
        # counter's value per (process, name, labels), across apps: an earlier test's 422s show up when the label set
        # is first used here
        before = _counted(requests.get(f"{server.url}/metrics", timeout=30).text)
        for value in ("evening", 20.7, True, float("nan")):
            wrong = post({**good, "context": {**good["context"], "hour": value}})
            assert wrong.status_code == 422 and "context.hour: expected an integer" in wrong.json()["detail"], (value, wrong.text)
        wrong = post({**good, "context": {**good["context"], "surface": 5}})
        assert wrong.status_code == 422 and "context.surface: expected text" in wrong.json()["detail"]
        as_text = post({**good, "context": {**good["context"], "hour": str(good["context"]["hour"])}})
        assert as_text.status_code == 200 and as_text.json()["scores"] == scores  # "20" and 20 are the same hour
        missing = post({**good, "context": {**good["context"], "hour": None}})
        assert missing.status_code == 200  # null: the explicit missing value
        many = post({**good, "item_ids": [f"i{k}" for k in range(10_000)]})
        assert many.status_code == 422 and "item_ids" in many.text and "i9999" not in many.text and len(many.content) < 2_000
        long_id = post({**good, "user_id": "\u00e9" * 600})  # 600 characters, 1,200 UTF-8 bytes: over the import's limit
        assert long_id.status_code == 422 and "user_id" in long_id.text and "1,024 UTF-8 bytes" in long_id.text and "\u00e9" * 600 not in long_id.text
        huge = requests.post(f"{server.url}/rank", data=json.dumps({**good, "user_id": "u" * (20 << 20)}),
                             headers={"content-type": "application/json"}, timeout=60)
        assert huge.status_code == 413 and "over 1048576 bytes" in huge.text
        chunks = (part for part in (b'{"user_id": "', b"u" * (2 << 20), b'", "item_ids": ["i1"]}'))  # no Content-Length: chunked
        streamed = requests.post(f"{server.url}/rank", data=chunks, headers={"content-type": "application/json"}, timeout=60)
        assert streamed.status_code == 413
        after = _counted(requests.get(f"{server.url}/metrics", timeout=30).text)
    assert after['lum_requests_total{endpoint="/rank",status="200"}'] - before['lum_requests_total{endpoint="/rank",status="200"}'] == 2
    assert after['lum_requests_total{endpoint="/rank",status="422"}'] - before['lum_requests_total{endpoint="/rank",status="422"}'] == 7


def _counted(metrics: str) -> dict[str, float]:
    """The request counters of a /metrics answer: sample name with labels -> value."""
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line.startswith("lum_requests_total")}


def test_healthz_probes_the_store_and_answers_503_when_stale_or_empty(tiny_run, tmp_path):
    """/healthz asks the online store for keys the last materialization wrote: ok on the run's store; 503 when the
    newest LUM snapshot is older than the TTL at the store's clock (the embedding job stopped while counters went on),
    and when the store lost its rows (as a Redis restarted without its data)."""
    import sqlite3

    run, _, _ = tiny_run
    copy = tmp_path / "feature_repo"
    shutil.copytree(run / "feature_repo", copy)
    repo = FeatureRepo(copy)
    service = RankingService(ranker_folder(run, "lightgbm", "lum"), repo, allow_rolling=ROLLING)
    with BackgroundServer(service) as server:
        healthy = requests.get(f"{server.url}/healthz", timeout=30)
        assert healthy.status_code == 200 and healthy.json()["status"] == "ok" and healthy.json()["problems"] == []
        clock = pd.Timestamp(healthy.json()["materialized_until"])
        ttl = pd.Timedelta(days=float(repo.settings()["lum_ttl_days"]))
        materialize(repo, end=clock + ttl + pd.Timedelta(days=10))  # counters "go on"; no new snapshot
        stale = requests.get(f"{server.url}/healthz", timeout=30)
        assert stale.status_code == 503 and stale.json()["status"] == "unavailable"
        assert any("older than the TTL" in p for p in stale.json()["problems"]), stale.json()
        with sqlite3.connect(copy / "data" / "online.db") as db:  # every row gone, the tables still there
            for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                db.execute(f'DELETE FROM "{table}"')
        empty = requests.get(f"{server.url}/healthz", timeout=30)
        assert empty.status_code == 503 and any("has no counters for user" in p for p in empty.json()["problems"]), empty.json()
        metrics = requests.get(f"{server.url}/metrics", timeout=30).text
    assert "lum_online_store_healthy 0.0" in metrics
    old = RankingService(ranker_folder(run, "lightgbm", "lum"), run / "feature_repo", allow_rolling=ROLLING, max_clock_age=pd.Timedelta(days=1))
    assert any("nothing was materialized since" in p for p in old.health()["problems"])  # the tiny run's data lies in the past
    assert not any("nothing was materialized" in p for p in service.health()["problems"] if service.max_clock_age is None)


def test_ids_are_looked_up_in_the_spelling_the_import_stores(tiny_run, tmp_path):
    """The import stores ids in Unicode NFC; a lookup (and a pushed event) in the decomposed NFD spelling reaches the
    same user."""
    import unicodedata

    from feature_store.stream import push_events

    run, _, _ = tiny_run
    copy = tmp_path / "feature_repo"
    shutil.copytree(run / "feature_repo", copy)
    repo = FeatureRepo(copy)
    client = FeatureClient(repo)
    composed = "Jos\u00e9"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    push_events(repo, pd.DataFrame([{"user_id": composed, "item_id": "i1", "ts": client.clock.isoformat(), "label": 1}]))
    assert client.get_ranking_features(composed, [], ["i1"]).user_found
    found = client.get_ranking_features(decomposed, [], ["i1"])
    assert found.user_found and found.user_id == composed and found.user_counters["user_n_events"] == 1
    push_events(repo, pd.DataFrame([{"user_id": decomposed, "item_id": "i2", "ts": client.clock.isoformat(), "label": 0}]))
    assert client.get_ranking_features(composed, [], ["i1"]).user_counters["user_n_events"] == 2  # one user, not two
