"""How many CPUs this process may really use, and the OpenMP settings every component's compute threads follow.

    cpu_budget()          CPUs this process may use: its affinity mask, capped by its cgroup CPU quota (rounded up)
    default_threads()     compute threads for torch / LightGBM: OMP_NUM_THREADS when set, else cpu_budget()
    usable_cpu_list()     the CPU ids to bind to (vLLM's VLLM_CPU_OMP_THREADS_BIND), e.g. "0-3"
    prepare_openmp_env()  OMP_WAIT_POLICY=PASSIVE and OMP_NUM_THREADS=default_threads() unless already set

Why: os.cpu_count() is the host's CPUs, not this process's. A container limited to 2 CPUs on a 64-core host
(cgroup `cpu.max` "200000 100000"), or a job pinned to cores 0-1 (taskset, a scheduler's cpuset), that starts 64
OpenMP threads gets them time-sliced onto its 2 CPUs. And OpenMP's default wait policy lets a thread waiting at a
barrier spin for a while before it sleeps: on a shared machine the spinning threads take the CPU from the ones
with work. Measured on the 2-core project machine with a competing process (docs/install.md): tiny LM pretraining
2.3-3.3k vs 14-17k tokens/s, DLRM 6.3k vs 48-50k examples/s, LightGBM 164 s vs 43-50 s. PASSIVE makes waiting
threads sleep; the cost on an idle dedicated machine is small (benchmarks/bench_threads.py measures both).

OpenMP reads OMP_WAIT_POLICY and OMP_NUM_THREADS once, when its runtime is loaded (the first `import torch` or
`import lightgbm`, and numpy's OpenBLAS reads OMP_NUM_THREADS too): `prepare_openmp_env` must run before those
imports, which is why the `lum` entry point (pipelines/cli/__init__.py) calls it first. Standard library only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["cgroup_cpu_quota", "cpu_budget", "default_threads", "format_cpu_list", "prepare_openmp_env", "usable_cpu_list"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# v1 mounts the cpu controller under one of these names (distributions differ)
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _own_cgroups(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """(v2 path, v1 cpu-controller path) of this process's cgroup from /proc/self/cgroup lines `id:controllers:path`."""
    v2 = v1 = None
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(root: Path, cgroup_path: str | None) -> list[Path]:
    """The folders of a cgroup and of each cgroup above it, the mount root included (a limit on a parent holds for
    every child). Inside a container the namespace's root is the mount root, and `cgroup_path` is "/"."""
    folders = [root]
    node = root
    for part in (cgroup_path or "/").strip("/").split("/"):
        if part and part not in (".", ".."):
            node = node / part
            folders.append(node)
    return folders


def _v2_quota(folder: Path) -> float | None:
    """CPUs granted by a cgroup v2 `cpu.max` ("max 100000" or "<quota> <period>", microseconds)."""
    text = _read(folder / "cpu.max")
    if not text:
        return None
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(folder: Path) -> float | None:
    """CPUs granted by cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: no limit)."""
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        q, p = int(quota or "-1"), int(period or "100000")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The CPU time this process's cgroup may use, in CPUs (2.5 = two and a half), or None when unlimited.

    The smallest limit of the process's cgroup and its ancestors, cgroup v2 (`cpu.max`) and v1
    (`cpu.cfs_quota_us`/`cpu.cfs_period_us`) alike; also the limit at the mount root itself, which is the
    container's own cgroup when /proc/self/cgroup says "/" (a cgroup namespace)."""
    v2_path, v1_path = _own_cgroups(proc_cgroup)
    limits = []
    if (root / "cgroup.controllers").exists() or (root / "cpu.max").exists():  # the unified (v2) hierarchy
        limits += [_v2_quota(folder) for folder in _ancestors(root, v2_path)]
    for name in _V1_CPU_DIRS:
        if (root / name).is_dir():
            limits += [_v1_quota(folder) for folder in _ancestors(root / name, v1_path)]
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _affinity() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cpu_budget(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """CPUs this process may use: those of its affinity mask, at most its cgroup quota rounded up; at least 1."""
    cpus = len(_affinity())
    quota = cgroup_cpu_quota(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def default_threads() -> int:
    """Compute threads for one process: OMP_NUM_THREADS when the user (or torchrun) set it, else the CPU budget
    shared among the local ranks of a torchrun job (LOCAL_WORLD_SIZE)."""
    given = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    local_ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, cpu_budget() // (int(local_ranks) if local_ranks.isdigit() and int(local_ranks) > 0 else 1))


def format_cpu_list(cpus: list[int]) -> str:
    """CPU ids as the Linux list format: [0, 1, 2, 5] -> "0-2,5"."""
    ranges: list[str] = []
    cpus = sorted(set(cpus))
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        ranges.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(ranges)


def usable_cpu_list() -> str:
    """The first cpu_budget() CPUs of this process's affinity mask, e.g. "0-1": where vLLM's CPU worker binds its
    OpenMP threads (one per CPU), so that it never binds more threads than the quota pays for."""
    return format_cpu_list(_affinity()[: cpu_budget()])


def prepare_openmp_env() -> None:
    """OMP_WAIT_POLICY=PASSIVE and OMP_NUM_THREADS=default_threads() in this process's environment, each only when
    not already set (a user's or scheduler's value wins: OMP_WAIT_POLICY=ACTIVE brings the spinning back for a
    dedicated machine). Child processes (the embedding job, torchrun ranks) inherit both. Call it before torch,
    lightgbm or numpy are imported: OpenMP reads these once, when it loads."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", str(default_threads()))
