"""Generic event files: Parquet or CSV that follow the contract, with an optional column mapping."""

from __future__ import annotations

from pathlib import Path

from pipelines.data.contract import EventContract, ValidationOptions, read_table, validate_events, validate_items
from pipelines.data.sources.base import SourceOutput


def load_files(
    events_path: str | Path,
    contract: EventContract,
    items_path: str | Path | None = None,
    column_map: dict[str, str] | None = None,
    ignore: tuple[str, ...] = (),
    options: ValidationOptions | None = None,
) -> SourceOutput:
    """Read and validate a user's event file (and items file).

    `column_map` renames source columns to contract names (source -> contract, e.g. {"userId": "user_id"}).
    `ignore` names source columns to leave out on purpose; every other column must be declared in `contract`.
    """
    table = read_table(events_path, column_map)
    unknown = [c for c in ignore if c not in table.column_names]
    if unknown:
        raise ValueError(f"{events_path}: --ignore names column(s) {', '.join(unknown)} that the file does not have")
    table = table.drop_columns(list(ignore))
    result = validate_events(table, contract, source=str(events_path), options=options)
    items = None
    if items_path is not None:
        items = validate_items(read_table(items_path, None), source=str(items_path))
    return SourceOutput(
        events=result.events,
        items=items,
        source={
            "name": "files",
            "events": str(events_path),
            "items": None if items_path is None else str(items_path),
            "column_map": dict(column_map or {}),
            "ignored_columns": list(ignore),
        },
        rejected=result.rejected,
        coercions=result.coercions,
    )
