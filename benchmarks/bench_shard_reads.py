"""How the embedding job's input reads grow with the number of users: a filtering pass per shard (before) against one
partitioning pass and a read of each shard's own file (after, `lum.embed_job.partition_by_shard`).

    python -m benchmarks.bench_shard_reads               # 10k, 40k, 160k users (50 events each), 2,500 users a shard
    python -m benchmarks.bench_shard_reads --quick       # 4k and 16k users

The job keeps shards at a fixed number of users (memory grows with the shard), so the number of shards grows with
the users: the per-shard pass reads the log once per shard, rows read ~ users^2; the partition reads it once and
writes it once, ~ users. Only the reads are timed (no engine): they are the part of the job that changes. The log
is synthetic (user, item, time, label and a condition column: the columns the job reads), written as one Parquet
file with pyarrow's defaults.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import write_results
from lum.embed_job import _read_shard, partition_by_shard

COLUMNS = ["user_id", "item_id", "ts", "label", "surface"]


def synthetic_log(path: Path, users: int, events_per_user: int = 50, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    n = users * events_per_user
    user = rng.integers(0, users, n)
    table = pa.table({
        "user_id": pa.array(np.char.add("u", user.astype(str))),
        "item_id": pa.array(np.char.add("i", rng.integers(0, 50_000, n).astype(str))),
        "ts": pa.array(np.sort(rng.integers(1_700_000_000, 1_710_000_000, n)) * 1_000_000, pa.timestamp("us", tz="UTC")),
        "label": pa.array(rng.integers(0, 2, n).astype(np.int8)),
        "surface": pa.array(rng.choice(["home", "search", "item_detail", "cart"], n)),
    })
    pq.write_table(table, path)
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--users", type=lambda t: [int(x) for x in t.split(",")], default=None)
    parser.add_argument("--users-per-shard", type=int, default=2_500)
    args = parser.parse_args()
    sizes = args.users or ([4_000, 16_000] if args.quick else [10_000, 40_000, 160_000])
    work = Path(tempfile.mkdtemp(prefix="bench-shard-reads-"))
    rows = []
    try:
        for users in sizes:
            log = work / f"events-{users}.parquet"
            n = synthetic_log(log, users)
            shards = max(1, users // args.users_per_shard)
            started = time.perf_counter()
            before_rows = sum(len(_read_shard(str(log), COLUMNS, s, shards)) for s in range(shards))
            before = time.perf_counter() - started
            started = time.perf_counter()
            parts = partition_by_shard(str(log), COLUMNS, shards, work / f"parts-{users}")
            after_rows = sum(len(pq.read_table(p).to_pandas()) for p in parts)
            after = time.perf_counter() - started
            assert before_rows == after_rows == n
            rows.append({"users": users, "events": n, "shards": shards, "per_shard_pass_s": round(before, 1), "partition_once_s": round(after, 1),
                         "rows_read_before": n * shards, "rows_read_after": 2 * n, "speedup": round(before / after, 1)})
            print(rows[-1], flush=True)
            shutil.rmtree(work / f"parts-{users}")
            log.unlink()
        if len(rows) > 1:
            x = np.log([r["users"] for r in rows])
            for key in ("per_shard_pass_s", "partition_once_s"):
                exponent = round(float(np.polyfit(x, np.log([max(r[key], 0.05) for r in rows]), 1)[0]), 2)
                for r in rows:
                    r[f"{key}_growth"] = exponent
        write_results("shard_reads", rows, notes=f"{args.users_per_shard:,} users a shard; 50 events a user; seconds of reading only "
                                                 "(rows_read_after counts the partition pass and the shard reads)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
