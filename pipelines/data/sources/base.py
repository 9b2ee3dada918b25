"""What every data source produces, and how it lands in a run folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa

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
    )


def write_dataset_info(
    paths: RunPaths,
    source: dict[str, Any],
    contract: EventContract,
    coercions: list[str],
    n_events: int,
    n_items: int | None,
    n_rejected: int,
) -> dict[str, Any]:
    """Write dataset.json, the marker of a finished data step, atomically."""
    info = {
        "source": source,
        "contract": json.loads(contract.to_json()),
        "coercions": coercions,
        "n_events": n_events,
        "n_items_table": n_items,
        "n_rejected": n_rejected,
        "quarantine_file": str(paths.quarantine) if n_rejected else None,
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
