"""Redis memory per LUM vector in Feast's online store, by vector width: what the online store of docs/scale.md costs.

    python -m benchmarks.bench_online_memory                 # 2,000 users x 4 conditions at 64, 256, 1,024 dimensions
    python -m benchmarks.bench_online_memory --quick         # 500 users, 64 and 256

A real `redis-server` on a free localhost port (no persistence); for each width, a Feast repo with one snapshot of
random vectors is materialized into an emptied Redis, and `used_memory` after minus before, divided by the
(user, condition) rows written, is the cost of one vector (key, Feast's protobuf values, the view's timestamp).
The counters and item views are not materialized: only `lum_user_interest` is.
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

from benchmarks.bench_features import CONDITIONS, fake_embedding_job
from benchmarks.common import write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--dims", type=lambda t: [int(x) for x in t.split(",")], default=None)
    args = parser.parse_args()
    users = args.users or (500 if args.quick else 2_000)
    dims = args.dims or ([64, 256] if args.quick else [64, 256, 1024])
    binary = shutil.which("redis-server")
    if not binary:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    import redis as redis_py

    from feature_store.repo import FeatureRepo, OnlineStoreConfig
    from feature_store.serve import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-online-memory-"))
    port = free_port()
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        client = redis_py.Redis(host="127.0.0.1", port=port)
        for _ in range(50):
            try:
                client.ping()
                break
            except redis_py.ConnectionError:
                time.sleep(0.1)
        events = pd.DataFrame({"user_id": [f"u{i}" for i in range(users)], "item_id": "i0", "label": 1,
                               "ts": pd.Timestamp("2025-02-01", tz="UTC"), "surface": "home"})
        for dim in dims:
            client.flushall()
            repo = FeatureRepo(work / f"repo-{dim}")
            repo.init(online=OnlineStoreConfig("redis", f"127.0.0.1:{port}"))
            repo.build_stats(events, None)
            fake_embedding_job(work / f"embed-{dim}", np.array([f"u{i}" for i in range(users)]), np.array(["i0"]),
                               [pd.Timestamp("2025-03-01", tz="UTC")], dim=dim, version="mem")
            repo.ingest(work / f"embed-{dim}", item_valid_from="2025-01-01")
            repo.apply()
            store = repo.store()
            before = client.info("memory")["used_memory"]
            store.materialize(start_date=pd.Timestamp("2025-01-01", tz="UTC").to_pydatetime(),
                              end_date=pd.Timestamp("2025-03-02", tz="UTC").to_pydatetime(), feature_views=["lum_user_interest"])
            after = client.info("memory")["used_memory"]
            n = users * len(CONDITIONS)
            per_row = (after - before) / n
            rows.append({"dim": dim, "rows": n, "bytes_per_vector": round(per_row), "bytes_per_value": round(per_row / dim, 2),
                         "overhead_bytes": round(per_row - 4 * dim), "keys": client.dbsize()})
            print(rows[-1], flush=True)
        write_results("online_memory", rows, notes=f"redis-server {client.info()['redis_version']}, Feast 0.67 Redis online store, "
                                                  f"{users:,} users x {len(CONDITIONS)} conditions per width; used_memory delta per (user, condition) row")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
