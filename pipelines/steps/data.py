"""Run-folder steps of the data: simulate or import an event log, split it into windows.

Each step returns what it wrote, or `UP_TO_DATE` when the run folder already held exactly that output; it never
replaces different data unless `force` is given (nothing is overwritten silently).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from pipelines.data.sources.base import check_lines
from pipelines.data.sources.files import FilesConfig
from pipelines.data.split import SplitConfig
from pipelines.paths import RunPaths
from pipelines.steps import UP_TO_DATE


def _same_source(paths: RunPaths, source: dict[str, Any], force: bool) -> bool:
    """True when the run folder already holds exactly this source's data (skip); an error on different data."""
    if not paths.dataset_info.exists() or force:
        return False
    existing = json.loads(paths.dataset_info.read_text())["source"]
    wanted = json.loads(json.dumps(source))
    if wanted == existing:
        return True
    changed = sorted(k for k in {*wanted, *existing} if wanted.get(k) != existing.get(k))
    hint = " (the file's content changed)" if any(k.endswith("_sha256") for k in changed) else ""
    raise FileExistsError(
        f"{paths.root} already holds data from {existing.get('name')} with other {', '.join(changed)}{hint}; pass --force to "
        "replace it or choose another run folder (nothing is overwritten silently)"
    )


# above this share of quarantined rows the import says so as a warning with the share (issue 35)
QUARANTINE_WARN_SHARE = 0.01


def result_lines(result: dict[str, Any] | str, paths: RunPaths, what: str = "") -> list[tuple[str, bool]]:
    """What a data step did, for the user: (line, is a warning) pairs; `what` names the source of a skipped step."""
    if result == UP_TO_DATE:
        return [(f"{paths.events} is up to date{f' ({what})' if what else ''}: skipped", False)]
    lines = [(f"wrote {result['n_events']:,} events to {paths.events}", False)]
    if result.get("n_items_table") is not None:
        lines.append((f"wrote {result['n_items_table']:,} items to {paths.items}", False))
    n_rejected, n_events = result["n_rejected"], result["n_events"]
    total = n_events + n_rejected
    if n_rejected:
        lines.append((f"set aside {n_rejected:,} rejected rows with their reasons in {paths.quarantine}", True))
    if n_rejected > QUARANTINE_WARN_SHARE * total:
        # more than a few stray rows: a wrong column, unit or encoding more likely than bad luck, so say how much
        lines.append((f"warning: {n_rejected / total:.1%} of rows ({n_rejected:,} of {total:,}) quarantined: see {paths.quarantine}", True))
    lines += [(f"warning: {line}", True) for line in check_lines(result.get("checks"), n_events)]
    return lines


def simulate(paths: RunPaths, preset: str, seed: int, n_users: int | None = None, force: bool = False) -> dict[str, Any] | str:
    """The embedded simulator's event log (and items table) into the run folder."""
    from pipelines.data.sources import simulator

    overrides: dict[str, Any] = {"seed": seed}
    if n_users is not None:
        overrides["n_users"] = n_users
    config = simulator.preset(preset, **overrides)
    if _same_source(paths, {"name": "simulator", "config": asdict(config)}, force):
        return UP_TO_DATE
    return simulator.simulate_to_run(config, paths)


def import_movielens(paths: RunPaths, path: str, like_threshold: float, on_bad: str = "fail", force: bool = False) -> dict[str, Any] | str:
    """A MovieLens folder (100K, 1M, or the latest / 25M layout) into the run folder."""
    from pipelines.data.sources.base import write_source_output
    from pipelines.data.sources.movielens import load_movielens

    output = load_movielens(path, like_threshold=like_threshold, on_bad=on_bad)
    if _same_source(paths, output.source, force):
        return UP_TO_DATE
    return write_source_output(output, paths)


def import_files(paths: RunPaths, events: str, files: FilesConfig, force: bool = False) -> dict[str, Any] | str:
    """Your own event log (Parquet or CSV following the contract) into the run folder."""
    from pipelines.data.sources.base import write_source_output
    from pipelines.data.sources.files import load_files

    output = load_files(events, files.contract(), items_path=files.items, column_map=files.column_map(), ignore=tuple(files.ignore),
                        options=files.validation_options(), items_column_map=files.items_column_map())
    if _same_source(paths, output.source, force) and not len(output.rejected):
        return UP_TO_DATE
    return write_source_output(output, paths)


def imported(paths: RunPaths) -> str:
    """A run folder whose data was imported before (`lum data import files --run DIR`): nothing to do but check it."""
    from pipelines.data.sources.base import read_dataset_info

    read_dataset_info(paths)  # a clear error, naming the folder, when nothing was imported there
    return UP_TO_DATE


def split(paths: RunPaths, config: SplitConfig, force: bool = False) -> dict[str, Any] | str:
    """The run's events into pretraining, ranker-training and test windows; the split summary, or UP_TO_DATE."""
    from pipelines.data.sources.base import read_dataset_info
    from pipelines.data.split import dataset_fingerprint, split_run

    read_dataset_info(paths)  # a clear error when there is no data yet
    fingerprint = dataset_fingerprint(paths)
    summary_file = paths.split_summary(config.protocol)
    if summary_file.exists() and not force:
        existing = json.loads(summary_file.read_text())
        if existing.get("dataset_fingerprint") == fingerprint:
            if existing["config"] == json.loads(json.dumps(asdict(config))):
                return UP_TO_DATE
            raise FileExistsError(
                f"{paths.split_dir(config.protocol)} already holds a {config.protocol} split with other settings "
                f"({existing['config']}); pass --force to replace it"
            )
    return split_run(paths, config)
