"""The event-log contract: the one table a user must bring, its schema, and its validation.

An event log is one row per impression (an item shown to a user) with:

    user_id  string              who
    item_id  string              what was shown
    ts       timestamp(us, UTC)  when
    label    int8                1 = engaged / clicked, 0 = shown and not engaged

plus zero or more *condition* columns (strings: the context in which the item was engaged, e.g. surface,
device; they become the behaviour LM's condition tokens) and *extra* columns (kept as features). Every
condition or extra column is marked with when it is known:

    request      known when the request is served (surface, device, hour): a ranker may use it for this row.
    after_event  known only after the event (a feedback level derived from a rating): fine inside a user's
                 history, never a feature of its own row.
    truth        simulator ground truth (true click probability): for evaluation only, never a feature.

Coercions (documented, applied, and reported in `ValidationResult.coercions`):
    ids      integer columns become strings; empty strings count as null ids.
    ts       any timestamp unit or time zone becomes microseconds UTC (naive timestamps are read as UTC);
             dates become midnight UTC; integers or floats are epoch times whose unit is given
             (`ts_unit`) or detected from the median magnitude (< 1e11 seconds, < 1e14 milliseconds,
             < 1e17 microseconds, else nanoseconds); strings are parsed as ISO 8601.
    label    booleans and the numbers 0/1 (also 0.0/1.0 and the strings "0"/"1") become int8.
    condition integer or boolean values become strings; null means "unknown condition" and is kept.

Bad rows (null ids, unparseable or out-of-range timestamps, labels other than 0/1, duplicate events, i.e.
the same (user_id, item_id, ts) again) make validation fail with a `ContractError` naming the file, column,
first offending rows (1-based, header excluded) and values, and what was expected. With
`on_bad="quarantine"` those rows are returned separately, each with its reason, and written next to the
output by the caller: nothing is ever dropped silently. Structural problems (a missing column, a column of
a type that cannot be coerced, a column not declared in the contract) always fail.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from pydantic_core import PydanticCustomError

from contracts.files import write_parquet_atomic  # noqa: F401  (re-exported: the steps write their Parquet files with it)
from contracts.names import ID_NORMAL_FORM, MAX_ID_BYTES

KnownAt = Literal["request", "after_event", "truth"]
ExtraType = Literal["string", "int64", "float64", "list<float32>"]
OnBad = Literal["fail", "quarantine"]
TsUnit = Literal["auto", "s", "ms", "us", "ns"]

KNOWN_AT_VALUES: tuple[str, ...] = ("request", "after_event", "truth")
EXTRA_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "list<float32>": pa.list_(pa.float32()),
}
REQUIRED_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("label", pa.int8()),
    ]
)
REQUIRED_COLUMNS: tuple[str, ...] = tuple(REQUIRED_SCHEMA.names)
METADATA_KEY = b"lum.event_contract"
DEFAULT_MIN_TS = pd.Timestamp("1990-01-01", tz="UTC")
MAX_ROWS_IN_MESSAGE = 5


def utc_timestamp(value: str | pd.Timestamp) -> pd.Timestamp:
    """A time given by a user: naive times are read as UTC, zoned ones converted to UTC."""
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def readable_time(value: str | None) -> str | None:
    """A pydantic validator of a time option given as text (`--min-ts`, `--at`): the option's own error when the
    text is no time, at the moment the settings are built (before any data is read)."""
    if value is None:
        return value
    try:
        ok = not pd.isna(utc_timestamp(value))
    except (ValueError, TypeError, OverflowError):
        ok = False
    if not ok:
        raise PydanticCustomError("time", f"cannot read {value!r} as a time; expected an ISO 8601 time such as 2024-01-31 or "
                                          "2024-01-31T12:00:00Z")
    return value


class ContractError(ValueError):
    """Input that does not follow the contract. The message names file, column, rows and expectation."""


@dataclass(frozen=True)
class ColumnSpec:
    """One condition or extra column of the event log."""

    name: str
    role: Literal["condition", "extra"]
    known_at: KnownAt = "request"
    dtype: ExtraType = "string"  # conditions are always strings

    def __post_init__(self) -> None:
        if self.known_at not in KNOWN_AT_VALUES:
            raise ContractError(
                f"column '{self.name}': known_at must be one of {', '.join(KNOWN_AT_VALUES)}, got '{self.known_at}'"
            )
        if self.dtype not in EXTRA_TYPES:
            raise ContractError(
                f"column '{self.name}': type must be one of {', '.join(EXTRA_TYPES)}, got '{self.dtype}'"
            )
        if self.role == "condition" and self.dtype != "string":
            raise ContractError(f"condition column '{self.name}' must be of type string, got '{self.dtype}'")
        if self.name in REQUIRED_COLUMNS:
            raise ContractError(f"column '{self.name}' is a required column and cannot be declared as {self.role}")

    @classmethod
    def parse(cls, text: str, role: Literal["condition", "extra"]) -> "ColumnSpec":
        """Parse `name[:known_at[:type]]`, e.g. `surface`, `feedback:after_event`, `hour:request:int64`."""
        parts = text.split(":")
        if not parts[0] or len(parts) > 3:
            raise ContractError(f"cannot read column spec '{text}': expected name[:known_at[:type]]")
        name = parts[0]
        known_at = parts[1] if len(parts) > 1 else "request"
        dtype = parts[2] if len(parts) > 2 else "string"
        return cls(name=name, role=role, known_at=known_at, dtype=dtype)  # type: ignore[arg-type]


@dataclass(frozen=True)
class EventContract:
    """The declared condition and extra columns of an event log (the required four are implied)."""

    conditions: tuple[ColumnSpec, ...] = ()
    extras: tuple[ColumnSpec, ...] = ()

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ContractError(f"columns declared twice in the contract: {', '.join(dupes)}")

    @property
    def columns(self) -> tuple[ColumnSpec, ...]:
        return self.conditions + self.extras

    @property
    def condition_names(self) -> list[str]:
        return [c.name for c in self.conditions]

    def ranker_feature_columns(self) -> list[str]:
        """Columns a ranker may use as features of the row itself: only those known at request time."""
        return [c.name for c in self.columns if c.known_at == "request"]

    def history_columns(self) -> list[str]:
        """Columns usable inside a user's history (strictly earlier events): everything but ground truth."""
        return [c.name for c in self.columns if c.known_at != "truth"]

    def arrow_schema(self) -> pa.Schema:
        fields = list(REQUIRED_SCHEMA)
        fields += [pa.field(c.name, pa.string()) for c in self.conditions]
        fields += [pa.field(c.name, EXTRA_TYPES[c.dtype]) for c in self.extras]
        return pa.schema(fields, metadata={METADATA_KEY: self.to_json().encode()})

    def to_json(self) -> str:
        return json.dumps({"conditions": [asdict(c) for c in self.conditions], "extras": [asdict(c) for c in self.extras]})

    @classmethod
    def from_json(cls, text: str | bytes) -> "EventContract":
        raw = json.loads(text)
        return cls(
            conditions=tuple(ColumnSpec(**c) for c in raw.get("conditions", [])),
            extras=tuple(ColumnSpec(**c) for c in raw.get("extras", [])),
        )

    @classmethod
    def from_specs(cls, conditions: list[str] | tuple[str, ...] = (), extras: list[str] | tuple[str, ...] = ()) -> "EventContract":
        """Build from CLI/config specs such as `surface`, `feedback:after_event`, `hour:request:int64`."""
        return cls(
            conditions=tuple(ColumnSpec.parse(s, "condition") for s in conditions),
            extras=tuple(ColumnSpec.parse(s, "extra") for s in extras),
        )


@dataclass
class ValidationOptions:
    ts_unit: TsUnit = "auto"
    min_ts: pd.Timestamp = DEFAULT_MIN_TS
    max_ts: pd.Timestamp | None = None  # None: one day after now
    on_bad: OnBad = "fail"

    def __post_init__(self) -> None:
        if self.on_bad not in ("fail", "quarantine"):
            raise ContractError(f"on_bad must be 'fail' or 'quarantine', got '{self.on_bad}'")
        if self.ts_unit not in ("auto", "s", "ms", "us", "ns"):
            raise ContractError(f"ts_unit must be one of auto, s, ms, us, ns, got '{self.ts_unit}'")

    def resolved_max_ts(self) -> pd.Timestamp:
        if self.max_ts is not None:
            return pd.Timestamp(self.max_ts)
        return pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=1)


@dataclass
class ValidationResult:
    """A contract-conforming events table, the rows rejected from it (quarantine mode), and what was coerced."""

    events: pa.Table
    rejected: pd.DataFrame
    coercions: list[str] = field(default_factory=list)

    @property
    def n_rejected(self) -> int:
        return len(self.rejected)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_table(path: str | Path, column_map: dict[str, str] | None = None) -> pa.Table:
    """Read a CSV or Parquet file into Arrow, renaming source columns by `column_map` (source -> contract name).

    CSV id columns are read as strings so that ids such as "007" keep their leading zeros.
    """
    path = Path(path)
    if not path.exists():
        raise ContractError(f"{path}: file not found")
    column_map = dict(column_map or {})
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        table = pq.read_table(path)
    elif suffix in (".csv", ".tsv", ".txt") or path.name.endswith(".csv.gz"):
        source_of = {v: k for k, v in column_map.items()}
        id_columns = {source_of.get(c, c): pa.string() for c in ("user_id", "item_id")}
        delimiter = "\t" if suffix == ".tsv" else ","
        _check_csv_encoding(path)
        try:
            table = pa_csv.read_csv(
                path,
                parse_options=pa_csv.ParseOptions(delimiter=delimiter),
                convert_options=pa_csv.ConvertOptions(column_types=id_columns, strings_can_be_null=True),
            )
        except pa.ArrowInvalid as exc:
            if "invalid UTF8" in str(exc):  # an id column (read as text) with other bytes: name the encoding, not a parse error
                raise ContractError(f"{path}: not UTF-8 text ({exc}); expected {_NOT_UTF8_HINT}") from exc
            raise ContractError(f"{path}: cannot be read as CSV: {exc}") from exc
    else:
        raise ContractError(f"{path}: unknown file type '{path.suffix}': expected .parquet or .csv")
    missing_sources = [s for s in column_map if s not in table.column_names]
    if missing_sources:
        raise ContractError(
            f"{path}: column mapping names source column(s) {', '.join(missing_sources)} that the file does not have "
            f"(it has: {', '.join(table.column_names)})"
        )
    names = [column_map.get(c, c) for c in table.column_names]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ContractError(f"{path}: column(s) {', '.join(repr(n) for n in twice)} appear more than once (in the file's header, or "
                            "after the column mapping): give every column its own name")
    return table.rename_columns(names)


# byte-order marks of the encodings a spreadsheet may save "Unicode text" in (UTF-32 first: its LE mark starts like UTF-16's)
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def _check_csv_encoding(path: Path) -> None:
    """ContractError unless the CSV looks like UTF-8: a UTF-16/32 file (Excel's "Unicode text") would otherwise fail
    as a parse error about column counts that never names the encoding."""
    with pa.input_stream(str(path)) as stream:  # decompresses .csv.gz
        head = stream.read(4096)
    found = next((name for bom, name in _BOMS if head.startswith(bom)), None)
    if found is None and b"\x00" in head:
        found = "UTF-16 or UTF-32 (NUL bytes between the characters)"
    if found:
        raise ContractError(f"{path}: the file is encoded as {found}; expected UTF-8 text: re-save it as UTF-8 "
                            f"(e.g. `iconv -f UTF-16 -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix}`)")


def read_events(path: str | Path) -> tuple[pa.Table, EventContract]:
    """Read a validated events Parquet file (as written by `write_parquet_atomic`) and its contract."""
    table = pq.read_table(path)
    return table, _contract_of(table.schema, path)


def read_contract(path: str | Path) -> EventContract:
    """The contract of a validated events Parquet file, from its schema alone (no rows are read)."""
    return _contract_of(pq.read_schema(path), path)


def _contract_of(schema: pa.Schema, path: str | Path) -> EventContract:
    meta = schema.metadata or {}
    if METADATA_KEY not in meta:
        raise ContractError(
            f"{path}: not a validated events file (no contract in its metadata): run `lum data validate` or "
            "`lum data import files` on it first"
        )
    return EventContract.from_json(meta[METADATA_KEY])


# ---------------------------------------------------------------------------------------------------------------
# Validation


class _Checker:
    """Collects per-row problems while columns are coerced one by one."""

    def __init__(self, source: str, n_rows: int, on_bad: OnBad):
        self.source = source
        self.on_bad = on_bad
        self.reason = np.full(n_rows, None, dtype=object)  # first problem of each row

    def structural(self, column: str, message: str) -> ContractError:
        return ContractError(f"{self.source}: column '{column}': {message}")

    def flag(self, column: str, bad: np.ndarray, values: Callable[[], np.ndarray], problem: str, expected: str) -> None:
        """Mark rows `bad` as failing; in fail mode raise at once with the first offending rows.

        `values` returns the column's input values; it is only called when there is something to report.
        """
        if not bad.any():
            return
        rows = np.flatnonzero(bad)
        if self.on_bad == "fail":
            shown = rows[:MAX_ROWS_IN_MESSAGE]
            raw = values()
            pairs = ", ".join(f"row {r + 1}: {_show(raw[r])}" for r in shown)
            more = f" (and {len(rows) - len(shown)} more)" if len(rows) > len(shown) else ""
            raise ContractError(
                f"{self.source}: column '{column}': {len(rows)} row(s) {problem}; expected {expected}. "
                f"First offending rows (1-based, header excluded): {pairs}{more}. "
                "Fix the input, or pass --on-bad quarantine to set such rows aside with a reason."
            )
        unset = bad & pd.isna(self.reason)
        self.reason[unset] = f"{column}: {problem}; expected {expected}"

    @property
    def bad(self) -> np.ndarray:
        return ~pd.isna(self.reason)


def _show(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "null"
    return repr(value)


def _python_values(array: pa.Array | pa.ChunkedArray) -> Callable[[], np.ndarray]:
    return lambda: np.asarray(array.to_pylist(), dtype=object)


# Ids refused as a missing value another tool wrote as text (compared case-insensitively: pandas writes None and
# nan, SQL exports NULL, JavaScript undefined, spreadsheets N/A). `NA` is not among them: it is a real code in many
# catalogues (Namibia's country code). In a CSV, pyarrow already reads empty, NA, N/A, NULL, NaN... as null (a null id).
MISSING_AS_TEXT = ("none", "null", "nil", "nan", "<na>", "n/a", "undefined")
# C0 and C1 control characters (newline, tab, NUL, ...): an id printed in a log, a CSV or a Redis key must stay on
# one line; a quoted newline inside a CSV id is the usual cause.
_CONTROL_CHARACTERS = r"[\x00-\x1f\x7f-\x{9f}]"
_NOT_UTF8_HINT = "UTF-8 text (re-save the file as UTF-8: a Latin-1 or Windows-1252 export is the usual cause)"


def _utf8_strings(col: pa.Array, name: str, check: _Checker) -> pa.Array:
    """A binary column (bytes, e.g. a CSV column with non-UTF-8 bytes) as strings: rows that are not valid UTF-8
    are bad rows naming the encoding, never decoded by guess."""
    try:
        return col.cast(pa.string())
    except pa.ArrowInvalid:
        pass
    raw = col.to_pylist()

    def utf8(value: bytes | None) -> bool:
        if value is None:
            return True
        try:
            value.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    bad = np.array([not utf8(v) for v in raw], dtype=bool)
    check.flag(name, bad, lambda: np.asarray(raw, dtype=object), "are not valid UTF-8 text", _NOT_UTF8_HINT)
    return pa.array([None if b or v is None else v.decode("utf-8") for v, b in zip(raw, bad)], type=pa.string())


def _coerce_id(table: pa.Table, name: str, check: _Checker, coercions: list[str]) -> pa.Array:
    """A string id column: integers become strings ("1"; a float column such as 1.0 is refused, never guessed),
    null, empty, whitespace-only and missing-as-text values, ids over MAX_ID_BYTES and ids with a control character
    are bad rows, and ids are normalised to Unicode NFC (contracts.names.normalize_id, the form lookups use)."""
    col = table.column(name)
    typ = col.type
    if pa.types.is_dictionary(typ):
        col = col.cast(typ.value_type)
        typ = col.type
    if pa.types.is_integer(typ):
        coercions.append(f"{name}: {typ} -> string")
        col = col.cast(pa.string())
    elif pa.types.is_large_string(typ):
        col = col.cast(pa.string())
    elif pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        col = _utf8_strings(col.combine_chunks(), name, check)
    elif not pa.types.is_string(typ):
        raise check.structural(name, f"has type {typ}; expected string ids (integer ids are converted to strings)")
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    null_or_empty = pc.fill_null(pc.or_(pc.is_null(arr), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(arr)), 0)), True)
    bad = np.asarray(null_or_empty.to_numpy(zero_copy_only=False), dtype=bool)
    check.flag(name, bad, _python_values(arr), "are null, empty or only whitespace", "a non-empty id")
    # a missing value written out as text by another tool (pandas writes None and NaN so): not an id
    as_text = pc.fill_null(pc.is_in(pc.utf8_lower(arr), pa.array(MISSING_AS_TEXT)), False)
    check.flag(name, np.asarray(as_text.to_numpy(zero_copy_only=False), dtype=bool), _python_values(arr),
               f"are a missing value written as text ({', '.join(MISSING_AS_TEXT)}, in any case)",
               "a real id (rename such ids if they are real)")
    too_long = pc.fill_null(pc.greater(pc.binary_length(arr), MAX_ID_BYTES), False)
    if pc.any(too_long).as_py():
        check.flag(name, np.asarray(too_long.to_numpy(zero_copy_only=False), dtype=bool),
                   lambda: np.asarray([v and f"{v[:40]}... ({len(v.encode()):,} bytes)" for v in arr.to_pylist()], dtype=object),
                   f"are longer than {MAX_ID_BYTES:,} bytes",
                   f"an id of at most {MAX_ID_BYTES:,} UTF-8 bytes (an unclosed quote in a CSV is the usual cause; hash long URLs)")
    control = pc.fill_null(pc.match_substring_regex(arr, _CONTROL_CHARACTERS), False)
    check.flag(name, np.asarray(control.to_numpy(zero_copy_only=False), dtype=bool), _python_values(arr),
               "contain a control character (newline, tab, ...)",
               "an id on one line without control characters (a quoted newline in a CSV field is the usual cause)")
    # one spelling per id: composed and decomposed accents are the same user or item (Unicode NFC)
    normalized = pc.utf8_normalize(arr, ID_NORMAL_FORM)
    changed = int(pc.sum(pc.not_equal(normalized, arr).fill_null(False)).as_py() or 0)
    if changed:
        coercions.append(f"{name}: {changed} id(s) normalised to Unicode {ID_NORMAL_FORM}")
    return normalized


def detect_epoch_unit(values: np.ndarray) -> str:
    """Guess the unit of epoch times from the median magnitude of the (finite) values."""
    finite = np.abs(values[np.isfinite(values)])
    if len(finite) == 0:
        return "s"
    median = float(np.median(finite))
    if median < 1e11:
        return "s"
    if median < 1e14:
        return "ms"
    if median < 1e17:
        return "us"
    return "ns"


_UNIT_SCALE_TO_US = {"s": 1e6, "ms": 1e3, "us": 1.0, "ns": 1e-3}


def _coerce_ts(table: pa.Table, check: _Checker, options: ValidationOptions, coercions: list[str]) -> pa.Array:
    name = "ts"
    col = table.column(name).combine_chunks()
    typ = col.type
    raw_values = _python_values(col)
    n = len(col)
    micros = np.zeros(n, dtype=np.int64)
    unparsed = np.zeros(n, dtype=bool)
    if pa.types.is_timestamp(typ):
        if typ.tz is None:
            coercions.append(f"ts: naive {typ} read as UTC")
        target = pa.timestamp("us", tz="UTC") if typ.tz is None else pa.timestamp("us", tz=typ.tz)
        as_us = col.cast(target, safe=False)
        unparsed = np.asarray(pc.is_null(as_us).to_numpy(zero_copy_only=False), dtype=bool)
        micros = np.asarray(pc.fill_null(as_us.cast(pa.int64()), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
    elif pa.types.is_date(typ):
        coercions.append(f"ts: {typ} -> midnight UTC")
        as_us = col.cast(pa.timestamp("us"))
        unparsed = np.asarray(pc.is_null(as_us).to_numpy(zero_copy_only=False), dtype=bool)
        micros = np.asarray(pc.fill_null(as_us.cast(pa.int64()), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
    elif pa.types.is_integer(typ) or pa.types.is_floating(typ):
        values = np.asarray(pc.fill_null(col.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)
        unit = options.ts_unit if options.ts_unit != "auto" else detect_epoch_unit(values)
        coercions.append(f"ts: epoch {typ} in unit '{unit}'" + (" (detected)" if options.ts_unit == "auto" else ""))
        unparsed = ~np.isfinite(values)
        scaled = np.where(unparsed, 0.0, values) * _UNIT_SCALE_TO_US[unit]
        overflow = np.abs(scaled) > 9.2e18
        unparsed |= overflow
        micros = np.where(unparsed, 0, np.round(np.where(overflow, 0.0, scaled))).astype(np.int64)
    elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
        coercions.append("ts: ISO 8601 strings parsed")
        parsed = pd.to_datetime(pd.Series(raw_values()), utc=True, errors="coerce", format="ISO8601")
        unparsed = parsed.isna().to_numpy()
        micros = np.where(unparsed, 0, parsed.to_numpy(dtype="datetime64[ns]", na_value=np.datetime64(0, "ns")).astype(np.int64) // 1000)
    else:
        raise check.structural(
            name, f"has type {typ}; expected a timestamp, epoch seconds/milliseconds (numbers) or ISO 8601 strings"
        )
    check.flag(name, unparsed, raw_values, "are null or cannot be read as a time", "a timestamp")
    lo = options.min_ts.value // 1000
    hi = options.resolved_max_ts().value // 1000
    out_of_range = ~unparsed & ((micros < lo) | (micros > hi))
    if out_of_range.any():
        check.flag(
            name,
            out_of_range,
            lambda: pd.to_datetime(micros, unit="us", utc=True, errors="coerce").astype(str).to_numpy(dtype=object),
            "are outside the allowed time range",
            f"a time between {options.min_ts.isoformat()} and {options.resolved_max_ts().isoformat()} "
            "(a wrong epoch unit is the usual cause: pass --ts-unit s|ms|us|ns)",
        )
    return pa.array(micros, type=pa.int64()).cast(pa.timestamp("us", tz="UTC"))


def _coerce_label(table: pa.Table, check: _Checker, coercions: list[str]) -> pa.Array:
    col = table.column("label").combine_chunks()
    typ = col.type
    raw_values = _python_values(col)
    expected = "0 or 1 (1 = engaged, 0 = shown and not engaged)"
    if pa.types.is_boolean(typ):
        coercions.append("label: bool -> int8")
        numeric = pc.fill_null(col.cast(pa.float64()), np.nan)
    elif pa.types.is_integer(typ) or pa.types.is_floating(typ):
        if not pa.types.is_int8(typ):
            coercions.append(f"label: {typ} -> int8")
        numeric = pc.fill_null(col.cast(pa.float64()), np.nan)
    elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
        coercions.append("label: strings '0'/'1' -> int8")
        numeric = pa.array(pd.to_numeric(pd.Series(raw_values()), errors="coerce").to_numpy(dtype=np.float64))
    else:
        raise check.structural("label", f"has type {typ}; expected {expected}")
    values = np.asarray(numeric.to_numpy(zero_copy_only=False), dtype=np.float64)
    bad = ~np.isin(values, (0.0, 1.0))
    check.flag("label", bad, raw_values, "hold values other than 0/1", expected)
    return pa.array(np.where(bad, 0, values).astype(np.int8), type=pa.int8())


def _coerce_optional(table: pa.Table, spec: ColumnSpec, check: _Checker, coercions: list[str]) -> pa.Array:
    col = table.column(spec.name).combine_chunks()
    typ = col.type
    if pa.types.is_dictionary(typ):
        col = col.cast(typ.value_type)
        typ = col.type
    target = EXTRA_TYPES[spec.dtype]
    if typ == target:
        return col
    if spec.dtype == "string":
        if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
            return _utf8_strings(col, spec.name, check)
        if pa.types.is_integer(typ) or pa.types.is_boolean(typ) or pa.types.is_large_string(typ):
            if not pa.types.is_large_string(typ):
                coercions.append(f"{spec.name}: {typ} -> string")
            return col.cast(pa.string())
    elif spec.dtype == "int64":
        if pa.types.is_integer(typ):
            return col.cast(pa.int64())
        if pa.types.is_floating(typ):
            as_float = np.asarray(pc.fill_null(col.cast(pa.float64()), 0.0).to_numpy(zero_copy_only=False))
            bad = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool) & (as_float != np.round(as_float))
            check.flag(spec.name, bad, _python_values(col), "are not whole numbers", "an integer")
            coercions.append(f"{spec.name}: {typ} -> int64")
            return pa.array(np.round(as_float).astype(np.int64), mask=~np.asarray(col.is_valid()), type=pa.int64())
    elif spec.dtype == "float64":
        if pa.types.is_integer(typ) or pa.types.is_floating(typ):
            return col.cast(pa.float64())
    elif spec.dtype == "list<float32>":
        if (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)) and (
            pa.types.is_floating(typ.value_type) or pa.types.is_integer(typ.value_type)
        ):
            return col.cast(target)
    raise check.structural(spec.name, f"has type {typ}; the contract declares it as {spec.dtype}")


def _blank_to_unknown(values: pa.Array, name: str, coercions: list[str]) -> pa.Array:
    """Empty or whitespace-only condition values become null, the "unknown condition" (a CSV reader makes an empty
    field null already; a Parquet file keeps ""): one token for "not recorded", never a separate `surface=` value.
    Counted among the coercions; the import reports the null count of each condition column (`checks`)."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0), False)
    n = int(pc.sum(blank).as_py() or 0)
    if not n:
        return values
    coercions.append(f"{name}: {n} empty or whitespace-only value(s) read as unknown (null)")
    return pc.if_else(blank, pa.scalar(None, pa.string()), values)


def validate_events(
    table: pa.Table,
    contract: EventContract,
    source: str,
    options: ValidationOptions | None = None,
) -> ValidationResult:
    """Coerce `table` to the events contract and check every row; see the module docstring for the rules.

    Returns the events sorted by (user_id, ts) with the original order kept among ties, the contract in the
    schema metadata, and in quarantine mode the rejected rows (input values as strings, plus `row` and
    `reason`).
    """
    options = options or ValidationOptions()
    if table.num_rows == 0:
        raise ContractError(f"{source}: no rows (only a header?): an event log needs at least one event")
    missing = [c for c in REQUIRED_COLUMNS + tuple(c.name for c in contract.columns) if c not in table.column_names]
    if missing:
        raise ContractError(
            f"{source}: missing column(s) {', '.join(repr(m) for m in missing)}; the file has "
            f"{', '.join(repr(c) for c in table.column_names)}. Rename with a column mapping "
            "(--map contract_name=source_name) or fix the contract."
        )
    undeclared = [c for c in table.column_names if c not in REQUIRED_COLUMNS and c not in {s.name for s in contract.columns}]
    if undeclared:
        raise ContractError(
            f"{source}: column(s) {', '.join(repr(c) for c in undeclared)} are not in the contract; declare each with "
            "--condition NAME[:known_at] or --extra NAME[:known_at[:type]], or leave it out with --ignore NAME "
            "(nothing is dropped silently)"
        )
    check = _Checker(source, table.num_rows, options.on_bad)
    coercions: list[str] = []
    columns: dict[str, pa.Array] = {
        "user_id": _coerce_id(table, "user_id", check, coercions),
        "item_id": _coerce_id(table, "item_id", check, coercions),
        "ts": _coerce_ts(table, check, options, coercions),
        "label": _coerce_label(table, check, coercions),
    }
    for spec in contract.columns:
        columns[spec.name] = _coerce_optional(table, spec, check, coercions)
        if spec.role == "condition":
            columns[spec.name] = _blank_to_unknown(columns[spec.name], spec.name, coercions)

    # Duplicates: the same (user, item, time) again. The first occurrence is kept; rows already bad for another
    # reason do not count as the first occurrence.
    # integer codes instead of Python strings: the check stays fast on tens of millions of rows
    key = pd.DataFrame(
        {
            "u": pc.dictionary_encode(columns["user_id"]).indices.to_numpy(zero_copy_only=False),
            "i": pc.dictionary_encode(columns["item_id"]).indices.to_numpy(zero_copy_only=False),
            "t": columns["ts"].cast(pa.int64()).to_numpy(zero_copy_only=False),
        }
    )
    good_so_far = ~check.bad
    dup = np.zeros(table.num_rows, dtype=bool)
    dup[good_so_far] = key[good_so_far].duplicated(keep="first").to_numpy()
    if dup.any():
        first_row = key[good_so_far].groupby(["u", "i", "t"], sort=False).ngroup()
        first_index = pd.Series(np.flatnonzero(good_so_far)).groupby(first_row.to_numpy()).transform("min").to_numpy()

        def described() -> np.ndarray:
            out = np.full(table.num_rows, None, dtype=object)
            users = np.asarray(columns["user_id"].to_pylist(), dtype=object)[good_so_far]
            items = np.asarray(columns["item_id"].to_pylist(), dtype=object)[good_so_far]
            out[good_so_far] = [
                f"({u!r}, {i!r}, {pd.Timestamp(t, unit='us', tz='UTC').isoformat()}) first seen in row {f + 1}"
                for u, i, t, f in zip(users, items, key.t[good_so_far], first_index)
            ]
            return out

        check.flag("user_id,item_id,ts", dup, described, "are duplicate events", "one row per (user_id, item_id, ts)")

    bad = check.bad
    events = pa.table(columns)
    if bad.any():
        events = events.filter(pa.array(~bad))
    order = pc.sort_indices(events, sort_keys=[("user_id", "ascending"), ("ts", "ascending")])
    events = events.take(order).cast(contract.arrow_schema())
    rejected = pd.DataFrame(columns=[*table.column_names, "row", "reason"])
    if bad.any():
        bad_rows = np.flatnonzero(bad)
        raw = table.take(pa.array(bad_rows)).to_pandas()
        rejected = raw.astype(str).where(raw.notna(), None)
        rejected["row"] = bad_rows + 1
        rejected["reason"] = check.reason[bad_rows]
    return ValidationResult(events=events, rejected=rejected.reset_index(drop=True), coercions=coercions)


def validate_items(table: pa.Table, source: str) -> pa.Table:
    """Check an items table: a non-null, unique string `item_id` plus any content columns."""
    if "item_id" not in table.column_names:
        raise ContractError(f"{source}: missing column 'item_id'; the file has {', '.join(table.column_names)}. Rename with the items "
                            "table's own mapping (--items-map item_id=source_name; --map renames the events' columns only)")
    check = _Checker(source, table.num_rows, "fail")
    ids = _coerce_id(table, "item_id", check, [])
    dup = ids.to_pandas().duplicated().to_numpy()
    check.flag("item_id", dup, _python_values(ids), "repeat an item_id", "one row per item")
    return table.set_column(table.column_names.index("item_id"), "item_id", ids)
