"""`lum data ...`: make, import, validate, split and describe event logs (the steps are pipelines.steps.data)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from pipelines.cli.common import DEFAULT_RUN, UP_TO_DATE, _friendly_errors, force_option, run_option
from pipelines.cli.options import build_config, config_options
from pipelines.data.contract import METADATA_KEY, EventContract, read_table, validate_events
from pipelines.data.sources.files import FilesConfig
from pipelines.data.split import SplitConfig
from pipelines.paths import RunPaths
from pipelines.run.config import DataConfig
from pipelines.run.lock import run_lock
from pipelines.steps import data as data_steps

_DATA = DataConfig()


@click.group()
def data() -> None:
    """Event logs: make, import, validate, split and describe."""




def _say(result: dict[str, Any] | str, paths: RunPaths, what: str) -> None:
    for line, warning in data_steps.result_lines(result, paths, what):
        click.echo(line, err=warning)


@data.command("make")
@click.option("--preset", type=click.Choice(["tiny", "default", "large"]), default=_DATA.preset, help="Simulator size.")
@click.option("--seed", type=int, default=_DATA.seed, help="Random seed: the same seed gives the same data.")
@click.option("--users", "n_users", type=int, default=None, help="Override the preset's number of users.")
@run_option
@force_option
@_friendly_errors
def data_make(preset: str, seed: int, n_users: int | None, run_dir: str, force: bool) -> None:
    """Simulate a marketplace event log (the embedded default data) into the run folder."""
    paths = RunPaths(run_dir)
    started = time.perf_counter()
    with run_lock(run_dir, "lum data make"):  # one writer per run folder (pipelines/run/lock.py)
        info = data_steps.simulate(paths, preset, seed, n_users, force)
    _say(info, paths, f"simulator preset {preset}, seed {seed}")
    if info != UP_TO_DATE:
        click.echo(f"simulated in {time.perf_counter() - started:.1f} s")


@data.group("import")
def data_import() -> None:
    """Import an event log from MovieLens or from your own files."""


# `lum data import files` and `lum data validate` take lum's FilesConfig (its items option only where a file is imported)
FILES_NAMES = {"conditions": "condition", "extras": "extra"}


@data_import.command("movielens")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--like-threshold", type=float, default=_DATA.like_threshold, help="label = 1 when rating >= this.")
@click.option("--on-bad", type=click.Choice(["fail", "quarantine"]), default=_DATA.on_bad, help="What to do with bad rows.")
@run_option
@force_option
@_friendly_errors
def data_import_movielens(path: str, like_threshold: float, on_bad: str, run_dir: str, force: bool) -> None:
    """Import a MovieLens folder (100K, 1M, or latest/25M layout, detected)."""
    paths = RunPaths(run_dir)
    with run_lock(run_dir, "lum data import movielens"):
        _say(data_steps.import_movielens(paths, path, like_threshold, on_bad, force), paths, path)


@data_import.command("files")
@click.argument("events", type=click.Path(exists=True, dir_okay=False))
@config_options(FilesConfig, rename=FILES_NAMES)
@run_option
@force_option
@_friendly_errors
def data_import_files(events: str, run_dir: str, force: bool, **options: Any) -> None:
    """Import your own event log (Parquet or CSV following the contract)."""
    paths = RunPaths(run_dir)
    with run_lock(run_dir, "lum data import files"):
        _say(data_steps.import_files(paths, events, build_config(FilesConfig, options, rename=FILES_NAMES), force), paths, events)


@data.command("validate")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@config_options(FilesConfig, rename=FILES_NAMES, exclude=("items", "items_map"))
@_friendly_errors
def data_validate(path: str, **options: Any) -> None:
    """Check an event file against the contract; exit non-zero naming the first problem.

    A Parquet file written by `lum` carries its contract; for other files declare the condition and extra
    columns with --condition / --extra.
    """
    files = build_config(FilesConfig, options, rename=FILES_NAMES)
    table = read_table(path, files.column_map()).drop_columns(list(files.ignore))
    meta = table.schema.metadata or {}
    if not files.conditions and not files.extras and METADATA_KEY in meta:
        contract = EventContract.from_json(meta[METADATA_KEY])
    else:
        contract = files.contract()
    result = validate_events(table, contract, source=str(path), options=files.validation_options())
    click.echo(f"{path}: {result.events.num_rows:,} valid events")
    for note in result.coercions:
        click.echo(f"  coerced {note}")
    if result.n_rejected:
        click.echo(f"{path}: {result.n_rejected:,} rows would be set aside:", err=True)
        for reason, count in result.rejected["reason"].value_counts().items():
            click.echo(f"  {count:,} x {reason}", err=True)
        sys.exit(1)


@data.command("split")
@config_options(SplitConfig)
@run_option
@force_option
@_friendly_errors
def data_split(run_dir: str, force: bool, **options: Any) -> None:
    """Split the run's events into pretraining, ranker-training and test windows."""
    from pipelines.data.split import format_summary

    config = build_config(SplitConfig, options)
    paths = RunPaths(run_dir)
    with run_lock(run_dir, "lum data split"):
        summary = data_steps.split(paths, config, force)
    if summary == UP_TO_DATE:
        click.echo(f"{paths.split_dir(config.protocol)} is up to date: skipped")
        click.echo(format_summary(json.loads(paths.split_summary(config.protocol).read_text())))
        return
    click.echo(f"wrote {paths.split_dir(config.protocol)}")
    click.echo(format_summary(summary))


@data.command("describe")
@click.argument("path", type=click.Path(exists=True), default=None, required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@_friendly_errors
def data_describe(path: str | None, as_json: bool) -> None:
    """Describe a run folder (default: runs/main) or a validated events file."""
    from pipelines.data.describe import describe_path

    info, text = describe_path(path or DEFAULT_RUN)
    click.echo(json.dumps(info, indent=2, default=str) if as_json else text)
