"""What every data source produces, and how it lands in a run folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from contracts import files
from pipelines.data.contract import METADATA_KEY, EventContract, write_parquet_atomic
from pipelines.paths import RunPaths


@dataclass
class SourceOutput:
    """A source's result: contract-conforming events, an optional items table, and what was set aside."""

    events: pa.Table  # validated; the EventContract is in the schema metadata
    items: pa.Table | None
    source: dict[str, Any]  # name and parameters, recorded in dataset.json
    rejected: pd.DataFrame = field(default_factory=pd.DataFrame)
    coercions: list[str] = field(default_factory=list)

    @property
    def contract(self) -> EventContract:
        return EventContract.from_json(self.events.schema.metadata[METADATA_KEY])


def write_source_output(output: SourceOutput, paths: RunPaths) -> dict[str, Any]:
    """Write events, items, quarantined rows and dataset.json into `paths.data_dir`, each file atomically.

    dataset.json is written last: its presence marks a finished data step.
    """
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    paths.dataset_info.unlink(missing_ok=True)
    write_parquet_atomic(output.events, paths.events)
    if output.items is not None:
        write_parquet_atomic(output.items, paths.items)
    else:
        paths.items.unlink(missing_ok=True)
    if len(output.rejected):
        write_parquet_atomic(pa.Table.from_pandas(output.rejected, preserve_index=False), paths.quarantine)
    else:
        paths.quarantine.unlink(missing_ok=True)
    return write_dataset_info(
        paths,
        source=output.source,
        contract=output.contract,
        coercions=output.coercions,
        n_events=output.events.num_rows,
        n_items=None if output.items is None else output.items.num_rows,
        n_rejected=len(output.rejected),
        checks=data_checks(output.events, output.items, output.contract),
    )


def data_checks(events: pa.Table, items: pa.Table | None, contract: EventContract) -> dict[str, Any]:
    """What the import kept although it is incomplete, counted for the summary and dataset.json (docs/data.md):

    unknown_conditions        events per condition column with no value (null: the "unknown condition" token)
    events_item_not_in_items  events whose item has no row in the items table (None without an items table)
    items_not_in_items        those events' distinct items
    """
    checks: dict[str, Any] = {
        "unknown_conditions": {name: int(events.column(name).null_count) for name in contract.condition_names},
        "events_item_not_in_items": None,
        "items_not_in_items": None,
    }
    if items is not None:
        missing = pc.invert(pc.is_in(events.column("item_id"), value_set=items.column("item_id").combine_chunks()))
        checks["events_item_not_in_items"] = int(pc.sum(missing).as_py() or 0)
        checks["items_not_in_items"] = int(pc.count_distinct(events.column("item_id").filter(missing)).as_py()) if checks["events_item_not_in_items"] else 0
    return checks


def check_lines(checks: dict[str, Any] | None, n_events: int) -> list[str]:
    """The kept-but-incomplete events of an import (`data_checks`), one line each."""
    if not checks or not n_events:
        return []
    lines = []
    if checks.get("events_item_not_in_items"):
        n = checks["events_item_not_in_items"]
        lines.append(f"{n:,} events ({n / n_events:.1%}) have an item with no row in the items table ({checks['items_not_in_items']:,} items): "
                     "kept, without content features for those items")
    for column, n in (checks.get("unknown_conditions") or {}).items():
        if n:
            lines.append(f"{n:,} events ({n / n_events:.1%}) have no value in condition column '{column}': kept as an unknown condition")
    return lines


def write_dataset_info(
    paths: RunPaths,
    source: dict[str, Any],
    contract: EventContract,
    coercions: list[str],
    n_events: int,
    n_items: int | None,
    n_rejected: int,
    checks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write dataset.json, the marker of a finished data step, atomically. `checks`: see `data_checks`."""
    info = {
        "source": source,
        "contract": json.loads(contract.to_json()),
        "coercions": coercions,
        "n_events": n_events,
        "n_items_table": n_items,
        "n_rejected": n_rejected,
        "quarantine_file": str(paths.quarantine) if n_rejected else None,
        "checks": checks,
    }
    text = files.write_json_atomic(info, paths.dataset_info)  # no numpy default: the info is plain JSON
    return json.loads(text)  # as a reader will see it (tuples become lists)


def read_dataset_info(paths: RunPaths) -> dict[str, Any]:
    if not paths.dataset_info.exists():
        raise FileNotFoundError(
            f"{paths.dataset_info} not found: the run folder {paths.root} has no finished data step; run "
            "`lum data make`, `lum data import movielens` or `lum data import files` first"
        )
    return json.loads(paths.dataset_info.read_text())
