"""Feature-store latency and throughput: online lookups (SQLite, Redis, HTTP) and the training-set join.

    python -m benchmarks.bench_features                  # 1M-impression join, 300 online requests per route
    python -m benchmarks.bench_features --quick          # 3k users of the same world, 50k impressions, 50 requests

World: the simulator's `default` preset (20k users, 5k items, 1.84M impressions; `--quick`: its first 3k users). User-interest vectors are
random (dimension 64, K=4 conditions, weekly snapshots): latency does not depend on what the vectors mean, and
they go through the real path (`lum embed`'s output layout -> ingest -> apply -> materialize).

Online: one ranking request = 1 user x 4 conditions + 100 candidate items, answered by
`FeatureClient.get_ranking_features` (one `online_read` per view, then the arrays assembled), with the client's
item cache (the default: candidates already seen are not read again until the next materialization) and without.
Candidates are drawn uniformly from all 5k items, the hardest case for that cache. The SQLite route is also
measured at 10 and 1,000 candidates (`--candidate-curve`). The floor is the
same reads made directly against the online store through Feast's provider (`online_read`), without decoding or
assembly; HTTP goes through a real `feast serve` on localhost.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import write_results
from contracts.embeddings import ITEMS_FILE, USERS_DIR, EmbeddingManifest, ShardRecord, shard_file_name, write_embedding_manifest
from feature_store.online import FeatureClient, materialize
from feature_store.repo import FeatureRepo, OnlineStoreConfig
from feature_store.serve import FeatureServer, free_port
from feature_store.training_set import TrainingSetConfig, build_training_set

CONDITIONS = ["surface=home", "surface=search", "surface=item_detail", "surface=cart"]
DIM = 64


def fake_embedding_job(out: Path, users: np.ndarray, items: np.ndarray, as_of: list[pd.Timestamp], seed: int = 0,
                       conditions: list[str] = CONDITIONS, dim: int = DIM, version: str = "bench-v1") -> Path:
    """A finished folder laid out as `lum embed` writes it, with seeded random vectors for every (as-of time, user,
    condition): what the vectors mean does not matter to plumbing (benchmarks, joins)."""
    rng = np.random.default_rng(seed)
    (out / USERS_DIR).mkdir(parents=True, exist_ok=True)
    frames = [pd.DataFrame({"user_id": np.repeat(users, len(conditions)), "condition": np.tile(conditions, len(users)), "event_timestamp": t})
              for t in as_of]
    rows = pd.concat(frames, ignore_index=True)
    vectors = rng.standard_normal((len(rows), dim)).astype(np.float32)
    offsets = pa.array(np.arange(0, vectors.size + 1, dim, dtype=np.int32))
    table = pa.table({
        "user_id": rows.user_id.to_numpy(), "condition": rows.condition.to_numpy(),
        "embedding": pa.ListArray.from_arrays(offsets, pa.array(vectors.ravel())),
        "event_timestamp": pa.array(rows.event_timestamp).cast(pa.timestamp("us", tz="UTC")),
        "model_version": pa.array([version] * len(rows)),
    })
    pq.write_table(table, out / USERS_DIR / shard_file_name(0, 1))
    item_vectors = rng.standard_normal((len(items), dim)).astype(np.float32)
    pq.write_table(pa.table({"item_id": items, "embedding": pa.array(list(item_vectors), pa.list_(pa.float32())),
                             "token": items, "model_version": [version] * len(items)}), out / ITEMS_FILE)
    settings = {"model_version": version, "as_of": ",".join(t.isoformat() for t in as_of), "rows": None, "conditions": list(conditions)}
    manifest = EmbeddingManifest(settings, shards={0: ShardRecord(shard_file_name(0, 1))}, complete=True, embedding_dim=dim)
    write_embedding_manifest(manifest, out)
    return out


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(samples_ms, 50)), 2), "p99_ms": round(float(np.percentile(samples_ms, 99)), 2)}


def time_requests(fn, requests: list[tuple[str, list[str]]], warmup: int = 10) -> list[float]:
    for user, items in requests[:warmup]:
        fn(user, items)
    out = []
    for user, items in requests:
        started = time.perf_counter()
        fn(user, items)
        out.append((time.perf_counter() - started) * 1000)
    return out


def floor_reader(repo: FeatureRepo):
    """The reads of a request straight through Feast's online store (`online_read`), no decoding or assembly."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    store = repo.store()
    provider = store._get_provider()
    views = {name: store.get_feature_view(name) for name in ("user_stats", "user_recent_items", "lum_user_interest", "item_stats", "item_info", "lum_item")}

    def key(names: list[str], values: list[str]) -> EntityKey:
        return EntityKey(join_keys=names, entity_values=[Value(string_val=v) for v in values])

    def read(user: str, items: list[str]) -> None:
        user_key = [key(["user_id"], [user])]
        provider.online_read(config=store.config, table=views["user_stats"], entity_keys=user_key)
        provider.online_read(config=store.config, table=views["user_recent_items"], entity_keys=user_key)
        provider.online_read(config=store.config, table=views["lum_user_interest"],
                             entity_keys=[key(["condition", "user_id"], [c, user]) for c in CONDITIONS])
        item_keys = [key(["item_id"], [i]) for i in items]
        for name in ("item_stats", "item_info", "lum_item"):
            provider.online_read(config=store.config, table=views[name], entity_keys=item_keys)

    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3k users, 50k impressions "
                        "and 50 requests per route (p99 then sits near the slowest request)")
    parser.add_argument("--impressions", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--candidate-curve", type=lambda t: [int(x) for x in t.split(",") if x], default=[10, 100, 1000],
                        help="candidate counts for the SQLite latency curve (comma-separated; empty to skip)")
    args = parser.parse_args()
    n_impressions = args.impressions or (50_000 if args.quick else 1_000_000)
    n_requests = args.requests or (50 if args.quick else 300)

    from pipelines.data.sources.simulator import preset, simulate

    work = Path(tempfile.mkdtemp(prefix="bench-features-"))
    rows: list[dict] = []
    redis = None
    try:
        events, items = simulate(preset("default", n_users=3000, chunk_users=3000) if args.quick else preset("default"))
        ev, it = events.to_pandas(), items.to_pandas()
        repo = FeatureRepo(work / "repo")
        repo.init(lum_ttl_days=0)
        repo.build_stats(ev, it)
        t0, t1 = ev.ts.min().ceil("7D"), ev.ts.max()
        snapshots = list(pd.date_range(t0, t1, freq="7D"))
        fake_embedding_job(work / "embed", ev.user_id.astype(str).unique(), it.item_id.astype(str).to_numpy(), snapshots)
        repo.ingest(work / "embed", item_valid_from="1970-01-02")
        repo.apply()
        started = time.perf_counter()
        state = materialize(repo)
        materialize_s = time.perf_counter() - started

        # ---- training-set join throughput
        impressions = ev.sort_values("ts", kind="stable").iloc[-n_impressions:].reset_index(drop=True)
        started = time.perf_counter()
        table = build_training_set(repo, impressions, TrainingSetConfig("ranker_lum_pooled", context_columns=("surface", "device", "daypart", "hour")))
        seconds = time.perf_counter() - started
        assert table.num_rows == len(impressions)
        rows.append({"measure": f"training-set join, {n_impressions:,} impressions, ranker_lum_pooled", "value": round(n_impressions / seconds),
                     "unit": "rows/s", "seconds": round(seconds, 1)})
        n_users = ev.user_id.nunique()
        rows.append({"measure": f"materialize (SQLite, {len(snapshots)} weekly snapshots x {n_users:,} users x 4 conditions + counters)",
                     "value": round(materialize_s, 1), "unit": "s", "seconds": round(materialize_s, 1)})

        # ---- online latency
        rng = np.random.default_rng(0)
        users = ev.user_id.astype(str).unique()
        all_items = it.item_id.astype(str).to_numpy()
        requests = [(str(rng.choice(users)), list(rng.choice(all_items, args.candidates, replace=False))) for _ in range(n_requests)]
        targets = {"p99_ms": {"python/sqlite": 20, "python/redis": 15, "http (feast serve, sqlite)": 40}}

        def route(name: str, make_client, floor, candidates: int = args.candidates) -> None:
            """The route with the client's item cache (the default) and without it; requests draw candidates
            uniformly from all 5k items, the hardest case for the cache (real candidate sets favour popular items)."""
            asked = requests if candidates == args.candidates else \
                [(str(rng.choice(users)), list(rng.choice(all_items, candidates, replace=False))) for _ in range(n_requests)]
            base = percentiles(time_requests(floor, asked))
            for cache in (True, False):
                client = make_client(cache)
                got = percentiles(time_requests(lambda u, i: client.get_ranking_features(u, CONDITIONS, i), asked))
                rows.append({"measure": f"online {name}{'' if cache else ', no item cache'}: 1 user x 4 conditions + {candidates} items",
                             "value": got["p99_ms"], "unit": "p99 ms", "p50_ms": got["p50_ms"], "floor_p50_ms": base["p50_ms"],
                             "floor_p99_ms": base["p99_ms"], "p99_vs_floor": round(got["p99_ms"] / base["p99_ms"], 2),
                             "target_p99_ms": targets["p99_ms"][name] if candidates == 100 else None})
                print(rows[-1], flush=True)

        sqlite_floor = floor_reader(repo)
        route("python/sqlite", lambda cache: FeatureClient(repo, item_cache=cache), sqlite_floor)
        with FeatureServer(repo) as server:
            route("http (feast serve, sqlite)", lambda cache: FeatureClient(repo, http_url=server.url, item_cache=cache), sqlite_floor)
        for candidates in args.candidate_curve:  # how latency grows with the candidate count (#8's cost curve)
            if candidates != args.candidates:
                route("python/sqlite", lambda cache: FeatureClient(repo, item_cache=cache), sqlite_floor, candidates)

        binary = shutil.which("redis-server")
        if binary:
            port = free_port()
            redis = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            redis_repo = FeatureRepo(work / "repo-redis")
            shutil.copytree(repo.root, redis_repo.root)
            redis_repo.materialized_file.unlink()
            redis_repo.init(online=OnlineStoreConfig("redis", f"127.0.0.1:{port}"))
            redis_repo.apply()
            materialize(redis_repo)
            route("python/redis", lambda cache: FeatureClient(redis_repo, item_cache=cache), floor_reader(redis_repo))
        else:
            print("redis-server not installed: the Redis route was skipped")
        notes = (f"state after materialize: {state['modes']}; online reads are sequential from one client on this 2-core machine; "
                 "the floor is Feast's online_read for the same three reads")
        write_results("features", rows, notes=notes)
    finally:
        if redis is not None:
            redis.terminate()
            redis.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
