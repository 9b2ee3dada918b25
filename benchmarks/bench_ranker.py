"""Ranker speed: DLRM training examples/s (DMP fused path vs the plain PyTorch path), scoring latency for one
request of 1,000 candidates, LightGBM training time, all on one synthetic training set of the demo's size.

    python -m benchmarks.bench_ranker                  # 200k rows, 20k users, 100k items, LUM dim 64, batch 2048
    python -m benchmarks.bench_ranker --rows 50000     # quicker

Training speed: examples/s of each epoch over the fitting rows (90% of the table, the rest is the time-based
validation), timed inside the loop (feature building, planning and validation are not counted); the two engines take
turns and the median epoch is reported, because other jobs on a shared machine make single epochs noisy. Scoring latency: one user's request
(the same user, context, history and LUM user vectors) against 1,000 candidate items, through
`TrainedRanker.score`, both on inputs built beforehand ("features in memory") and end to end from a pandas
DataFrame (conversion, schema check, feature building, forward); 200 timed calls after 20 warm-up calls.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import torch

from benchmarks.common import write_results

USER_SIDE_PREFIXES = ("user_", "lum_user__", "hist_")
USER_SIDE = ("surface", "device", "daypart", "hour", "missing_user_stats", "ts")


def one_request(table: pa.Table, candidates: int) -> pa.Table:
    """`candidates` rows: the first row's user side (id, context, counters, history, LUM user vectors) with the
    items of the next rows."""
    rows = table.slice(0, candidates)
    first = pa.array(np.zeros(candidates, dtype=np.int64))
    for name in rows.column_names:
        if name.startswith(USER_SIDE_PREFIXES) or name in USER_SIDE:
            rows = rows.set_column(rows.column_names.index(name), name, table.column(name).take(first))
    return rows


def latency(fn, calls: int = 200, warmup: int = 20) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--variant", default="lum")
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per training run (each one is a sample)")
    parser.add_argument("--repeats", type=int, default=2, help="training runs per engine, taking turns")
    parser.add_argument("--batch-curve", type=lambda t: [int(x) for x in t.split(",") if x], default=[256, 1024, 2048, 8192],
                        help="batch sizes for the DMP throughput curve (comma-separated; empty to skip)")
    args = parser.parse_args()

    from benchmarks.synthetic import SyntheticConfig, synthetic_training_set
    from ranker.dlrm import DLRMConfig
    from ranker.gbdt import LightGBMConfig
    from ranker.schema import METADATA_KEY, read_metadata
    from ranker.train import RankerConfig, train_ranker

    started = time.perf_counter()
    table = synthetic_training_set(SyntheticConfig(rows=args.rows, users=args.users, items=args.items, categories=50, lum_dim=args.dim))
    print(f"synthetic table: {table.num_rows:,} rows in {time.perf_counter() - started:.1f} s", flush=True)
    rows: list[dict] = []
    dlrm = DLRMConfig(embedding_dim=args.dim, batch_size=args.batch, epochs=args.epochs, patience=args.epochs)
    # the engines take turns (dmp, plain, dmp, plain, ...) so that a burst of load from other jobs on the machine
    # does not land on one engine only; every epoch is one sample
    samples: dict[str, list[float]] = {"dmp": [], "plain": []}
    facts: dict[str, dict] = {}
    ranker = None
    for _ in range(args.repeats):
        for engine in ("dmp", "plain"):
            started = time.perf_counter()
            load_before = os.getloadavg()[0]
            trained = train_ranker(table, RankerConfig(model="dlrm", variant=args.variant, dlrm=replace(dlrm, engine=engine)))
            samples[engine] += [e["examples_per_s"] for e in trained.training["log"]]
            facts[engine] = {
                "examples_per_epoch": trained.training["log"][0]["examples"],
                "valid_auc": round(trained.training["valid_auc"], 4),
                "train_ranker_seconds": round(time.perf_counter() - started, 1),
                "load_avg_1m": round(max(load_before, os.getloadavg()[0]), 2),
            }
            print(engine, [round(x) for x in samples[engine]], facts[engine], flush=True)
            ranker = ranker or trained
    tables = ranker.pipeline.embedding_tables(args.dim)
    for engine in ("dmp", "plain"):
        rows.append({
            "what": f"DLRM train, {engine}", "variant": args.variant, "epochs_timed": len(samples[engine]),
            "examples_per_s": round(float(np.median(samples[engine]))), "examples_per_s_best": round(max(samples[engine])),
            "examples_per_s_worst": round(min(samples[engine])), "target": ">= 20k/s" if engine == "dmp" else "", **facts[engine],
            "tables": ", ".join(f"{t.name}:{t.num_embeddings}" for t in tables), "dense_features": len(ranker.pipeline.dense_names),
        })

    # DLRM training throughput against batch size (#8's cost curve): DMP path, one run of `--epochs` epochs per size
    curve = [b for b in args.batch_curve if b != args.batch]
    for batch in sorted([*curve, args.batch] if curve else []):
        if batch == args.batch:
            speed = float(np.median(samples["dmp"]))
        else:
            trained = train_ranker(table, RankerConfig(model="dlrm", variant=args.variant, dlrm=replace(dlrm, engine="dmp", batch_size=batch)))
            speed = float(np.median([e["examples_per_s"] for e in trained.training["log"]]))
        rows.append({"what": f"DLRM train, dmp, batch {batch} (batch-size curve)", "variant": args.variant, "batch": batch,
                     "examples_per_s": round(speed), "load_avg_1m": round(os.getloadavg()[0], 2)})
        print(rows[-1], flush=True)

    request = one_request(table, args.candidates)
    inputs = ranker.featurize(request)
    frame = request.to_pandas()
    frame.attrs[METADATA_KEY] = read_metadata(table)
    assert np.allclose(ranker.score(inputs), ranker.score(frame))
    threads = torch.get_num_threads()
    # one thread too: a request this small gains little from a second one, and on a busy machine a parallel
    # region waits for its slowest (preempted) thread
    for n_threads in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n_threads)
        for what, fn in (("tensors in memory", lambda: ranker.score(inputs)), ("end to end from a DataFrame", lambda: ranker.score(frame))):
            p50, p99 = latency(fn)
            rows.append({"what": f"score {args.candidates} candidates, {what}", "variant": args.variant, "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
                         "target": "<= 10 ms p99" if what == "tensors in memory" else "", "threads": n_threads,
                         "load_avg_1m": round(os.getloadavg()[0], 2)})
            print(rows[-1], flush=True)
    torch.set_num_threads(threads)

    started = time.perf_counter()
    booster = train_ranker(table, RankerConfig(model="lightgbm", variant=args.variant, lightgbm=LightGBMConfig()))
    rows.append({
        "what": "LightGBM train", "variant": args.variant, "seconds": round(booster.training["seconds"], 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "best_iteration": booster.training["best_iteration"], "valid_auc": round(booster.training["valid_auc"], 4),
        "features": len(booster.training["feature_names"]), "load_avg_1m": round(os.getloadavg()[0], 2),
    })
    print(rows[-1], flush=True)
    write_results("ranker", rows, notes=(
        f"synthetic training set: {args.rows:,} rows, {args.users:,} users, {args.items:,} items, LUM dim {args.dim}, 4 LUM conditions, "
        f"variant {args.variant}; DLRM embedding dim {args.dim}, dense arch {dlrm.dense_arch_layers}, over arch {dlrm.over_arch_layers}, "
        f"batch {args.batch}, torch threads {torch.get_num_threads()}; examples/s timed inside the epoch loop, median over "
        f"{args.repeats} runs x {args.epochs} epochs per engine, the engines taking turns. load_avg_1m: the machine's 1-minute load "
        "average around the measurement (2 cores; above 2 means other jobs were competing for them)"
    ))


if __name__ == "__main__":
    main()
