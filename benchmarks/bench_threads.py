"""OpenMP threads and wait policy: the libraries' defaults against `lum`'s (contracts/threads.py), with and without
a competing CPU-bound process on the same cores.

    python -m benchmarks.bench_threads                 # the default sizes (about 2 minutes on 2 cores)
    python -m benchmarks.bench_threads --quick         # smaller
    python -m benchmarks.bench_threads --competitors 2 --repeats 3

Settings, each measured in a fresh process (OpenMP reads its environment once, when torch / LightGBM load it):
  active:  OMP_WAIT_POLICY=ACTIVE, OMP_NUM_THREADS unset (torch's and LightGBM's own thread count: every CPU of the
           affinity mask, whatever the cgroup quota): threads waiting at a barrier spin.
  library: neither set: the OpenMP runtime's default (libgomp spins a while, then sleeps).
  lum:     OMP_WAIT_POLICY=PASSIVE, OMP_NUM_THREADS = contracts.threads.cpu_budget() (affinity, capped by the cgroup
           CPU quota), what the `lum` entry point sets; LightGBM's num_threads the same (ranker/config.py).
Workloads: a small torch MLP training loop (many short parallel regions: where waiting threads matter most), in
examples/s; a LightGBM fit on synthetic rows, in seconds. Competitors: processes running `while True: pass` on
the same CPUs, started before and stopped after each measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import REPO_ROOT, write_results
from contracts.threads import cgroup_cpu_quota, cpu_budget

SETTINGS = ("active", "library", "lum")


def setting_env(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if setting == "active":
        env["OMP_WAIT_POLICY"] = "ACTIVE"
    elif setting == "lum":
        env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(cpu_budget()))
    return env


def torch_worker(steps: int, batch: int, width: int, max_seconds: float) -> dict[str, Any]:
    """MLP training steps: `steps`, or fewer when `max_seconds` run out first (a spinning setting on a busy machine
    can be 50x slower; the rate is what is compared)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.ReLU(), torch.nn.Linear(2 * width, width), torch.nn.ReLU(),
                                torch.nn.Linear(width, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, width), torch.rand(batch, 1)

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        optimizer.step()

    for _ in range(5):  # warm-up: allocations, the thread pool
        step()
    started, done = time.perf_counter(), 0
    while done < steps and time.perf_counter() - started < max_seconds:
        step()
        done += 1
    seconds = time.perf_counter() - started
    return {"threads": torch.get_num_threads(), "examples_per_s": round(done * batch / seconds), "steps": done, "seconds": round(seconds, 2)}


def lightgbm_worker(rows: int, trees: int, max_seconds: float) -> dict[str, Any]:
    """A LightGBM fit of `trees` rounds, or fewer when `max_seconds` run out first; rows x trees per second."""
    import lightgbm as lgb
    import numpy as np

    from contracts.threads import default_threads

    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 20))
    y = (x[:, 0] + x[:, 1] * x[:, 2] + rng.normal(scale=0.5, size=rows) > 0).astype(int)
    params = {"objective": "binary", "num_leaves": 63, "learning_rate": 0.05, "verbosity": -1, "force_row_wise": True, "seed": 0}
    if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE":  # the lum setting: ranker/config.py passes num_threads
        params["num_threads"] = default_threads()
    data = lgb.Dataset(x, y, params={"verbosity": -1})
    started = time.perf_counter()

    def out_of_time(env: Any) -> None:
        if time.perf_counter() - started > max_seconds:
            raise lgb.callback.EarlyStopException(env.iteration, env.evaluation_result_list or [])

    booster = lgb.train(params, data, num_boost_round=trees, callbacks=[out_of_time])
    seconds = time.perf_counter() - started
    done = booster.current_iteration()
    return {"threads": params.get("num_threads", "default"), "trees": done, "seconds": round(seconds, 2),
            "rows_x_trees_per_s": round(rows * done / seconds)}


def measure(workload: str, setting: str, competitors: int, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in a fresh process, `competitors` busy processes running beside it."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(competitors)]
    try:
        time.sleep(0.5 if busy else 0)  # let them take their share before the clock starts
        command = [sys.executable, "-m", "benchmarks.bench_threads", "--worker", workload, *worker_args(args)]
        done = subprocess.run(command, cwd=REPO_ROOT, env=setting_env(setting), capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        for process in busy:  # only the processes started here, by their own handle
            process.kill()
            process.wait()
    return {"workload": workload, "setting": setting, "competitors": competitors, **result, "load_avg_1m": round(os.getloadavg()[0], 2)}


def worker_args(args: argparse.Namespace) -> list[str]:
    return ["--steps", str(args.steps), "--batch", str(args.batch), "--width", str(args.width), "--rows", str(args.rows), "--trees", str(args.trees),
            "--max-seconds", str(args.max_seconds)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a run of about a minute)")
    parser.add_argument("--steps", type=int, default=150, help="torch: timed training steps")
    parser.add_argument("--batch", type=int, default=256, help="torch: rows per step")
    parser.add_argument("--width", type=int, default=256, help="torch: MLP width")
    parser.add_argument("--rows", type=int, default=40_000, help="LightGBM: rows")
    parser.add_argument("--trees", type=int, default=30, help="LightGBM: boosting rounds")
    parser.add_argument("--max-seconds", type=float, default=6.0, help="stop a measurement's work after this long (its rate is kept)")
    parser.add_argument("--competitors", type=int, default=1, help="busy processes beside each measurement of the loaded case")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per cell (the median is kept)")
    parser.add_argument("--worker", choices=("torch", "lightgbm"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rows, args.trees, args.max_seconds = min(args.steps, 60), min(args.rows, 10_000), min(args.trees, 15), min(args.max_seconds, 3.0)
    if args.worker == "torch":
        print(json.dumps(torch_worker(args.steps, args.batch, args.width, args.max_seconds)))
        return
    if args.worker == "lightgbm":
        print(json.dumps(lightgbm_worker(args.rows, args.trees, args.max_seconds)))
        return

    rows = []
    for workload in ("torch", "lightgbm"):
        for competitors in (0, args.competitors):
            for setting in SETTINGS:
                samples = [measure(workload, setting, competitors, args) for _ in range(args.repeats)]
                key = "examples_per_s" if workload == "torch" else "rows_x_trees_per_s"
                row = sorted(samples, key=lambda r: r[key])[len(samples) // 2]
                rows.append(row)
                print(row, flush=True)
    # each setting against the lum setting of the same workload and load: > 1 means lum's is faster
    for row in rows:
        lum = next(r for r in rows if r["workload"] == row["workload"] and r["competitors"] == row["competitors"] and r["setting"] == "lum")
        key = "examples_per_s" if row["workload"] == "torch" else "rows_x_trees_per_s"
        row["lum_speedup"] = round(lum[key] / row[key], 2)
    quota = cgroup_cpu_quota()
    write_results("threads", rows, notes=(
        f"CPU budget {cpu_budget()} (affinity {len(os.sched_getaffinity(0))} CPUs, cgroup quota {quota if quota else 'none'}); "
        f"torch: MLP {args.width}-{2 * args.width}-{args.width}-1, batch {args.batch}, {args.steps} timed steps after 5; LightGBM: {args.rows:,} rows x 20 "
        f"features, {args.trees} trees, 63 leaves; each measurement stops after {args.max_seconds:g} s of work (its rate is kept); "
        f"competitors: {args.competitors} `while True: pass` processes on the same CPUs; median of "
        f"{args.repeats}; lum_speedup: the lum setting's speed over this row's (same workload and load). load_avg_1m: the machine's load "
        "around the measurement (other jobs share it)"))


if __name__ == "__main__":
    main()
