"""Runs every benchmark, one subprocess each, then writes benchmarks/results/SUMMARY.md (`make bench`).

    python -m benchmarks.run_all                      # quick sizes (about 10 minutes on 2 cores)
    python -m benchmarks.run_all --full               # the sizes docs/results/ quotes
    python -m benchmarks.run_all --only embed,data    # a subset
    python -m benchmarks.run_all --summary-only       # rebuild the summary from the JSON already there

Each benchmark runs as `python -m benchmarks.bench_<name> <args>` from the repository root with its output
streamed; its wall time, mode and exit code go to benchmarks/results/_runs.json and into the summary. A failed
benchmark is recorded and the others still run; the exit code is 1 if any failed.

Full runs write benchmarks/results/<name>.json and SUMMARY.md there, and refresh the results block of
docs/benchmarks.md; quick runs write the same files under benchmarks/results/quick/ (through
LUM_BENCH_RESULTS_DIR), so a quick run never replaces the full figures the docs quote.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import RESULTS_DIR
from benchmarks.summary import PAGE, REPO_ROOT, RunRecord, build_summary, save_run


@dataclass(frozen=True)
class Bench:
    """One benchmark script (benchmarks/bench_<name>.py) and its arguments per mode."""

    name: str
    quick: tuple[str, ...]
    full: tuple[str, ...]
    needs: str | None = None  # a path (from the repository root) without which it is skipped
    needs_hint: str = ""  # how to make that path
    result: str | None = None  # the name of the JSON it writes, when not its own name

    @property
    def result_name(self) -> str:
        return self.result or self.name

    @property
    def module(self) -> str:
        return f"benchmarks.bench_{self.name}"


# pipeline order; the quick sizes use each script's own small options
BENCHES = (
    Bench("data", quick=("--quick",), full=("--full",)),
    Bench("pretrain", quick=("--users", "1000", "--steps", "15"), full=("--presets", "tiny,small,base")),
    Bench("embed", quick=("--quick", "--users", "200", "--repeats", "1"), full=("--full",)),
    Bench("rolling", quick=("--users", "300", "--repeats", "1"), full=()),
    Bench("features", quick=("--quick",), full=()),
    Bench("offline_join", quick=("--quick",), full=()),
    Bench("shard_reads", quick=("--quick",), full=()),
    Bench("online_memory", quick=("--quick",), full=()),
    Bench("ranker", quick=("--rows", "50000", "--epochs", "1", "--repeats", "1", "--batch-curve", "512,8192"), full=()),
    # our DIN against DeepCTR-Torch's on the same rows (its own environment in build/, made on first use)
    Bench("din_reference", quick=("--quick", "--data", "simulator"), full=()),
    Bench("scaling", quick=("--quick", "--users", "100"), full=("--full",)),
    Bench("retrieve", quick=("--quick",), full=()),
    Bench("retrieval_quality", quick=("--quick",), full=()),
    Bench("retrieval_ab", quick=("--quick",), full=()),
    # the ranking service on runs/demo when it is finished, else on a tiny run it makes (about 2 minutes)
    Bench("serve", quick=("--requests", "100", "--models", "lightgbm"), full=()),
    # OpenMP threads and wait policy: the libraries' defaults against lum's, with a competing process (contracts/threads.py)
    Bench("threads", quick=("--quick",), full=()),
    # the quality curves read a finished run's training sets (`make demo`); quick: the history curve on 1,000 users
    Bench("quality", quick=("--run", "runs/demo", "--presets", "tiny", "--histories", "5,100", "--users", "1000", "--bootstrap", "50"),
          full=("--run", "runs/demo", "--presets", "tiny,small", "--epochs", "small=3", "--histories", "5,20,50,100"),
          needs="runs/demo/run_state.json", needs_hint="run `make demo` first", result="quality-demo"),
)
BY_NAME = {b.name: b for b in BENCHES}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def results_dir(mode: str) -> Path:
    return RESULTS_DIR if mode == "full" else RESULTS_DIR / "quick"


def json_date(name: str, folder: Path = RESULTS_DIR) -> str | None:
    """The date in <folder>/<name>.json, None when there is no readable file."""
    try:
        return json.loads((folder / f"{name}.json").read_text())["machine"]["date"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_bench(bench: Bench, mode: str) -> RunRecord:
    """Runs one benchmark with its output streamed to ours; returns what happened."""
    args = list(bench.full if mode == "full" else bench.quick)
    command = [sys.executable, "-m", bench.module, *args]
    print(f"\n=== {bench.name} ({mode}): {' '.join(command)}", flush=True)
    folder = results_dir(mode)
    name = bench.result_name
    before, started_at, started = json_date(name, folder), now(), time.perf_counter()
    try:
        code = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "LUM_BENCH_RESULTS_DIR": str(folder)}).returncode
    except OSError as error:  # the interpreter could not be started at all
        print(f"could not start {bench.module}: {error}", file=sys.stderr, flush=True)
        code = 127
    wall = time.perf_counter() - started
    after = json_date(name, folder)
    # a successful run must have written a new JSON; otherwise the figures shown would be an older run's
    if code == 0 and (after is None or after == before):
        print(f"{bench.module} exited 0 but wrote no new {name}.json", file=sys.stderr, flush=True)
        code = 1
    print(f"=== {bench.name}: exit code {code}, {wall:,.0f} s", flush=True)
    return RunRecord(mode=mode, args=args, exit_code=code, wall_s=round(wall, 1), started=started_at,
                     json_date=after if code == 0 else None)


def parse_only(text: str | None) -> list[Bench]:
    """`--only embed,bench_data` -> those benchmarks, in pipeline order; all of them when text is None."""
    if text is None:
        return list(BENCHES)
    names = {n.strip().removeprefix("bench_") for n in text.split(",") if n.strip()}
    unknown = sorted(names - BY_NAME.keys())
    if unknown or not names:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(BY_NAME)}")
    return [b for b in BENCHES if b.name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="small sizes (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="the full sizes")
    parser.set_defaults(mode="quick")
    parser.add_argument("--only", metavar="NAME[,NAME]", help=f"run a subset of: {', '.join(BY_NAME)}")
    parser.add_argument("--summary-only", action="store_true", help="run nothing; rebuild SUMMARY.md from the JSON there")
    args = parser.parse_args(argv)
    try:
        benches = parse_only(args.only)
    except ValueError as error:
        parser.error(str(error))

    failed: list[tuple[str, int]] = []
    if not args.summary_only:
        lines = []
        for bench in benches:
            if bench.needs and not (REPO_ROOT / bench.needs).exists():
                print(f"\n=== {bench.name}: skipped, it needs {bench.needs}: {bench.needs_hint}", flush=True)
                lines.append(f"{bench.name}: skipped (needs {bench.needs})")
                continue
            record = run_bench(bench, args.mode)
            save_run(results_dir(args.mode), bench.result_name, record)
            lines.append(f"{bench.name}: {record.wall_s:,.0f} s" + ("" if record.ok else f", failed (exit code {record.exit_code})"))
            if not record.ok:
                failed.append((bench.name, record.exit_code))
        print(f"\n=== {args.mode} run: " + "; ".join(lines), flush=True)

    # only full-size figures go into docs/benchmarks.md
    summary = build_summary(results_dir(args.mode), PAGE if args.mode == "full" else None)
    print(f"wrote {summary}", flush=True)
    if failed:
        print("failed: " + ", ".join(f"{name} (exit code {code})" for name, code in failed), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
