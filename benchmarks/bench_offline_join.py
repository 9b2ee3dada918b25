"""The point-in-time training-set join per offline engine, against a floor written here.

    python -m benchmarks.bench_offline_join                # file, duckdb and the floor at 0.25M, 1M, 4M rows; ray at 20k, 80k
    python -m benchmarks.bench_offline_join --quick        # 20k and 80k rows; ray at 5k
    python -m benchmarks.bench_offline_join --engines duckdb,floor --sizes 1000000

World: the simulator's `default` preset (as many users as the largest size needs), event times floored to whole
seconds (the Ray store joins only those: see feature_store/training_set.py `_ray_time_shift`; this also makes
same-second events common), random LUM vectors (64-d, 4 conditions, weekly snapshots, no TTL: the Ray store
applies none) ingested
through the real path, as in bench_features.py. Impressions: the last N of the log, service `ranker_lum_pooled`
(six views).

Each measurement runs in its own process (`--worker`): `lum features apply`'s config for the engine, `feast
apply`, then `build_training_set` timed; peak memory is that process's high-water mark (for Ray, the driver's:
the join runs in the cluster's worker processes, whose memory is not counted). The floor is the same
`build_training_set` with each view's join done by one pandas `merge_asof` over the same Parquet files (TTL
applied): what the join costs without an engine. Every engine's table is checked equal to the floor's.

Ray: the local Ray that Feast starts in the worker process (GCS, raylet and worker processes on 127.0.0.1), with 1
then 2 CPU slots (`ray_cpus`); its start-up (about 10 s) is inside the timed join, as it is for a user's command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import peak_rss_mib, write_results

SERVICE = "ranker_lum_pooled"
CONTEXT = ("surface", "device", "daypart", "hour")
IMPRESSIONS_PER_USER = 92  # the default preset: 1.84M impressions for 20k users


# ---------------------------------------------------------------------------------------------------------- the floor
def merge_asof_join(store: Any, entity: pd.DataFrame, refs: list[str], merge_budget: int, desc: str, progress: bool) -> pd.DataFrame:
    """One view's point-in-time join as one pandas `merge_asof` over its Parquet source (feature_store's `_historical`
    contract: the answer keyed by `row_id`, rows without a value absent)."""
    from feature_store.repo import read_view_source

    view = refs[0].split(":")[0]
    features = [r.split(":")[1] for r in refs]
    keys = [c for c in ("user_id", "item_id", "condition") if c in entity.columns]
    source = read_view_source(store, view, [*keys, "event_timestamp", *features]).to_pandas()
    source = source.rename(columns={"event_timestamp": "feature_ts"})
    source["feature_ts"] = source["feature_ts"].astype("datetime64[ns, UTC]")
    left = entity.assign(event_timestamp=entity["event_timestamp"].astype("datetime64[ns, UTC]")).sort_values("event_timestamp", kind="stable")
    got = pd.merge_asof(left, source.sort_values("feature_ts", kind="stable"), left_on="event_timestamp", right_on="feature_ts",
                        by=keys, direction="backward")
    got = got[got["feature_ts"].notna()]
    ttl = store.get_feature_view(view).ttl
    if ttl and ttl.total_seconds() > 0:
        got = got[got["feature_ts"] >= got["event_timestamp"] - ttl]
    return got.set_index("row_id")[features]


# ---------------------------------------------------------------------------------------------------------- one run
def worker(work: Path, engine: str, rows: int, ray_cpus: int | None) -> None:
    """Build the training set of the last `rows` impressions through `engine`; print seconds and peak memory as JSON."""
    from feature_store.repo import FeatureRepo, OfflineStoreConfig
    from feature_store.training_set import TrainingSetConfig, build_training_set

    repo = FeatureRepo(work / "repo")
    kind = "file" if engine == "floor" else engine
    repo.init(offline=OfflineStoreConfig(kind, ray_cpus=ray_cpus if kind == "ray" else None))
    repo.apply()
    impressions = pq.read_table(work / "impressions.parquet").slice(0).to_pandas()
    impressions = impressions.iloc[len(impressions) - rows:].reset_index(drop=True)
    started = time.perf_counter()
    table = build_training_set(repo, impressions, TrainingSetConfig(SERVICE, context_columns=CONTEXT),
                               join=merge_asof_join if engine == "floor" else None)
    seconds = time.perf_counter() - started
    pq.write_table(table, work / f"out-{engine}-{rows}.parquet")
    print("RESULT " + json.dumps({"seconds": seconds, "peak_mib": peak_rss_mib(), "rows": table.num_rows}), flush=True)


def run_worker(work: Path, engine: str, rows: int, ray_cpus: int | None = None) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.bench_offline_join", "--worker", engine, str(rows), "--work", str(work)]
    if ray_cpus:
        command += ["--ray-cpus", str(ray_cpus)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{engine} at {rows:,} rows failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def same_table(work: Path, engine: str, rows: int) -> bool:
    """The engine's table equals the floor's (schema, values, nulls and order), compared 100k rows at a time: two
    4M-row tables held whole took 16 GB in this process, beside the next engine's run."""
    floor = work / f"out-floor-{rows}.parquet"
    if not floor.exists():
        return False
    mine, theirs = pq.ParquetFile(work / f"out-{engine}-{rows}.parquet"), pq.ParquetFile(floor)
    if not mine.schema_arrow.equals(theirs.schema_arrow, check_metadata=True) or mine.metadata.num_rows != theirs.metadata.num_rows:
        return False
    batches = zip(mine.iter_batches(batch_size=100_000), theirs.iter_batches(batch_size=100_000))
    return all(pa.Table.from_batches([a]).equals(pa.Table.from_batches([b])) for a, b in batches)


# ---------------------------------------------------------------------------------------------------------- the world
def build_world(work: Path, rows: int) -> dict[str, Any]:
    from benchmarks.bench_features import fake_embedding_job
    from feature_store.repo import FeatureRepo
    from pipelines.data.sources.simulator import preset, simulate

    n_users = max(2000, math.ceil(rows * 1.1 / IMPRESSIONS_PER_USER))
    events, items = simulate(preset("default", n_users=n_users, chunk_users=min(n_users, 10_000)))
    ev, it = events.to_pandas(), items.to_pandas()
    ev["ts"] = ev["ts"].dt.floor("s")  # whole seconds: the Ray store's precision (see the docstring)
    repo = FeatureRepo(work / "repo")
    repo.init(lum_ttl_days=0)  # forever: Feast's Ray store applies no TTL (feature_store.training_set refuses one)
    repo.build_stats(ev, it)
    snapshots = list(pd.date_range(ev.ts.min().ceil("7D"), ev.ts.max(), freq="7D"))
    fake_embedding_job(work / "embed", ev.user_id.astype(str).unique(), it.item_id.astype(str).to_numpy(), snapshots)
    repo.ingest(work / "embed", item_valid_from="1970-01-02")
    impressions = ev.sort_values("ts", kind="stable")[["user_id", "item_id", "ts", "label", *CONTEXT]]
    if len(impressions) < rows:
        raise SystemExit(f"the world has {len(impressions):,} impressions, fewer than {rows:,}")
    pq.write_table(pa.Table.from_pandas(impressions.iloc[-rows:].reset_index(drop=True), preserve_index=False), work / "impressions.parquet")
    return {"users": int(ev.user_id.nunique()), "events": len(ev), "snapshots": len(snapshots)}


def measure(work: Path, engine: str, size: int, floor_seconds: dict[int, float], ray_cpus: int | None = None) -> dict[str, Any]:
    """One engine at one size (the floor first at each size: every table is compared with its)."""
    got = run_worker(work, engine, size, ray_cpus)
    if engine == "floor":
        floor_seconds[size] = got["seconds"]
    row = {"engine": engine, "workers": ray_cpus or 1, "rows": size, "rows_per_s": round(size / got["seconds"]), "seconds": round(got["seconds"], 1),
           "peak_mib": round(got["peak_mib"]), "vs_floor": round(got["seconds"] / floor_seconds[size], 2),
           "same_rows_as_floor": engine == "floor" or same_table(work, engine, size)}
    if engine != "floor":
        (work / f"out-{engine}-{size}.parquet").unlink()
    print(row, flush=True)
    return row


def save(rows: list[dict[str, Any]], world: dict[str, Any], done: bool) -> None:
    """The results so far (a run stopped half-way keeps what it measured), with each engine's growth exponent."""
    for engine, workers in {(r["engine"], r["workers"]) for r in rows}:
        mine = [r for r in rows if r["engine"] == engine and r["workers"] == workers]
        exponent = growth([(r["rows"], r["seconds"]) for r in mine])
        for r in mine:
            r["growth_exponent"] = exponent
    notes = (f"world {world}; event times floored to whole seconds; service {SERVICE}; peak memory of the process that ran the join "
             "(Ray: the driver only); floor: pandas merge_asof per view over the same Parquet files, same assembly; "
             "growth_exponent b of seconds ~ rows^b over the sizes measured" + ("" if done else "; PARTIAL: the run has not finished"))
    write_results("offline_join", rows, notes=notes)


def clear(work: Path, size: int) -> None:
    for path in work.glob(f"out-*-{size}.parquet"):
        path.unlink()


def growth(points: list[tuple[int, float]]) -> float | None:
    """The exponent b of seconds ~ rows^b (least squares on the logs); None with fewer than two sizes."""
    if len(points) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return round(float(np.polyfit(x, y, 1)[0]), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k and 80k rows; ray at 5k")
    parser.add_argument("--sizes", type=lambda t: [int(x) for x in t.split(",")], default=None)
    parser.add_argument("--ray-sizes", type=lambda t: [int(x) for x in t.split(",")], default=None)
    parser.add_argument("--ray-workers", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2])
    parser.add_argument("--engines", default="floor,file,duckdb,ray")
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "ROWS"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ray-cpus", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.work, args.worker[0], int(args.worker[1]), args.ray_cpus)
        return
    sizes = args.sizes or ([20_000, 80_000] if args.quick else [250_000, 1_000_000, 4_000_000])
    ray_sizes = args.ray_sizes or ([5_000] if args.quick else [20_000, 80_000])
    engines = args.engines.split(",")
    if "floor" not in engines:
        engines.insert(0, "floor")  # every table is checked against it

    work = Path(tempfile.mkdtemp(prefix="bench-offline-join-"))
    rows: list[dict[str, Any]] = []
    try:
        world = build_world(work, max(sizes + ray_sizes))
        print(f"world: {world}", flush=True)
        floor_seconds: dict[int, float] = {}
        # every size of the in-process engines first, then Ray (smaller sizes: it joins tens of rows a second here)
        in_process = [e for e in engines if e != "ray"]
        for size in sorted(sizes):
            for engine in in_process:
                rows.append(measure(work, engine, size, floor_seconds))
                save(rows, world, done=False)
            clear(work, size)  # 4M-row tables are large
        for size in sorted(ray_sizes) if "ray" in engines else []:
            if not (work / f"out-floor-{size}.parquet").exists():
                rows.append(measure(work, "floor", size, floor_seconds))
            for cpus in args.ray_workers:
                rows.append(measure(work, "ray", size, floor_seconds, cpus))
                save(rows, world, done=False)
            clear(work, size)
        save(rows, world, done=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
