"""The same training rows and online values on every offline engine: Feast's file (Dask) store, its DuckDB store,
and its Ray store and Ray compute engine on a real multi-process local Ray.

One world for the module: the tiny simulator's log with its event times floored to whole seconds (the Ray store's
precision; it also makes same-second events common), point-in-time offline tables, and LUM vectors at three
snapshot times laid out as `lum embed` writes them and ingested through the real path, with a 3-day TTL. The
impressions mix log rows with the edge cases: a user and an item never seen, a row before any data, rows in the
same second as their own event, rows exactly at a snapshot time, rows whose newest snapshot has expired, and
duplicates.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from benchmarks.bench_features import fake_embedding_job
from contracts.embeddings import USERS_DIR, shard_file_name
from feature_store.online import FeatureClient, materialize
from feature_store.repo import FeatureRepo, FeatureStoreError, OfflineStoreConfig
from feature_store.training_set import TrainingSetConfig, build_training_set
from pipelines.data.sources.simulator import preset, simulate

CONDITIONS = ["surface=home", "surface=search"]
TTL_DAYS = 3
ENGINES = ["file", "duckdb", "ray"]
SERVICE = "ranker_lum_pooled"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    events, items = simulate(preset("tiny"))
    events, items = events.to_pandas(), items.to_pandas()
    events["ts"] = events["ts"].dt.floor("s")
    repo = FeatureRepo(root / "repo")
    repo.init(lum_ttl_days=TTL_DAYS)
    repo.build_stats(events, items)
    start = events.ts.min().ceil("1D")
    snapshots = [start + pd.Timedelta(days=d) for d in (3, 6, 14)]  # a gap of 8 days: rows in it see an expired snapshot
    fake_embedding_job(root / "embed", events.user_id.astype(str).unique(), items.item_id.astype(str).to_numpy(), snapshots,
                       conditions=CONDITIONS, dim=8, version="lum-engines")
    repo.ingest(root / "embed", item_valid_from=str(start))

    rng = np.random.default_rng(0)
    sample = events.iloc[rng.choice(len(events), 400, replace=False)][["user_id", "item_id", "ts", "label", "surface"]]
    same_second = events[events.duplicated(["user_id", "ts"], keep=False)].head(20)[["user_id", "item_id", "ts", "label", "surface"]]
    users = sample.user_id.iloc[:10].to_numpy()
    edges = pd.DataFrame({
        "user_id": ["nobody", users[0], users[1], *users[2:6], *users[6:10]],
        "item_id": [sample.item_id.iloc[0], "no-such-item", sample.item_id.iloc[1], *sample.item_id.iloc[2:10]],
        "ts": [snapshots[1], snapshots[1], events.ts.min() - pd.Timedelta(days=1),
               *[snapshots[0]] * 2, *[snapshots[1]] * 2,  # exactly at a snapshot time
               *[snapshots[1] + pd.Timedelta(days=TTL_DAYS, seconds=1)] * 2, *[snapshots[1] + pd.Timedelta(days=TTL_DAYS)] * 2],  # expired / just not
        "label": 0, "surface": "home",
    })
    impressions = pd.concat([sample, same_second, edges, sample.head(5)], ignore_index=True)
    assert len(same_second) >= 10, "the world should hold events sharing a second"
    return {"repo": repo, "events": events, "impressions": impressions, "snapshots": snapshots, "root": root}


def _use(repo: FeatureRepo, engine: str) -> None:
    repo.init(offline=OfflineStoreConfig(engine, ray_cpus=2 if engine == "ray" else None))
    repo.apply()


@pytest.fixture(scope="module")
def tables(world):
    """The training set through each engine, and what a full materialize through it put online for a few users.

    Feast's Ray store ignores TTLs (feature_store.training_set refuses a view with one), so Ray runs with the LUM
    TTL at 0 (forever) and is compared with the file store at 0 too; file and DuckDB run at the world's 3 days.
    """
    import ray

    repo = world["repo"]
    users = world["impressions"].user_id.iloc[:8].tolist()
    items = world["impressions"].item_id.iloc[:8].tolist()
    out = {}
    try:
        for name, engine, ttl in [("file", "file", TTL_DAYS), ("duckdb", "duckdb", TTL_DAYS), ("file@0", "file", 0), ("ray", "ray", 0)]:
            repo.init(lum_ttl_days=ttl)
            _use(repo, engine)
            table = build_training_set(repo, world["impressions"], TrainingSetConfig(SERVICE, context_columns=("surface",)))
            if engine == "ray":  # the join ran on a local Ray of several processes, started by Feast in this process
                assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2
            materialize(repo, full=True)
            client = FeatureClient(repo)
            online = [client.get_ranking_features(u, CONDITIONS, items, counters="newest") for u in users]
            out[name] = {"table": table, "online": online, "ttl_days": ttl}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        repo.init(lum_ttl_days=TTL_DAYS)
        _use(repo, "duckdb")
    return out


def _reference(engine: str) -> str:
    return "file@0" if engine == "ray" else "file"


def test_the_generated_feast_config_names_the_engine(world, tmp_path):
    repo = FeatureRepo(tmp_path / "repo")
    repo.init(offline=OfflineStoreConfig("ray", ray_address="10.0.0.5:6379"))
    text = (repo.root / "feature_store.yaml").read_text()
    assert "type: ray\n" in text and "ray_address: 10.0.0.5:6379" in text and "type: ray.engine" in text
    repo.init(offline=OfflineStoreConfig("duckdb"))
    text = (repo.root / "feature_store.yaml").read_text()
    assert "type: duckdb" in text and "batch_engine" not in text
    with pytest.raises(FeatureStoreError, match="ray_address"):
        OfflineStoreConfig("file", ray_address="10.0.0.5:6379")
    with pytest.raises(FeatureStoreError, match="one of file, duckdb, ray"):
        OfflineStoreConfig("spark")
    # in a run config too, when it loads: a ray setting beside another engine is refused, not ignored
    from pipelines.run.config import ConfigError, load_run_config

    with pytest.raises(ConfigError, match="ray_address is a setting of the ray offline store"):
        load_run_config(None, {"features.ray_address": "10.0.0.5:6379"})


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["duckdb", "ray"])
def test_every_engine_gives_the_same_rows(tables, engine):
    reference, got = tables[_reference(engine)]["table"], tables[engine]["table"]
    assert got.schema.equals(reference.schema, check_metadata=True)
    for name in reference.column_names:  # column by column, so a failure names the column
        assert got.column(name).equals(reference.column(name)), f"{engine}: column {name} differs from the file store's"


@pytest.mark.slow
@pytest.mark.parametrize("engine", [*ENGINES, "file@0"])
def test_no_engine_joins_a_feature_row_from_the_row_time_or_later(world, tables, engine):
    """Counters count exactly the events strictly before the row; the vector is the newest snapshot at or before it,
    within the TTL; the edge rows come out as missing where nothing was known."""
    events, snapshots = world["events"], world["snapshots"]
    out = tables[engine]["table"].to_pandas()
    ttl = pd.Timedelta(days=tables[engine]["ttl_days"] or 10_000)
    outcomes = {"counted": 0, "no history": 0, "vector": 0, "expired": 0, "same second": 0}
    vectors = pq.read_table(world["root"] / "embed" / USERS_DIR / shard_file_name(0, 1)).to_pandas()
    home = vectors[vectors.condition == "surface=home"].set_index(["user_id", "event_timestamp"])["embedding"]
    for row in out.itertuples():
        before = events[(events.user_id == row.user_id) & (events.ts < row.ts)]
        if len(before) == 0:
            assert row.missing_user_stats == 1 and list(row.hist_item_ids) == []
            outcomes["no history"] += 1
        else:
            assert row.user_n_events == len(before) and row.user_n_clicks == before.label.sum()
            outcomes["counted"] += 1
            if ((events.user_id == row.user_id) & (events.ts == row.ts)).any():
                outcomes["same second"] += 1
        seen = [t for t in snapshots if t <= row.ts]
        if row.user_id == "nobody" or not seen or seen[-1] < row.ts - ttl:
            assert row.lum_user__surface_home is None and row.missing_lum == 1
            outcomes["expired"] += bool(seen) and row.user_id != "nobody"
        else:
            np.testing.assert_array_equal(np.asarray(row.lum_user__surface_home), np.asarray(home[(row.user_id, seen[-1])]))
            outcomes["vector"] += 1
    if tables[engine]["ttl_days"] == 0:
        assert outcomes.pop("expired") == 0  # nothing expires with a TTL of 0 (forever)
    assert min(outcomes.values()) >= 2, outcomes  # every case occurred


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["duckdb", "ray"])
def test_materialize_through_every_engine_puts_the_same_values_online(tables, engine):
    for reference, got in zip(tables[_reference(engine)]["online"], tables[engine]["online"]):
        np.testing.assert_array_equal(got.user_vectors, reference.user_vectors)
        np.testing.assert_array_equal(got.item_vectors, reference.item_vectors)
        assert got.user_counters == pytest.approx(reference.user_counters, nan_ok=True)
        assert got.hist_item_ids == reference.hist_item_ids and got.item_category == reference.item_category
    assert any(r.user_found for r in tables[engine]["online"])


@pytest.mark.slow
def test_the_local_ray_is_stopped_afterwards(tables):
    import psutil
    import ray

    assert not ray.is_initialized()
    time.sleep(1)  # ray.shutdown() signals its processes; give them a moment to exit
    left = [p.name() for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not [name for name in left if "ray" in name or "gcs" in name], f"Ray processes left running: {left}"


@pytest.mark.e2e  # starts Ray
def test_the_ray_store_refuses_times_it_would_floor(world, tmp_path):
    """A request time with a fraction of a second would be floored by Feast's Ray store and could join rows from
    after it: refused before Ray starts, naming the engines that join it exactly."""
    repo = FeatureRepo(tmp_path / "repo")
    shutil.copytree(world["repo"].root, repo.root)
    repo.init(offline=OfflineStoreConfig("ray", ray_cpus=1))
    repo.apply()
    rows = world["impressions"].head(3).assign(ts=lambda f: f.ts + pd.Timedelta(milliseconds=300))
    with pytest.raises(FeatureStoreError, match="fraction of a second.*duckdb or file"):
        build_training_set(repo, rows, TrainingSetConfig("ranker_base"))
    # and a TTL, which it would not apply (the world's LUM vectors expire after 3 days)
    with pytest.raises(FeatureStoreError, match="does not apply.*lum-ttl-days 0"):
        build_training_set(repo, world["impressions"].head(3), TrainingSetConfig("ranker_lum"))
