"""Data-step benchmark: simulator generation time, events/s and peak memory per preset.

    python benchmarks/bench_data.py            # tiny, default, 100k users of `large`
    python benchmarks/bench_data.py --quick    # `make bench` quick mode: 20k users of `large`
    python benchmarks/bench_data.py --full     # adds the full `large` preset (1M users)

Each case runs in a fresh process so its peak resident memory (VmHWM, see common.peak_rss_mib) is its own.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from benchmarks.common import peak_rss_mib, write_results


def _run_case(preset_name: str, n_users: int | None, queue: mp.Queue) -> None:
    from pipelines.data.sources.simulator import preset, simulate_to_run
    from pipelines.paths import RunPaths

    overrides = {} if n_users is None else {"n_users": n_users}
    config = preset(preset_name, **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        info = simulate_to_run(config, RunPaths(Path(tmp)), progress=False)
        seconds = time.perf_counter() - started
        size_mb = (Path(tmp) / "data" / "events.parquet").stat().st_size / 2**20
    queue.put(
        {
            "preset": preset_name,
            "users": config.n_users,
            "items": config.n_items,
            "events": info["n_events"],
            "seconds": round(seconds, 2),
            "events_per_s": round(info["n_events"] / seconds),
            "peak_rss_mib": round(peak_rss_mib()),
            "parquet_mib": round(size_mb, 1),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="include the full large preset (1M users)")
    size.add_argument("--quick", action="store_true", help="20k users of the large preset instead of 100k")
    args = parser.parse_args()
    cases: list[tuple[str, int | None]] = [("tiny", None), ("default", None), ("large", 20_000 if args.quick else 100_000)]
    if args.full:
        cases.append(("large", None))
    ctx = mp.get_context("spawn")
    rows = []
    for preset_name, n_users in cases:
        queue = ctx.Queue()
        proc = ctx.Process(target=_run_case, args=(preset_name, n_users, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
        print(rows[-1], flush=True)
    write_results(
        "data",
        rows,
        notes="Simulator streamed to Parquet chunk by chunk (validation included); peak memory is bounded by the "
        "chunk size (chunk_users), not by the number of users.",
    )


if __name__ == "__main__":
    main()
