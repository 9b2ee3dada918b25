"""The `lum` command line: data commands, config defaults, resumable steps, clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from pipelines.cli import main

LUM = shutil.which("lum", path=str(Path(sys.executable).parent)) or "lum"


def run(*args: str) -> "Result":
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.e2e  # `lum` subprocesses
def test_validate_names_a_wrongly_typed_column_and_exits_non_zero(tmp_path):
    """Through the installed console script, as a user would run it."""
    path = tmp_path / "events.parquet"
    pq.write_table(pa.table({"user_id": ["u1"], "item_id": ["i1"], "ts": [1.7e9], "label": [1], "hour": ["late"]}), path)
    done = subprocess.run([LUM, "data", "validate", str(path), "--extra", "hour:request:int64"], capture_output=True, text=True)
    assert done.returncode != 0
    assert f"{path}: column 'hour': has type string; the contract declares it as int64" in done.stderr
    ok = subprocess.run([LUM, "data", "validate", str(path), "--extra", "hour"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "1 valid events" in ok.stdout


def test_validate_quarantine_mode_reports_reasons(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,ts,label\nu1,i1,1700000000,1\nu1,i2,1700000001,5\n,i3,1700000002,0\n")
    result = run("data", "validate", str(path), "--on-bad", "quarantine")
    assert result.exit_code == 1
    assert "1 valid events" in result.output
    assert "1 x label: hold values other than 0/1" in result.output
    assert "1 x user_id: are null, empty or only whitespace" in result.output


def test_make_is_resumable_and_never_overwrites_silently(tmp_path):
    run_dir = str(tmp_path / "run")
    first = run("data", "make", "--preset", "tiny", "--run", run_dir)
    assert first.exit_code == 0 and "wrote" in first.output
    mtime = (tmp_path / "run/data/events.parquet").stat().st_mtime_ns
    again = run("data", "make", "--preset", "tiny", "--run", run_dir)
    assert "up to date" in again.output
    assert (tmp_path / "run/data/events.parquet").stat().st_mtime_ns == mtime
    other = CliRunner().invoke(main, ["data", "make", "--preset", "tiny", "--seed", "3", "--run", run_dir])
    assert other.exit_code != 0 and "pass --force" in other.output
    forced = run("data", "make", "--preset", "tiny", "--seed", "3", "--run", run_dir, "--force")
    assert forced.exit_code == 0
    assert json.loads((tmp_path / "run/data/dataset.json").read_text())["source"]["config"]["seed"] == 3


def test_split_and_describe(tmp_path):
    run_dir = str(tmp_path / "run")
    run("data", "make", "--preset", "tiny", "--run", run_dir)
    split = run("data", "split", "--protocol", "per-user", "--run", run_dir)
    assert split.exit_code == 0
    summary = json.loads((tmp_path / "run/splits/per-user/summary.json").read_text())
    assert summary["config"]["protocol"] == "per-user"
    assert sum(w["events"] for w in summary["windows"].values()) == summary["all"]["events"]
    assert "up to date" in run("data", "split", "--protocol", "per-user", "--run", run_dir).output
    changed = CliRunner().invoke(main, ["data", "split", "--protocol", "per-user", "--fractions", "0.5", "0.25", "0.25", "--run", run_dir])
    assert changed.exit_code != 0 and "--force" in changed.output
    described = run("data", "describe", run_dir)
    assert "split 'per-user'" in described.output and "condition 'surface'" in described.output
    as_json = json.loads(run("data", "describe", run_dir, "--json").output)
    assert as_json["events"]["users"] == 300


def test_split_before_data_says_what_to_run(tmp_path):
    result = CliRunner().invoke(main, ["data", "split", "--run", str(tmp_path / "empty")])
    assert result.exit_code != 0 and "lum data make" in result.output


def test_config_file_gives_defaults_and_flags_win(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  make:\n    preset: tiny\n    seed: 5\n    run_dir: {tmp_path / 'from-config'}\n")
    assert run("--defaults", str(config), "data", "make").exit_code == 0
    info = json.loads((tmp_path / "from-config/data/dataset.json").read_text())
    assert info["source"]["config"]["seed"] == 5 and info["source"]["config"]["n_users"] == 300
    assert run("--defaults", str(config), "data", "make", "--seed", "6", "--run", str(tmp_path / "flag")).exit_code == 0
    assert json.loads((tmp_path / "flag/data/dataset.json").read_text())["source"]["config"]["seed"] == 6
    # the former name still reads the same file; the help names only --defaults (lum run --config is a run config)
    assert run("--config", str(config), "data", "make", "--run", str(tmp_path / "old-name")).exit_code == 0
    assert json.loads((tmp_path / "old-name/data/dataset.json").read_text())["source"]["config"]["seed"] == 5
    top = run("--help").output
    assert "--defaults" in top and "--config " not in top and "--config," not in top


def test_import_files_with_mapping_and_quarantine(tmp_path):
    events = tmp_path / "log.csv"
    events.write_text(
        "uid,item,when,clicked,surface,note\n"
        "1,a,2024-01-01T00:00:00Z,1,home,x\n"
        "1,b,2024-01-01T00:01:00Z,0,search,y\n"
        "2,a,not-a-time,1,home,z\n"
    )
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\na,Alpha\nb,Beta\n")
    args = ["data", "import", "files", str(events), "--items", str(items), "--map", "user_id=uid", "--map", "item_id=item",
            "--map", "ts=when", "--map", "label=clicked", "--condition", "surface", "--ignore", "note", "--run", str(tmp_path / "run")]
    failed = CliRunner().invoke(main, args)
    assert failed.exit_code != 0 and "column 'ts'" in failed.output and "row 3: 'not-a-time'" in failed.output
    assert not (tmp_path / "run/data/events.parquet").exists()  # nothing half-written
    done = run(*args, "--on-bad", "quarantine")
    assert done.exit_code == 0 and "set aside 1 rejected rows" in done.output
    assert pq.read_table(tmp_path / "run/data/events.parquet").num_rows == 2
    assert pq.read_table(tmp_path / "run/data/items.parquet").column("title").to_pylist() == ["Alpha", "Beta"]
    assert pq.read_table(tmp_path / "run/data/events.quarantine.parquet").column("row").to_pylist() == [3]


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))


@pytest.mark.parametrize("command", [(), *list(_commands(main))], ids=lambda c: " ".join(c) or "lum")
def test_help_everywhere(command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


@pytest.mark.e2e  # `lum` subprocesses
def test_version_log_level_and_progress_conventions(tmp_path, monkeypatch):
    from importlib import metadata

    from contracts.progress import PROGRESS_ENV, bars_off

    done = subprocess.run([LUM, "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"lum, version {metadata.version('lum-user-model')}"
    # bars: on only when asked and (LUM_PROGRESS unset) stderr is a terminal; --no-progress / --progress decide for child processes
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert bars_off(False) is True
    assert bars_off(True) is (not sys.stderr.isatty())
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert bars_off(True) is False and bars_off(False) is True
    result = CliRunner().invoke(main, ["--no-progress", "data", "make", "--preset", "tiny", "--run", str(tmp_path / "run")])
    assert result.exit_code == 0 and "simulating users" not in result.output
    import os

    assert os.environ[PROGRESS_ENV] == "0"
    # a log written to a file: no bar redraws at all
    log = tmp_path / "make.log"
    with log.open("w") as out:
        subprocess.run([LUM, "-q", "data", "make", "--preset", "tiny", "--run", str(tmp_path / "run2")], stdout=out, stderr=out, check=True,
                       env={k: v for k, v in os.environ.items() if k != PROGRESS_ENV})
    assert "\r" not in log.read_text() and "wrote" in log.read_text()
    bad = CliRunner().invoke(main, ["--log-level", "LOUD", "data", "describe"])
    assert bad.exit_code != 0 and "LOUD" in bad.output


def test_options_come_from_the_config_dataclasses():
    """A command's option defaults are its component's config defaults, and bad values name the option."""
    from lum.embed_job import EmbedJobConfig
    from lum.pretrain import PretrainConfig
    from lum.tokenizer import TokenizerConfig
    from pipelines.cli.lm import embed_command, pretrain_command, pretrain_configs
    from pipelines.cli.options import build_config

    params = dict(pretrain_command.make_context("pretrain", []).params)
    assert pretrain_configs(params) == (PretrainConfig(), TokenizerConfig())
    params = dict(embed_command.make_context("embed", ["--model", ".", "--events", "pyproject.toml", "--as-of", "2025-01-01", "--out", "x",
                                                       "--vllm-block-size", "64", "--no-vllm-enable-prefix-caching"]).params)
    config = build_config(EmbedJobConfig, {k: v for k, v in params.items()})
    assert config.vllm.block_size == 64 and config.vllm.enable_prefix_caching is False and config.shards == EmbedJobConfig().shards
    result = CliRunner().invoke(main, ["pretrain", "--epochs", "0", "--run", "nowhere"])
    assert result.exit_code == 2 and "--epochs: Input should be greater than or equal to 1" in result.output
    nested = CliRunner().invoke(main, ["embed", "--model", ".", "--events", "pyproject.toml", "--as-of", "2025-01-01", "--out", "x",
                                       "--vllm-block-size", "0"])
    assert nested.exit_code == 2 and "--vllm-block-size: Input should be greater than or equal to 1" in nested.output


def test_a_changed_file_at_the_same_path_is_never_taken_as_up_to_date(tmp_path):
    """Re-importing compares the files' content (sha256), the contract and the options, not the path alone."""
    events = tmp_path / "log.csv"
    events.write_text("user_id,item_id,ts,label,surface\n1,a,2024-01-01T00:00:00Z,1,home\n1,b,2024-01-01T00:01:00Z,0,home\n")
    args = ["data", "import", "files", str(events), "--run", str(tmp_path / "run")]
    assert run(*args, "--condition", "surface").exit_code == 0
    again = run(*args, "--condition", "surface")
    assert again.exit_code == 0 and "up to date" in again.output
    events.write_text(events.read_text() + "2,a,2024-01-01T00:02:00Z,1,cart\n")  # same path, same size class, new content
    changed = run(*args, "--condition", "surface")
    assert changed.exit_code != 0 and "events_sha256" in changed.output and "content changed" in changed.output
    assert pq.read_table(tmp_path / "run/data/events.parquet").num_rows == 2  # the old data is kept, never mixed
    forced = run(*args, "--condition", "surface", "--force")
    assert forced.exit_code == 0 and pq.read_table(tmp_path / "run/data/events.parquet").num_rows == 3
    other_contract = run(*args, "--ignore", "surface")  # the same file read under another contract is other data too
    assert other_contract.exit_code != 0 and "contract" in other_contract.output
