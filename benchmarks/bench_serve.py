"""The ranking service's latency: `POST /rank` of 1 user x the ranker's LUM conditions x 100 candidates.

    python -m benchmarks.bench_serve                       # runs/demo when it is finished, else a tiny run made here
    python -m benchmarks.bench_serve --run runs/demo --models lightgbm,dlrm --requests 300

Routes: in process (`RankingService.rank`, what `/rank` calls) and over HTTP (a real `lum serve` process on
localhost, one keep-alive session per client); online store SQLite (the run's own) and Redis (a copy of the run's
feature repo on a throwaway `redis-server`); sequential (one client) and 8 concurrent clients (threads, each with
its own requests). Every request is checked (HTTP 200, one score per candidate in (0, 1)); anything else counts
as an error. Requests: users drawn from the test window, 100 candidates drawn uniformly from all items (the
hardest case for the client's item cache, which is on, as in `lum serve`), the context of a test-window row,
no request_time (the store's clock). 20 warm-up requests per route before the timed ones.

Goals (issue 20): p99 <= 25 ms in process and <= 50 ms over HTTP, sequential; zero errors under concurrency.
After the HTTP routes the `lum serve` process is stopped with SIGINT (Ctrl-C) and must exit cleanly (code 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq

from benchmarks.common import REPO_ROOT, write_results

GOALS = {("in-process", 1): 25.0, ("http", 1): 50.0}


def finished_run(run: Path, models: list[str]) -> bool:
    """A run whose online store is materialized and whose `<protocol>-<model>-lum` rankers are trained."""
    from pipelines.serve import ServeError, ranker_folder

    try:
        return (run / "feature_repo" / "data" / "materialized.json").exists() and all(
            (ranker_folder(run, m, "lum") / "ranker.json").exists() for m in models)
    except ServeError:
        return False


def make_tiny_run(root: Path) -> Path:
    """`lum run` on the tiny simulator (about 1-2 minutes), the configuration tests/conftest.py uses."""
    import yaml
    from click.testing import CliRunner

    from pipelines.cli import main

    sys.path.insert(0, str(REPO_ROOT))
    from tests.conftest import TINY_RUN

    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(root / "run"), **TINY_RUN}))
    result = CliRunner().invoke(main, ["--no-progress", "run", "--config", str(config)])
    if result.exit_code != 0:
        raise SystemExit(f"could not make the tiny run: {result.output[-2000:]}")
    return root / "run"


def redis_run(run: Path, work: Path, redis_url: str, models: list[str]) -> Path:
    """A run folder for `lum serve` whose feature repo is a copy of `run`'s on Redis (the rankers are linked)."""
    from feature_store.online import materialize
    from feature_store.repo import FeatureRepo, OnlineStoreConfig
    from pipelines.serve import default_protocol_key, ranker_folder

    out = work / "redis-run"
    (out / "rankers").mkdir(parents=True)
    shutil.copy(run / "run_state.json", out / "run_state.json")
    for model in models:
        folder = ranker_folder(run, model, "lum")
        (out / "rankers" / folder.name).symlink_to(folder.resolve())
    repo = FeatureRepo(out / "feature_repo")
    shutil.copytree(run / "feature_repo", repo.root, ignore=shutil.ignore_patterns("online.db", "feast-serve-*.log"))
    repo.materialized_file.unlink()
    repo.init(online=OnlineStoreConfig("redis", redis_url))
    repo.apply()
    started = time.perf_counter()
    materialize(repo)
    print(f"Redis online store materialized in {time.perf_counter() - started:.0f} s ({default_protocol_key(run)} protocol)", flush=True)
    return out


def make_requests(run: Path, context_columns: list[str], n: int, candidates: int, seed: int = 0) -> list[dict[str, Any]]:
    test = pq.read_table(run / "splits" / "global" / "test.parquet", columns=["user_id", "item_id", *context_columns]).to_pandas()
    items = pq.read_table(run / "data" / "items.parquet", columns=["item_id"]).column("item_id").to_pylist() \
        if (run / "data" / "items.parquet").exists() else sorted(test.item_id.astype(str).unique())
    rng = np.random.default_rng(seed)
    rows = test.iloc[rng.integers(0, len(test), n)]
    out = []
    for _, row in rows.iterrows():
        context = {c: (row[c].item() if hasattr(row[c], "item") else row[c]) for c in context_columns}
        out.append({"user_id": str(row.user_id), "context": context, "item_ids": [str(i) for i in rng.choice(items, candidates, replace=False)]})
    return out


def check(body: dict[str, Any], request: dict[str, Any]) -> bool:
    scores = body.get("scores") or []
    return len(scores) == len(request["item_ids"]) and all(0.0 < s < 1.0 for s in scores)


def drive(call: Callable[[dict[str, Any]], dict[str, Any] | None], requests: list[dict[str, Any]], clients: int, warmup: int = 20) -> dict[str, Any]:
    """Latencies (ms) of `call` over the requests, by `clients` threads (each its own slice); errors counted."""
    for request in requests[:warmup]:
        call(request)
    timed = requests[warmup:]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(part: list[dict[str, Any]]) -> None:
        mine, bad = [], []
        for request in part:
            started = time.perf_counter()
            try:
                body = call(request)
                ok = body is not None and check(body, request)
            except Exception as exc:  # noqa: BLE001  (every failure is an error of the route)
                ok, body = False, {"error": repr(exc)}
            mine.append((time.perf_counter() - started) * 1000)
            if not ok:
                bad.append(json.dumps(body)[:200])
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    threads = [threading.Thread(target=worker, args=(timed[k::clients],)) for k in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"requests": len(timed), "p50_ms": round(float(np.percentile(latencies, 50)), 2), "p99_ms": round(float(np.percentile(latencies, 99)), 2),
            "mean_ms": round(float(np.mean(latencies)), 2), "requests_per_s": round(len(timed) / wall, 1), "errors": len(errors),
            "first_error": errors[0] if errors else None}


class ServeProcess:
    """`lum serve` as a separate process on a free port; stopped with SIGINT (Ctrl-C)."""

    def __init__(self, run: Path, model: str, log: Path):
        from feature_store.serve import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        lum = Path(sys.executable).with_name("lum")
        # --allow-rolling: the tiny run's features are rolling (a snapshot run, the demo's, does not need it)
        self.command = [str(lum) if lum.exists() else "lum", "serve", "--run", str(run), "--model", model, "--port", str(self.port), "--allow-rolling"]
        self.log = log
        self.exit_code: int | None = None

    def __enter__(self) -> ServeProcess:
        import requests

        self.process = subprocess.Popen(self.command, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"`{' '.join(self.command)}` exited with {self.process.returncode}:\n{self.log.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                time.sleep(0.3)
        self.process.kill()
        raise SystemExit(f"`{' '.join(self.command)}` did not answer within 180 s; log: {self.log}")

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            self.exit_code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.exit_code = self.process.wait()


def http_call(url: str) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    import requests

    local = threading.local()

    def call(request: dict[str, Any]) -> dict[str, Any] | None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        reply = session.post(f"{url}/rank", json=request, timeout=30)
        return reply.json() if reply.status_code == 200 else {"status": reply.status_code, "text": reply.text[:200]}

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="a finished run [default: runs/demo when finished, else a tiny run made here]")
    parser.add_argument("--models", default="lightgbm,dlrm", help="rankers to serve (their lum variant)")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per route (plus 20 warm-up)")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the concurrent routes")
    parser.add_argument("--stores", default="sqlite,redis")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    stores = [s for s in args.stores.split(",") if s]

    from feature_store.serve import RedisServer
    from pipelines.serve import RankingService, ranker_folder

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    redis: RedisServer | None = None
    rows: list[dict[str, Any]] = []
    try:
        demo = REPO_ROOT / "runs" / "demo"
        run = args.run or (demo if finished_run(demo, models) else make_tiny_run(work))
        if not finished_run(run, models):
            raise SystemExit(f"{run} has no materialized online store or no trained {'/'.join(models)} lum ranker: run `make demo` or pass --run")
        runs = {"sqlite": run}
        if "redis" in stores:
            if shutil.which("redis-server"):
                redis = RedisServer().__enter__()
                runs["redis"] = redis_run(run, work, redis.url, models)
            else:
                print("redis-server is not installed: the Redis routes are skipped", flush=True)
        clean_exits = []
        for model in models:
            for store, folder in runs.items():
                service = RankingService(ranker_folder(folder, model, "lum"), folder / "feature_repo", allow_rolling=True)
                asked = make_requests(run, service.context_columns, args.requests + 20, args.candidates)
                conditions = len(service.conditions)
                routes: list[tuple[str, Callable]] = [("in-process", lambda r, s=service: s.rank(r).body)]
                for route, call in routes:
                    for clients in (1, args.clients):
                        got = drive(call, asked, clients)
                        rows.append({"model": model, "store": store, "route": route, "clients": clients, "conditions": conditions,
                                     "candidates": args.candidates, **got, "goal_p99_ms": GOALS.get((route, clients))})
                        print(rows[-1], flush=True)
                del service
                with ServeProcess(folder, model, work / f"serve-{model}-{store}.log") as server:
                    for clients in (1, args.clients):
                        got = drive(http_call(server.url), asked, clients)
                        rows.append({"model": model, "store": store, "route": "http", "clients": clients, "conditions": conditions,
                                     "candidates": args.candidates, **got, "goal_p99_ms": GOALS.get(("http", clients))})
                        print(rows[-1], flush=True)
                clean_exits.append(server.exit_code == 0)
                if server.exit_code != 0:
                    print(f"`lum serve` did not exit cleanly on SIGINT (code {server.exit_code}); log: {server.log}", flush=True)
        for row in rows:
            goal = row["goal_p99_ms"]
            row["met"] = (row["p99_ms"] <= goal and row["errors"] == 0) if goal else row["errors"] == 0
        load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"
        notes = (f"run {run}; 1 user x {rows[0]['conditions'] if rows else '?'} LUM conditions x {args.candidates} candidates per request; "
                 f"{args.requests} timed requests per route after 20 warm-up; HTTP through a `lum serve` process (uvicorn, one worker) on "
                 f"127.0.0.1, one keep-alive session per client; `lum serve` stopped by SIGINT exited cleanly: {all(clean_exits)}; "
                 f"1-minute load average at the end: {load}")
        write_results("serve", rows, notes=notes)
    finally:
        if redis is not None:
            redis.__exit__()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
