"""Generic event files: Parquet or CSV that follow the contract, with an optional column mapping."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator

from contracts.files import file_sha256
from contracts.settings import Field, config_class
from pipelines.data.contract import EventContract, ValidationOptions, read_table, readable_time, utc_timestamp, validate_events, validate_items
from pipelines.data.sources.base import SourceOutput


@config_class
class FilesConfig:
    """How your own event log is read and checked: its columns against the contract, its bad rows (the options of
    `lum data import files`, and of a run config's `data:` with `source: files`)."""

    items: str | None = Field(None, description="Items table (item_id + content columns), CSV or Parquet.")
    conditions: tuple[str, ...] = Field((), description="Condition column NAME[:known_at] (known_at: request | after_event).")
    extras: tuple[str, ...] = Field((), description="Extra column NAME[:known_at[:type]], kept as a ranker feature.")
    map: tuple[str, ...] = Field((), description="Column mapping contract_name=source_name, e.g. user_id=userId.")
    items_map: tuple[str, ...] = Field((), description="Column mapping of the items table, contract_name=source_name, e.g. item_id=movieId.")
    ignore: tuple[str, ...] = Field((), description="Source column to leave out on purpose.")
    ts_unit: Literal["auto", "s", "ms", "us", "ns"] = Field("auto", description="Unit of numeric epoch timestamps.")
    min_ts: Annotated[str | None, AfterValidator(readable_time)] = Field(None, description="Earliest allowed event time (default: 1990-01-01).")
    max_ts: Annotated[str | None, AfterValidator(readable_time)] = Field(None, description="Latest allowed event time (default: now + 1 day).")
    on_bad: Literal["fail", "quarantine"] = Field("fail", description="fail: stop at the first bad rows; quarantine: set bad rows aside with their reasons.")

    def __post_init__(self) -> None:
        for option, texts in (("map", self.map), ("items_map", self.items_map)):
            for text in texts:
                if "=" not in text:
                    raise ValueError(f"{option}: '{text}' is not contract_name=source_name")
        if self.items_map and not self.items:
            raise ValueError("items_map renames columns of the items table: give the table too (--items)")

    def contract(self) -> EventContract:
        return EventContract.from_specs(self.conditions, self.extras)

    def column_map(self) -> dict[str, str]:
        """`contract=source` pairs -> {source: contract}."""
        return _pairs(self.map)

    def items_column_map(self) -> dict[str, str]:
        """The items table's `contract=source` pairs -> {source: contract}."""
        return _pairs(self.items_map)

    def validation_options(self) -> ValidationOptions:
        options = ValidationOptions(ts_unit=self.ts_unit, on_bad=self.on_bad)
        if self.min_ts:
            options.min_ts = utc_timestamp(self.min_ts)
        if self.max_ts:
            options.max_ts = utc_timestamp(self.max_ts)
        return options


def _pairs(texts: tuple[str, ...]) -> dict[str, str]:
    return {source: contract for contract, source in (text.split("=", 1) for text in texts)}


def load_files(
    events_path: str | Path,
    contract: EventContract,
    items_path: str | Path | None = None,
    column_map: dict[str, str] | None = None,
    ignore: tuple[str, ...] = (),
    options: ValidationOptions | None = None,
    items_column_map: dict[str, str] | None = None,
) -> SourceOutput:
    """Read and validate a user's event file (and items file).

    `column_map` renames source columns to contract names (source -> contract, e.g. {"userId": "user_id"});
    `items_column_map` those of the items table (the events' mapping does not apply to it: two files, two headers).
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
        items = validate_items(read_table(items_path, items_column_map), source=str(items_path))
    return SourceOutput(
        events=result.events,
        items=items,
        source={
            "name": "files",
            "events": str(events_path),
            "items": None if items_path is None else str(items_path),
            # by content: a file changed at the same path is new data, never "up to date"
            "events_sha256": file_sha256(events_path),
            "items_sha256": None if items_path is None else file_sha256(items_path),
            "contract": json.loads(contract.to_json()),
            "options": None if options is None else {k: str(v) if v is not None else None for k, v in asdict(options).items()},
            "column_map": dict(column_map or {}),
            # only when given: a folder imported before the option existed still matches its source (no --force needed)
            **({"items_column_map": dict(items_column_map)} if items_column_map else {}),
            "ignored_columns": list(ignore),
        },
        rejected=result.rejected,
        coercions=result.coercions,
    )
