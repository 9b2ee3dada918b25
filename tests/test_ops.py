"""Operating conventions of the `lum` command (issue 35): exit codes, one-line OS errors, logging, thread defaults."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LUM = shutil.which("lum", path=str(Path(sys.executable).parent)) or "lum"
# no bytecode written by the commands these tests start on a full or read-only disk; one thread on the shared cores
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
ENV.pop("LUM_DEBUG", None)


def _on_tmpfs(folder: Path, mount_options: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`lum args` with a fresh tmpfs mounted (`mount_options`: ro, size=...) on `folder` in a private mount namespace:
    a real read-only or full file system for this one process tree, nothing mounted for anyone else (needs root)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = 'mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; shift 2; exec "$@"'
    done = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", mount_options, str(folder), LUM, *args],
                          capture_output=True, text=True, env=env or ENV, timeout=300)
    if done.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    return done


def _read_only_run(tmp_path: Path, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`lum args` where args name `tmp_path/ro/run` as the output: a folder this process may not write."""
    folder = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes through permission bits: a read-only file system instead
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare: no folder root cannot write")
        return _on_tmpfs(folder, "ro", args, env)
    folder.mkdir()
    folder.chmod(0o555)
    try:
        return subprocess.run([LUM, *args], capture_output=True, text=True, env=env or ENV, timeout=300)
    finally:
        folder.chmod(0o755)


def test_read_only_output_folder_is_a_one_line_error_naming_the_path(tmp_path):
    run = tmp_path / "ro" / "run"
    done = _read_only_run(tmp_path, ["data", "make", "--preset", "tiny", "--run", str(run)])
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    assert str(run) in errors[0]
    assert ("[EROFS]" in errors[0]) or ("[EACCES]" in errors[0]), errors[0]
    # --debug (or LUM_DEBUG=1) keeps the traceback for a genuine bug hunt
    debug = _read_only_run(tmp_path / "again", ["--debug", "data", "make", "--preset", "tiny", "--run", str(tmp_path / "again/ro/run")])
    assert debug.returncode == 1 and "Traceback" in debug.stderr, debug.stderr
    assert "OSError" in debug.stderr or "PermissionError" in debug.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="a small tmpfs (a really full disk) needs root")
def test_full_disk_is_a_one_line_error_naming_the_file(tmp_path):
    """pyarrow's write error names no file: the atomic writer adds the target's path."""
    run = tmp_path / "small" / "run"
    done = _on_tmpfs(tmp_path / "small", "size=40k", ["data", "make", "--preset", "tiny", "--run", str(run)])
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "No space left on device [ENOSPC]" in errors[0], done.stderr
    assert str(run / "data") in errors[0]


def _interrupted_while_reading(fifo: Path, args: list[str]) -> subprocess.CompletedProcess:
    """Starts `lum args` that reads the FIFO `fifo`, waits until it is blocked on it (a reader has opened it), sends
    SIGINT as Ctrl-C would, returns the finished process."""
    os.mkfifo(fifo)
    process = subprocess.Popen([LUM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    writer = None
    while writer is None:
        try:  # succeeds only once the command has opened the FIFO to read: then it waits in the read
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the command never opened the FIFO"
            time.sleep(0.1)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=60)
    finally:
        os.close(writer)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_ctrl_c_in_a_command_exits_130_with_one_line(tmp_path):
    done = _interrupted_while_reading(tmp_path / "run.yaml", ["run", "--config", str(tmp_path / "run.yaml")])
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "Aborted" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip()] == ["lum: interrupted"]


def test_ctrl_c_while_reading_the_options_exits_130(tmp_path):
    done = _interrupted_while_reading(tmp_path / "defaults.yaml", ["--config", str(tmp_path / "defaults.yaml"), "status"])
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "lum: interrupted" in done.stderr
