"""Operating a run folder: settings checked before any work, the run lock, atomic writes from several writers,
`lum status` of failed and killed steps, paths relative to the config file (issue 35).

Cheap on purpose: run states are built by hand (or by the run's own check walk), never by a second whole run."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipelines.cli import main
from pipelines.paths import RunPaths
from pipelines.run.config import load_run_config
from pipelines.run.execute import changed_steps, execute, ranker_config_as_made
from pipelines.run.lock import HELD_ENV, LOCK_FILE, RunLockedError, is_locked, read_holder, run_lock
from pipelines.run.state import STATE_FILE, SettingsChangedError
from pipelines.steps.rankers import ranker_dir
from tests.conftest import TINY_RUN

# the shared run's settings with the retrieval A/B on (TINY_RUN turns it off): the A/B step reads the rankers
WITH_AB = {**TINY_RUN, "retrieval": {"enabled": True}}


def _finished_state(run_dir: Path, settings: dict) -> Path:
    """A run_state.json as a finished run of `settings` would have left it (every step done with the settings the
    run's own check walk computes); the folder holds nothing else. Returns the config file written beside it."""
    config = run_dir.parent / f"{run_dir.name}.yaml"
    config.write_text(yaml.safe_dump({**settings, "run_dir": str(run_dir)}))
    planned: dict[str, dict] = {}
    assert changed_steps(load_run_config(config), planned=planned) == []  # nothing recorded yet: nothing changed
    steps = {name: {**record, "status": "done", "seconds": 1.0} for name, record in planned[str(run_dir)].items()}
    run_dir.mkdir(parents=True)
    (run_dir / STATE_FILE).write_text(json.dumps({"config": {}, "steps": steps}))
    return config


def _no_step_may_start(line: str) -> None:
    assert not line.startswith("---"), f"a step started before the settings were checked: {line}"


def test_a_changed_setting_is_refused_before_any_step_runs_naming_every_changed_step(tmp_path):
    run = tmp_path / "run"
    _finished_state(run, WITH_AB)
    state_before = (run / STATE_FILE).read_text()
    changed = copy.deepcopy(WITH_AB)
    changed["rankers"]["lightgbm"]["num_leaves"] = 7
    config = load_run_config(None, {**changed, "run_dir": str(run)})
    with pytest.raises(SettingsChangedError) as error:
        execute(config, echo=_no_step_may_start)
    message = str(error.value)
    for variant in ("base", "lum"):
        assert f"the step 'global+rolling: lightgbm {variant}' ran with other settings (ranker.lightgbm.num_leaves: 63 before, 7 now)" in message
    assert "reading their output, 'global+rolling: retrieval A/B'" in message and "lum run --force" in message
    assert "dlrm" not in message  # a LightGBM setting is no DLRM's setting
    # nothing was made, nothing was recorded (the lock file is the lock's, pipelines/run/lock.py)
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, STATE_FILE] and (run / STATE_FILE).read_text() == state_before


def test_force_redoes_exactly_the_changed_steps_and_those_reading_them(tmp_path):
    run = tmp_path / "run"
    _finished_state(run, WITH_AB)
    changed = copy.deepcopy(WITH_AB)
    changed["rankers"]["lightgbm"]["num_leaves"] = 7
    changes = changed_steps(load_run_config(None, {**changed, "run_dir": str(run)}))
    assert [(c.step, c.only_upstream) for c in changes] == [
        ("global+rolling: lightgbm base", False), ("global+rolling: lightgbm lum", False), ("global+rolling: retrieval A/B", True)]
    # a speed-only setting is no change; an LM setting changes the LM and every step after it, not the data or split
    changed = copy.deepcopy(WITH_AB)
    changed["rankers"]["dlrm"]["threads"] = 2
    assert changed_steps(load_run_config(None, {**changed, "run_dir": str(run)})) == []
    changed["lm"]["pretrain"]["epochs"] = 3
    changes = changed_steps(load_run_config(None, {**changed, "run_dir": str(run)}))
    own = [c.step for c in changes if not c.only_upstream]
    assert own == ["global+rolling: pretrain"]
    assert {"global+rolling: evaluate LM", "global+rolling: embed", "global+rolling: dlrm lum"} <= {c.step for c in changes}
    assert not {"data", "global+rolling: split"} & {c.step for c in changes}


def test_the_retrieval_ab_step_is_planned_after_the_rankers_only_when_enabled(tmp_path):
    """`retrieval.enabled` (the switch TINY_RUN turns off) adds the A/B step, after the rankers it reads; off, there is
    no such step (the step itself runs in tests/test_pipeline.py, on a copy of the shared run)."""
    steps = {}
    for name, settings in (("off", TINY_RUN), ("on", WITH_AB)):
        planned: dict[str, dict] = {}
        changed_steps(load_run_config(None, {**settings, "run_dir": str(tmp_path / name)}), planned=planned)
        steps[name] = list(planned[str(tmp_path / name)])
    assert "global+rolling: retrieval A/B" not in steps["off"]
    assert [s for s in steps["on"] if s != "global+rolling: retrieval A/B"] == steps["off"]
    assert steps["on"].index("global+rolling: retrieval A/B") > steps["on"].index("global+rolling: lightgbm lum")


def test_lum_run_set_refuses_up_front_on_the_command_line(tmp_path):
    run = tmp_path / "run"
    config = _finished_state(run, TINY_RUN)
    result = CliRunner().invoke(main, ["run", "--config", str(config), "--set", "rankers.lightgbm.num_leaves=31"])
    assert result.exit_code != 0
    assert "ranker.lightgbm.num_leaves: 63 before, 31 now" in result.output and "--- data" not in result.output
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, STATE_FILE]


def test_a_dlrm_is_not_retrained_for_a_lightgbm_setting(tmp_path):
    """train_step stamps the whole RankerConfig (both models' sections): the run hands it the other model's section
    as the saved ranker recorded it, so the stamp still matches."""
    paths = RunPaths(tmp_path)
    before = load_run_config(None, {"rankers": {"lightgbm": {"num_leaves": 63}}}).rankers
    now = load_run_config(None, {"rankers": {"lightgbm": {"num_leaves": 7}, "dlrm": {"epochs": 3}}}).rankers
    saved = before.ranker_config("dlrm", "lum")
    folder = ranker_dir(paths, "global", "dlrm", "lum")
    folder.mkdir(parents=True)
    (folder / "lum_step.json").write_text(json.dumps({"training_set": "x", "config": json.loads(json.dumps(saved.to_json()))}))
    used = ranker_config_as_made(paths, "global", now.ranker_config("dlrm", "lum"))
    expected = {**now.ranker_config("dlrm", "lum").to_json(), "lightgbm": saved.to_json()["lightgbm"]}
    assert json.loads(json.dumps(used.to_json())) == json.loads(json.dumps(expected))  # so train_step's stamp matches
    assert used.dlrm.epochs == 3 and used.lightgbm.num_leaves == 63
    # LightGBM's own section is never taken from the folder; nor anything when no ranker was saved there
    assert ranker_config_as_made(paths, "global", now.ranker_config("lightgbm", "lum")).lightgbm.num_leaves == 7
    assert ranker_config_as_made(paths, "global", now.ranker_config("dlrm", "base")) == now.ranker_config("dlrm", "base")


# ---------------------------------------------------------------------------------------------------- the run lock
REPO = Path(__file__).resolve().parents[1]
HOLD = "import sys, time\nfrom pipelines.run.lock import run_lock\nwith run_lock(sys.argv[1], 'lum run'):\n    print('held', flush=True)\n    time.sleep(600)\n"


def _holder(run: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_the_folder(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        assert is_locked(run) and read_holder(run)["pid"] == proc.pid
        with pytest.raises(RunLockedError, match=f"is in use by pid {proc.pid} on .*lum run"):
            with run_lock(run, "lum data import files"):
                pass
        events = tmp_path / "events.csv"
        events.write_text("user_id,item_id,ts,label\nu,i,2024-01-01,1\n")
        for args in (["data", "import", "files", str(events), "--condition", "surface", "--run", str(run)], ["data", "make", "--run", str(run)],
                     ["run", "--run", str(run)], ["pretrain", "--run", str(run)], ["evaluate", "--run", str(run)],
                     ["ranker", "train", "--run", str(run)], ["features", "apply", "--run", str(run)],
                     ["features", "materialize", "--run", str(run)], ["features", "push", str(events), "--run", str(run)]):
            result = CliRunner().invoke(main, args)
            assert result.exit_code != 0 and f"in use by pid {proc.pid}" in result.output, (args, result.output)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # none of them wrote anything
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no clean exit: the kernel releases the flock
        proc.wait()
    assert not is_locked(run)
    with run_lock(run, "lum data import files"):
        assert read_holder(run)["pid"] == os.getpid() and read_holder(run)["command"] == "lum data import files"
    assert not is_locked(run) and read_holder(run) is None


def test_the_lock_is_reentrant_for_its_holder_and_the_processes_it_starts(tmp_path):
    run = tmp_path / "run"
    with run_lock(run, "lum run"):
        with run_lock(run, "lum data split"):  # the run's steps call what the single-step commands call
            assert is_locked(run)
        assert is_locked(run) and str((run / LOCK_FILE).resolve()) in os.environ[HELD_ENV]
        child = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", "pass"), str(run)], cwd=REPO, capture_output=True,
                               text=True, timeout=60)
        assert child.returncode == 0 and child.stdout.strip() == "held", child.stderr  # e.g. `lum embed`, started by the run
        stranger = subprocess.run([sys.executable, "-c", HOLD, str(run)], cwd=REPO, capture_output=True, text=True, timeout=60,
                                  env={k: v for k, v in os.environ.items() if k != HELD_ENV})
        assert stranger.returncode != 0 and f"in use by pid {os.getpid()}" in stranger.stderr
    assert HELD_ENV not in os.environ and not is_locked(run)


# ---------------------------------------------------------------------------------------------- atomic writes
def test_concurrent_writers_of_one_file_each_complete_and_leave_one_whole_content(tmp_path):
    """Two writers (threads, as two steps of two processes would be) rewrite the same file; a reader polls it. Each
    write completes (no writer renames the other's temporary file away), the reader only ever sees a whole content,
    the file ends as one of the two, and no temporary file is left."""
    import threading

    from contracts.files import write_bytes_atomic

    target = tmp_path / "run_state.json"
    contents = [bytes([ord("a")]) * (1 << 20), bytes([ord("b")]) * (1 << 20)]
    write_bytes_atomic(contents[0], target)
    start, errors, seen = threading.Barrier(3), [], set()
    stop = threading.Event()

    def write(content: bytes) -> None:
        start.wait()
        try:
            for _ in range(40):
                write_bytes_atomic(content, target)
        except BaseException as exc:  # collected: a thread's exception would otherwise only be printed
            errors.append(exc)

    def read() -> None:
        start.wait()
        while not stop.is_set():
            seen.add(target.read_bytes())

    threads = [threading.Thread(target=write, args=(c,)) for c in contents]
    reader = threading.Thread(target=read)
    for t in [*threads, reader]:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    reader.join()
    assert errors == []
    assert seen <= set(contents) and target.read_bytes() in contents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_state.json"]


def test_a_temporary_file_of_a_live_writer_is_left_alone(tmp_path):
    from contracts.files import remove_abandoned, temporary_name, write_bytes_atomic

    mine = temporary_name(tmp_path / "x.json")
    mine.write_bytes(b"half")  # this process is alive: its write is still going
    write_bytes_atomic(b"{}", tmp_path / "x.json")
    assert mine.exists() and remove_abandoned(tmp_path / "x.json") == []


# ---------------------------------------------------------------------------------------------------- lum status
STEP_THEN_SLEEP = """import sys, time
from pipelines.paths import RunPaths
from pipelines.run.config import load_run_config
from pipelines.run.state import RunState
run = sys.argv[1]
state = RunState(RunPaths(run), load_run_config(None, {"run_dir": run}))
state.step("data", lambda redo: None, print)
state.step("global+rolling: pretrain", lambda redo: time.sleep(600), lambda line: print(line, flush=True))
"""


def _status(run: Path) -> tuple[int, list[dict], str]:
    as_json = CliRunner().invoke(main, ["status", "--run", str(run), "--json"])
    table = CliRunner().invoke(main, ["status", "--run", str(run)])
    assert as_json.exit_code == table.exit_code, (as_json.output, table.output)
    return as_json.exit_code, json.loads(as_json.output), table.output


def test_lum_status_shows_a_killed_step_as_interrupted_and_exits_by_the_runs_state(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", STEP_THEN_SLEEP, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "--- data"
        assert proc.stdout.readline().strip() == "--- global+rolling: pretrain"
        deadline = time.monotonic() + 30  # the step prints its header, then records itself as running
        while json.loads((run / STATE_FILE).read_text())["steps"].get("global+rolling: pretrain", {}).get("status") != "running":
            assert time.monotonic() < deadline, "the step never recorded itself as running"
            time.sleep(0.05)
        code, rows, _ = _status(run)
        assert code == 3 and [r["state"] for r in rows] == ["done", "running"]  # still running: exit 3
        assert rows[1]["pid"] == proc.pid and rows[1]["host"]
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # killed: the step cannot record anything
        proc.wait()
    code, rows, table = _status(run)
    assert [r["state"] for r in rows] == ["done", "interrupted"] and code == 1
    assert "failed or interrupted: global+rolling: pretrain" in table
    # a failed step: 1; every step done: 0
    steps = json.loads((run / STATE_FILE).read_text())
    steps["steps"]["global+rolling: pretrain"] = {"status": "failed", "settings": "x", "values": {}, "seconds": 2.0}
    (run / STATE_FILE).write_text(json.dumps(steps))
    assert _status(run)[0] == 1
    steps["steps"]["global+rolling: pretrain"]["status"] = "done"
    (run / STATE_FILE).write_text(json.dumps(steps))
    assert _status(run)[0] == 0


def test_a_step_stopped_by_ctrl_c_is_recorded_as_interrupted(tmp_path):
    from pipelines.run.state import RunState

    def stop(redo: bool) -> None:
        raise KeyboardInterrupt

    state = RunState(RunPaths(tmp_path), load_run_config(None, {"run_dir": str(tmp_path)}))
    with pytest.raises(KeyboardInterrupt):
        state.step("data", stop, print)
    assert json.loads((tmp_path / STATE_FILE).read_text())["steps"]["data"]["status"] == "interrupted"
    assert _status(tmp_path)[0] == 1


# ------------------------------------------------------------------------------------ paths in a run config file
def test_relative_paths_in_a_run_config_are_relative_to_its_folder_not_the_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": "../runs/mine",
        "data": {"source": "files", "path": "logs/events.csv", "items": str(tmp_path / "items.csv"), "conditions": ["surface"]}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd in (elsewhere, folder, tmp_path):  # the same files from any working directory
        monkeypatch.chdir(cwd)
        loaded = load_run_config(config)
        assert Path(loaded.run_dir).resolve() == tmp_path / "project" / "runs" / "mine"
        assert Path(str(loaded.data.path)).resolve() == folder / "logs" / "events.csv"
        assert loaded.data.items == str(tmp_path / "items.csv")  # absolute: as written
    # the command line's paths (--run, --set) are the working directory's
    monkeypatch.chdir(elsewhere)
    loaded = load_run_config(config, {"run_dir": "here", "data.path": "mine.csv"})
    assert Path(loaded.run_dir).resolve() == elsewhere / "here" and Path(str(loaded.data.path)).resolve() == elsewhere / "mine.csv"
    # a missing events file is named as the config resolved it
    with pytest.raises(FileNotFoundError, match="logs/events.csv"):
        execute(load_run_config(config, {"run_dir": str(tmp_path / "run")}), echo=lambda line: None)


def test_the_shipped_configs_name_the_same_folders_as_before_from_the_repository_root(monkeypatch):
    """configs/*.yaml and examples/tiny-log/run.yaml are written relative to their own folders; read from the
    repository root they give the paths earlier runs recorded (so those runs resume without a settings change)."""
    monkeypatch.chdir(REPO)
    assert load_run_config(REPO / "configs" / "demo.yaml").run_dir == "runs/demo"
    assert load_run_config(REPO / "configs" / "movielens.yaml").data.path == "../shared/data/ml-latest-small"
    example = load_run_config(REPO / "examples" / "tiny-log" / "run.yaml")
    assert (example.run_dir, example.data.path, example.data.items) == ("runs/tiny-log", "examples/tiny-log/events.csv", "examples/tiny-log/items.csv")


# ---------------------------------------------------------------------------------------------------- tracking
def _finished_folder(run: Path) -> None:
    """A run folder as a finished `lum run` leaves what tracking reads: run_state.json, the rankers' and the LM's
    evaluations, the report (hand-built: tracking reads files, it trains nothing)."""
    from pipelines.run.config import config_dict

    config = load_run_config(None, {**TINY_RUN, "run_dir": str(run)})
    steps = {"data": {"status": "done", "settings": "a", "values": {}, "seconds": 1.5},
             "global+rolling: pretrain": {"status": "done", "settings": "b", "values": {}, "seconds": 12.0}}
    (run / "evaluations" / "rankers").mkdir(parents=True)
    (run / STATE_FILE).write_text(json.dumps({"config": config_dict(config), "steps": steps}))
    for i, (model, variant) in enumerate([(m, v) for m in ("dlrm", "lightgbm") for v in ("base", "lum")]):
        overall = {"rows": 100, "auc": 0.6 + i / 100, "gauc": 0.55 + i / 100, "logloss": 0.4, "ne": 0.9, "calibration": 1.0}
        (run / "evaluations" / "rankers" / f"global-{model}-{variant}.json").write_text(json.dumps({"overall": overall}))
    (run / "evaluations" / "rankers" / "global-dlrm-din.json").write_text(json.dumps({"overall": {"auc": 0.9}}))  # not configured
    (run / "evaluations" / "global-tiny.json").write_text(json.dumps({"overall": {"model": {"hr@10": 0.15, "ndcg@10": 0.09}}}))
    (run / "report").mkdir()
    (run / "report" / "report.html").write_text("<html></html>")
    (run / "report" / "report.json").write_text("{}")


def test_a_finished_run_is_logged_to_mlflow_with_its_params_metrics_and_report(tmp_path):
    from mlflow.tracking import MlflowClient  # the `tracking` extra of make install: never skipped

    from pipelines.run.tracking import log_run_to_mlflow

    run = tmp_path / "run"
    _finished_folder(run)
    uri = (tmp_path / "mlruns").as_uri()
    run_id = log_run_to_mlflow(run, uri, experiment="issue-35")
    client = MlflowClient(tracking_uri=uri)
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run"
    assert client.get_experiment(logged.info.experiment_id).name == "issue-35"
    params, metrics = logged.data.params, logged.data.metrics
    assert params["rankers.lightgbm.num_leaves"] == "63" and params["lm.pretrain.preset"] == "tiny" and params["data.source"] == "simulator"
    for model in ("dlrm", "lightgbm"):
        for variant in ("base", "lum"):
            assert f"ranker.global-{model}-{variant}.auc" in metrics and f"ranker.global-{model}-{variant}.gauc" in metrics
    assert metrics["ranker.global-lightgbm-lum.auc"] == pytest.approx(0.63)
    assert metrics["lm.global-tiny.model.hr_10"] == pytest.approx(0.15)  # `@` is not allowed in an MLflow key
    assert metrics["seconds.global_rolling_ pretrain"] == 12.0  # the step `global+rolling: pretrain`
    assert not [k for k in metrics if "din" in k]  # a ranker the config does not train is not reported
    artifacts = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {"report/report.html", "report/report.json"} <= artifacts and STATE_FILE in {a.path for a in client.list_artifacts(run_id)}


@pytest.mark.slow  # a child Python process imports the run modules
def test_tracking_is_wired_from_the_run_config_and_absent_without_it(tmp_path):
    """`tracking: {mlflow: URI}` is a run-config key; without it a run never imports mlflow; with it and no mlflow
    installed, `lum run` says so before any work."""
    config = load_run_config(None, {"run_dir": str(tmp_path / "run"), "tracking": {"mlflow": "file:///nowhere", "experiment": "x"}})
    assert config.tracking.mlflow == "file:///nowhere" and load_run_config(None).tracking.mlflow is None
    code = ("import sys\nfrom pipelines.run.config import load_run_config\nimport pipelines.run.execute, pipelines.run.tracking\n"
            "load_run_config(None)\nprint('mlflow' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
    try:
        import mlflow  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="tracking.mlflow: file:///nowhere asks for MLflow tracking, but mlflow is not installed"):
            execute(config, echo=_no_step_may_start)
        assert not (tmp_path / "run").exists()


def test_a_config_extends_another_sections_merge_and_lists_replace(tmp_path):
    """`extends:` takes the base file's settings (its relative paths against its own folder) and changes what the
    file sets: a section merges key by key, a list or a value replaces the base's; cycles and missing bases are
    one-line errors naming the files."""
    from pipelines.run.config import ConfigError

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "base.yaml").write_text(
        "run_dir: runs/base\ndata: {source: files, path: log.parquet, conditions: [surface]}\n"
        "rankers: {models: [dlrm, lightgbm], variants: [base, lum], lightgbm: {num_leaves: 15}}\n")
    (tmp_path / "child.yaml").write_text("extends: base/base.yaml\nrun_dir: runs/child\nrankers: {variants: [din], lightgbm: {min_data_in_leaf: 7}}\n")
    config = load_run_config(tmp_path / "child.yaml")
    assert Path(config.run_dir).resolve() == (tmp_path / "runs" / "child").resolve()
    assert Path(config.data.path).resolve() == (tmp_path / "base" / "log.parquet").resolve()  # the base's folder
    assert list(config.rankers.models) == ["dlrm", "lightgbm"]  # from the base
    assert list(config.rankers.variants) == ["din"]  # a list replaces
    assert config.rankers.lightgbm.num_leaves == 15 and config.rankers.lightgbm.min_data_in_leaf == 7  # a section merges
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_run_config(tmp_path / "a.yaml")
    (tmp_path / "lost.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="lost.yaml: 'extends: nowhere.yaml' names no file"):
        load_run_config(tmp_path / "lost.yaml")


def test_the_demo_is_written_once_and_lum_demo_options_override_it():
    """configs/demo.yaml is the demo; the side-by-side and contexts configs extend it and change only what they name;
    `lum demo`'s options are overrides of those files."""
    from pipelines.cli.run import demo_config
    from pipelines.run.config import config_dict

    configs = REPO / "configs"
    for name in ("demo-side-by-side.yaml", "demo-contexts.yaml"):
        assert yaml.safe_load((configs / name).read_text())["extends"] == "demo.yaml"
    demo = config_dict(load_run_config(configs / "demo.yaml"))
    quick = config_dict(demo_config("runs/quick", preset="tiny", epochs=1, snapshot_engine="torch"))
    assert quick["data"]["preset"] == "tiny" and quick["lm"]["pretrain"]["epochs"] == 1 and quick["run_dir"] == "runs/quick"
    assert [p["engine"] for p in quick["protocols"]] == ["torch"]
    for key in ("data", "lm", "protocols", "run_dir"):
        quick.pop(key), demo.pop(key)
    assert quick == demo  # nothing else differs from the file
    side = config_dict(demo_config("runs/side", snapshot_engine="torch", rolling=True))
    assert [(p["features"], p["engine"]) for p in side["protocols"]] == [("snapshot", "torch"), ("rolling", "torch")]
