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


@pytest.mark.e2e  # `lum` subprocesses, a wheel build, `feast ui` or `feast apply`: seconds each
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


@pytest.mark.e2e  # `lum` subprocesses, a wheel build, `feast ui` or `feast apply`: seconds each
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
    # SIGINT at its default in the child: a shell's background job (a CI runner's) inherits it ignored, and Python then
    # installs no KeyboardInterrupt handler, as any program keeps an ignored Ctrl-C ignored
    process = subprocess.Popen([LUM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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


@pytest.mark.e2e  # `lum` subprocesses, a wheel build, `feast ui` or `feast apply`: seconds each
def test_ctrl_c_in_a_command_exits_130_with_one_line(tmp_path):
    done = _interrupted_while_reading(tmp_path / "run.yaml", ["run", "--config", str(tmp_path / "run.yaml")])
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "Aborted" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip()] == ["lum: interrupted"]


@pytest.mark.e2e  # `lum` subprocesses, a wheel build, `feast ui` or `feast apply`: seconds each
def test_ctrl_c_while_reading_the_options_exits_130(tmp_path):
    done = _interrupted_while_reading(tmp_path / "defaults.yaml", ["--config", str(tmp_path / "defaults.yaml"), "status"])
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "lum: interrupted" in done.stderr


# --- threads: the CPUs this process may use, OpenMP's wait policy -------------------------------------------------


def _cgroup_files(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_cgroup_v2_quota_is_the_smallest_limit_of_the_process_cgroup_and_its_parents(tmp_path):
    from contracts.threads import cgroup_cpu_quota, cpu_budget

    root = _cgroup_files(tmp_path / "cg", {"cgroup.controllers": "cpu io memory\n", "cpu.max": "max 100000\n",
                                           "jobs/cpu.max": "400000 100000\n", "jobs/lum/cpu.max": "150000 100000\n"})
    proc = _cgroup_files(tmp_path, {"self_cgroup": "0::/jobs/lum\n"}) / "self_cgroup"
    assert cgroup_cpu_quota(root, proc) == 1.5
    assert cpu_budget(root, proc) == min(2, len(os.sched_getaffinity(0)))  # 1.5 CPUs: 2 threads, rounded up
    (root / "jobs/lum/cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(root, proc) == 4.0  # the parent's limit holds for its children
    (root / "jobs/cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(root, proc) is None
    # in a container (cgroup namespace) the process's cgroup is "/": the mount root's own limit
    container = _cgroup_files(tmp_path / "ct", {"cgroup.controllers": "cpu\n", "cpu.max": "50000 100000\n"})
    proc.write_text("0::/\n")
    assert cgroup_cpu_quota(container, proc) == 0.5
    assert cpu_budget(container, proc) == 1


def test_cgroup_v1_quota_and_garbage(tmp_path):
    from contracts.threads import cgroup_cpu_quota

    root = _cgroup_files(tmp_path / "cg", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
                                           "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
                                           "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    proc = _cgroup_files(tmp_path, {"self_cgroup": "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"}) / "self_cgroup"
    assert cgroup_cpu_quota(root, proc) == 3.0
    (root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(root, proc) is None
    (root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("not a number\n")
    assert cgroup_cpu_quota(root, proc) is None  # unreadable is no limit, never a crash
    assert cgroup_cpu_quota(tmp_path / "absent", tmp_path / "absent.txt") is None


def test_cpu_list_format():
    from contracts.threads import format_cpu_list

    assert format_cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert format_cpu_list([3]) == "3"


def _env_after_entry_point(**env: str) -> tuple[str, str]:
    """OMP_WAIT_POLICY and OMP_NUM_THREADS as the `lum` entry point leaves them, in a fresh process."""
    base = {k: v for k, v in ENV.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    code = "import os, pipelines.cli; print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env}, timeout=120, check=True)
    policy, threads = done.stdout.split()
    return policy, threads


@pytest.mark.e2e  # `lum` subprocesses, a wheel build, `feast ui` or `feast apply`: seconds each
def test_entry_point_makes_openmp_passive_with_the_quota_threads_unless_set():
    from contracts.threads import cpu_budget

    assert _env_after_entry_point() == ("PASSIVE", str(cpu_budget()))
    assert _env_after_entry_point(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="3") == ("ACTIVE", "3")


def test_lightgbm_and_vllm_defaults_are_the_machines_not_fixed_values():
    from click.testing import CliRunner

    from contracts.threads import default_threads
    from pipelines.cli import main
    from ranker.config import LightGBMConfig

    assert LightGBMConfig().params()["num_threads"] == default_threads()
    assert LightGBMConfig(threads=5).params()["num_threads"] == 5
    shown = " ".join(CliRunner().invoke(main, ["embed", "--help"]).output.split())
    assert "default: the CPUs this process may use" in shown and "default: 0-1" not in shown


# --- logging: time, level and name on every line; the libraries' warnings through logging -------------------------

_LOG_LINE = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} (DEBUG|INFO|WARNING|ERROR) [\w.]+: "


def _log_of_a_command(flags: list[str]) -> str:
    """stderr of a process that configures logging as `lum <flags> data --help` does, then logs a line of ours and
    raises three warnings: the DeprecationWarning ibis raised on every Feast read of a run (a library's file), a known
    noisy message, and a warning of our own code."""
    import ibis.backends.duckdb as ibis_duckdb

    code = f"""
import logging, warnings
from pipelines.cli import main
main({[*flags, "data", "--help"]!r}, standalone_mode=False)
warnings.simplefilter("default")  # what a library (Feast's dependencies) does in a real run
logging.getLogger("pipelines.ops_test").warning("a line of ours")
warnings.warn_explicit("fetch_arrow_table() is deprecated, use to_arrow_table() instead.", DeprecationWarning, {ibis_duckdb.__file__!r}, 332)
warnings.warn_explicit("TypedStorage is deprecated. It will be removed in the future.", UserWarning, "/any/where/torch/storage.py", 414)
warnings.warn("a warning of our own code", UserWarning)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120, check=True)
    return done.stderr


@pytest.mark.e2e  # `lum` subprocesses, a wheel build, `feast ui` or `feast apply`: seconds each
def test_log_lines_carry_time_level_and_name_and_library_warnings_go_to_debug():
    import re

    quiet = _log_of_a_command([])
    lines = [line for line in quiet.splitlines() if line.strip()]
    assert all(re.match(_LOG_LINE, line) for line in lines), quiet
    assert any(line.endswith(" WARNING pipelines.ops_test: a line of ours") for line in lines), quiet
    ours = [line for line in lines if "a warning of our own code" in line]
    assert len(ours) == 1 and " WARNING py.warnings: " in ours[0] and "UserWarning" in ours[0]  # one line: no source line under it
    assert "fetch_arrow_table" not in quiet and "TypedStorage" not in quiet  # the libraries' noise: not at WARNING

    verbose = _log_of_a_command(["-v"])
    noise = [line for line in verbose.splitlines() if "fetch_arrow_table" in line or "TypedStorage" in line]
    assert len(noise) == 2 and all(re.match(_LOG_LINE, line) and " DEBUG py.warnings: " in line for line in noise), verbose


# --- the Python API page ------------------------------------------------------------------------------------------


def test_the_api_page_example_runs(tiny_run):
    """docs/api.md's python block, on the shared tiny run: its config again (every step already done: a resume that
    changes nothing), then features and scores of one request."""
    import re

    run, config, _ = tiny_run
    text = (REPO / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    code = blocks[0]
    for name, value in (("RUN", f"Path({str(run)!r})"), ("CONFIG", repr(str(config))), ("ROLLING", "True")):  # the tiny run is rolling
        code, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", code, flags=re.M)
        assert n == 1, name
    state = (run / "run_state.json").read_text()
    printed: list[str] = []
    exec(compile(code, "docs/api.md", "exec"), {"print": lambda *a: printed.append(" ".join(map(str, a)))})
    scores = printed[-1]
    assert scores.startswith("{") and scores.count(":") == 5, printed  # five candidates, one score each
    assert any("up to date" in line or "reused" in line or "done" in line for line in printed[:-2]), printed
    assert '"status": "failed"' not in (run / "run_state.json").read_text()
    assert len(state) > 0


@pytest.mark.e2e  # `lum` subprocesses, a wheel build, `feast ui` or `feast apply`: seconds each
def test_the_wheel_ships_py_typed_for_every_package(tmp_path):
    """PEP 561: a project type-checking its code against ours reads our annotations only when the wheel has py.typed."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=300, env=ENV)
    (wheel,) = tmp_path.glob("lum_user_model-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("lum", "feature_store", "ranker", "contracts", "pipelines"):
        assert f"{package}/py.typed" in names, package


@pytest.mark.e2e  # `lum` subprocesses, a wheel build, `feast ui` or `feast apply`: seconds each
def test_feast_ui_and_its_registry_server_import_in_the_shipped_environment():
    """`feast ui` starts Feast's registry server, which imports grpc_health and grpc_reflection (the `ui` extra)."""
    code = "import feast.ui_server, feast.registry_server, grpc_health.v1.health, grpc_reflection.v1alpha.reflection, grpc; print(grpc.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    feast = shutil.which("feast", path=str(Path(sys.executable).parent)) or "feast"
    shown = subprocess.run([feast, "ui", "--help"], capture_output=True, text=True, env=ENV, timeout=300)
    assert shown.returncode == 0 and "--port" in shown.stdout, shown.stderr[-2000:]
