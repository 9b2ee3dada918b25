"""`lum data ...`: make, import, validate, split and describe event logs (the steps are pipelines.steps.data)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable

import click

from pipelines.cli.common import DEFAULT_RUN, UP_TO_DATE, _friendly_errors, force_option, run_option
from pipelines.cli.options import build_config, config_options
from pipelines.data.contract import METADATA_KEY, EventContract, ValidationOptions, read_table, utc_timestamp, validate_events
from pipelines.data.split import SplitConfig
from pipelines.paths import RunPaths
from pipelines.run.config import DataConfig
from pipelines.steps import data as data_steps

_DATA = DataConfig()


@click.group()
def data() -> None:
    """Event logs: make, import, validate, split and describe."""




def _report_written(info: dict[str, Any], paths: RunPaths) -> None:
    click.echo(f"wrote {info['n_events']:,} events to {paths.events}")
    if info.get("n_items_table") is not None:
        click.echo(f"wrote {info['n_items_table']:,} items to {paths.items}")
    if info["n_rejected"]:
        click.echo(f"set aside {info['n_rejected']:,} rejected rows with their reasons in {paths.quarantine}", err=True)


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
    info = data_steps.simulate(paths, preset, seed, n_users, force)
    if info == UP_TO_DATE:
        click.echo(f"{paths.events} is up to date (simulator preset {preset}, seed {seed}): skipped")
        return
    _report_written(info, paths)
    click.echo(f"simulated in {time.perf_counter() - started:.1f} s")


@data.group("import")
def data_import() -> None:
    """Import an event log from MovieLens or from your own files."""


def _validation_options(ts_unit: str, min_ts: str | None, max_ts: str | None, on_bad: str) -> ValidationOptions:
    options = ValidationOptions(ts_unit=ts_unit, on_bad=on_bad)  # type: ignore[arg-type]
    if min_ts:
        options.min_ts = utc_timestamp(min_ts)
    if max_ts:
        options.max_ts = utc_timestamp(max_ts)
    return options


def _validation_flags(fn: Callable) -> Callable:
    for decorator in reversed(
        [
            click.option("--ts-unit", type=click.Choice(["auto", "s", "ms", "us", "ns"]), default="auto", help="Unit of numeric epoch timestamps."),
            click.option("--min-ts", default=None, help="Earliest allowed event time [default: 1990-01-01]."),
            click.option("--max-ts", default=None, help="Latest allowed event time [default: now + 1 day]."),
            click.option(
                "--on-bad",
                type=click.Choice(["fail", "quarantine"]),
                default="fail",
                help="fail: stop at the first bad rows; quarantine: set bad rows aside with their reasons.",
            ),
        ]
    ):
        fn = decorator(fn)
    return fn


def _contract_flags(fn: Callable) -> Callable:
    for decorator in reversed(
        [
            click.option("--condition", "conditions", multiple=True, help="Condition column NAME[:known_at] (repeatable)."),
            click.option("--extra", "extras", multiple=True, help="Extra column NAME[:known_at[:type]] (repeatable)."),
            click.option("--map", "mappings", multiple=True, help="Column mapping contract_name=source_name (repeatable)."),
            click.option("--ignore", "ignored", multiple=True, help="Source column to leave out on purpose (repeatable)."),
        ]
    ):
        fn = decorator(fn)
    return fn


def _parse_mappings(mappings: tuple[str, ...]) -> dict[str, str]:
    """`contract=source` pairs -> {source: contract}."""
    out: dict[str, str] = {}
    for text in mappings:
        if "=" not in text:
            raise click.BadParameter(f"'{text}': expected contract_name=source_name", param_hint="--map")
        contract_name, source_name = text.split("=", 1)
        out[source_name] = contract_name
    return out


@data_import.command("movielens")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--like-threshold", type=float, default=_DATA.like_threshold, help="label = 1 when rating >= this.")
@click.option("--on-bad", type=click.Choice(["fail", "quarantine"]), default="fail", help="What to do with bad rows.")
@run_option
@force_option
@_friendly_errors
def data_import_movielens(path: str, like_threshold: float, on_bad: str, run_dir: str, force: bool) -> None:
    """Import a MovieLens folder (100K, 1M, or latest/25M layout, detected)."""
    paths = RunPaths(run_dir)
    info = data_steps.import_movielens(paths, path, like_threshold, on_bad, force)
    if info == UP_TO_DATE:
        click.echo(f"{paths.events} is up to date ({path}): skipped")
        return
    _report_written(info, paths)


@data_import.command("files")
@click.argument("events", type=click.Path(exists=True, dir_okay=False))
@click.option("--items", type=click.Path(exists=True, dir_okay=False), default=None, help="Items table (item_id + content).")
@_contract_flags
@_validation_flags
@run_option
@force_option
@_friendly_errors
def data_import_files(events, items, conditions, extras, mappings, ignored, ts_unit, min_ts, max_ts, on_bad, run_dir, force) -> None:
    """Import your own event log (Parquet or CSV following the contract)."""
    paths = RunPaths(run_dir)
    info = data_steps.import_files(paths, events, EventContract.from_specs(conditions, extras), items, _parse_mappings(mappings),
                                   tuple(ignored), _validation_options(ts_unit, min_ts, max_ts, on_bad), force)
    if info == UP_TO_DATE:
        click.echo(f"{paths.events} is up to date ({events}): skipped")
        return
    _report_written(info, paths)


@data.command("validate")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@_contract_flags
@_validation_flags
@_friendly_errors
def data_validate(path, conditions, extras, mappings, ignored, ts_unit, min_ts, max_ts, on_bad) -> None:
    """Check an event file against the contract; exit non-zero naming the first problem.

    A Parquet file written by `lum` carries its contract; for other files declare the condition and extra
    columns with --condition / --extra.
    """
    table = read_table(path, _parse_mappings(mappings)).drop_columns(list(ignored))
    meta = table.schema.metadata or {}
    if not conditions and not extras and METADATA_KEY in meta:
        contract = EventContract.from_json(meta[METADATA_KEY])
    else:
        contract = EventContract.from_specs(conditions, extras)
    result = validate_events(table, contract, source=str(path), options=_validation_options(ts_unit, min_ts, max_ts, on_bad))
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
