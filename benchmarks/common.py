"""Shared by the benchmarks: machine facts, a result table, JSON output."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from contracts.files import write_json_atomic

# full-size results (what docs/results/ quotes); `make bench` in quick mode points this at results/quick instead
REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(os.environ.get("LUM_BENCH_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB.

    Read from VmHWM in /proc/self/status (the high-water mark of this process's own address space). Not
    ru_maxrss: on Linux a process started by fork + exec (subprocess, multiprocessing's spawn) inherits its
    parent's ru_maxrss, so a small job started from a benchmark that holds an engine reports the benchmark's peak.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource  # no /proc (macOS): ru_maxrss, in bytes there

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def machine_facts() -> dict[str, Any]:
    mem_kb = 0
    if Path("/proc/meminfo").exists():
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(name: str, rows: list[dict[str, Any]], notes: str = "") -> Path:
    """Print the rows as a table and write benchmarks/results/<name>.json with the command and machine facts."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_facts(),
        "notes": notes,
        "rows": rows,
    }
    path = RESULTS_DIR / f"{name}.json"
    write_json_atomic(payload, path)
    print(pd.DataFrame(rows).to_markdown(index=False))
    print(f"\nwrote {path}")
    return path
