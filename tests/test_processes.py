"""Children die with their parent, SIGKILL included (contracts/processes.py): the `lum run` -> `lum embed` child and
the engine processes vLLM starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def _gone(pids: list[int], timeout_s: float = 10.0) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _parent(tmp_path: Path, body: str) -> tuple[subprocess.Popen, list[int]]:
    """A parent process running `body` (which prints its children's pids as JSON), and those pids."""
    script = tmp_path / "parent.py"
    script.write_text("import json, subprocess, sys, time\nfrom contracts.processes import die_with_parent, watch_descendants\n" + body
                      + "\nprint(json.dumps(pids), flush=True)\ntime.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    pids = json.loads(parent.stdout.readline())
    assert all(psutil.pid_exists(p) for p in pids)
    return parent, pids


def test_a_child_started_with_die_with_parent_dies_when_its_parent_is_killed(tmp_path):
    parent, pids = _parent(tmp_path, "pids = [subprocess.Popen(['sleep', '300'], preexec_fn=die_with_parent).pid]")
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert _gone(pids)


def test_without_it_the_child_outlives_its_parent(tmp_path):
    """The control: the case the two mechanisms exist for."""
    parent, pids = _parent(tmp_path, "pids = [subprocess.Popen(['sleep', '300']).pid]")
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    try:
        assert not _gone(pids, timeout_s=1.0)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)


def test_the_watchdog_kills_what_a_library_started_once_its_parent_is_killed(tmp_path):
    # a child and a grandchild, neither started by us with a death signal (as vLLM's engine core and its workers)
    body = ("watch_descendants()\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import subprocess, time; subprocess.Popen([\"sleep\", \"300\"]); time.sleep(300)'])\n"
            "time.sleep(1.0)\n"
            "import psutil\n"
            "pids = [child.pid] + [c.pid for c in psutil.Process(child.pid).children()]")
    parent, pids = _parent(tmp_path, body)
    assert len(pids) == 2
    time.sleep(0.5)  # the watchdog has seen them
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert _gone(pids)


@pytest.mark.slow
def test_a_killed_vllm_embedding_job_leaves_no_engine_process(tiny_lm, tiny_sim, tmp_path):
    import pyarrow.parquet as pq

    events = tmp_path / "events.parquet"
    pq.write_table(tiny_sim[0], events)
    lum = Path(sys.executable).parent / "lum"
    job = subprocess.Popen([str(lum), "embed", "--model", str(tiny_lm[0]), "--events", str(events), "--as-of", "2025-01-20",
                            "--engine", "vllm", "--out", str(tmp_path / "out")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, engine = time.time() + 240, []
    while time.time() < deadline and job.poll() is None:
        engine = [c for c in psutil.Process(job.pid).children(recursive=True) if "watchdog" not in " ".join(c.cmdline())]
        if any(c.memory_info().rss > 200 << 20 for c in engine):  # vLLM's engine core has loaded
            break
        time.sleep(0.5)
    assert job.poll() is None and engine, "the vLLM engine did not start"
    pids = [c.pid for c in engine]
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert _gone(pids, timeout_s=20.0)
