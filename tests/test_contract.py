"""The event-log contract: coercions, and one specific error for each kind of bad input."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.contract import (
    ColumnSpec,
    ContractError,
    EventContract,
    ValidationOptions,
    detect_epoch_unit,
    read_events,
    read_table,
    validate_events,
    validate_items,
)
from pipelines.data.sources.base import SourceOutput, write_source_output
from pipelines.paths import RunPaths

T0 = 1_700_000_000  # 2023-11-14T22:13:20Z
CONTRACT = EventContract.from_specs(conditions=["surface"], extras=["hour:request:int64", "rating:after_event:float64"])


def events(**overrides) -> pa.Table:
    base = {
        "user_id": ["u1", "u1", "u2", "u3"],
        "item_id": ["a", "b", "a", "c"],
        "ts": [T0, T0 + 60, T0 + 5, T0 + 7],
        "label": [1, 0, 0, 1],
        "surface": ["home", "search", "home", None],
        "hour": [22, 22, 22, 22],
        "rating": [4.5, 2.0, 3.0, 5.0],
    }
    base.update(overrides)
    return pa.table(base)


def check(table: pa.Table, contract: EventContract = CONTRACT, **options):
    return validate_events(table, contract, source="events.csv", options=ValidationOptions(**options))


def test_valid_table_is_coerced_to_the_contract_schema():
    result = check(events())
    assert result.events.schema.remove_metadata() == CONTRACT.arrow_schema().remove_metadata()
    assert result.events.column("user_id").to_pylist() == ["u1", "u1", "u2", "u3"]  # sorted by user, then time
    assert result.events.column("ts").to_pylist()[1] == dt.datetime(2023, 11, 14, 22, 14, 20, tzinfo=dt.timezone.utc)
    assert result.events.column("surface").to_pylist()[3] is None  # a null condition is kept: unknown condition
    assert result.n_rejected == 0
    assert "ts: epoch int64 in unit 's' (detected)" in result.coercions
    # the contract travels inside the table
    assert EventContract.from_json(result.events.schema.metadata[b"lum.event_contract"]) == CONTRACT


def test_output_is_sorted_by_user_then_time_keeping_input_order_among_ties():
    table = events(user_id=["u2", "u1", "u1", "u1"], ts=[T0, T0 + 9, T0 + 1, T0 + 1], item_id=["a", "b", "c", "d"])
    out = check(table).events
    assert out.column("item_id").to_pylist() == ["c", "d", "b", "a"]


def test_integer_ids_become_strings():
    result = check(events(user_id=[7, 7, 8, 9], item_id=[1, 2, 1, 3]))
    assert result.events.column("user_id").to_pylist() == ["7", "7", "8", "9"]
    assert result.events.column("item_id").type == pa.string()
    assert "user_id: int64 -> string" in result.coercions


@pytest.mark.parametrize(
    "values, unit",
    [
        ([T0, T0 + 60, T0 + 5, T0 + 7], "s"),
        ([T0 * 1000, (T0 + 60) * 1000, (T0 + 5) * 1000, (T0 + 7) * 1000], "ms"),
        ([T0 * 10**6, (T0 + 60) * 10**6, (T0 + 5) * 10**6, (T0 + 7) * 10**6], "us"),
        ([float(T0), T0 + 60.0, T0 + 5.0, T0 + 7.0], "s"),
    ],
)
def test_epoch_unit_is_detected(values, unit):
    assert detect_epoch_unit(np.asarray(values, dtype=float)) == unit
    first = check(events(ts=values)).events.column("ts").to_pylist()[0]
    assert first == dt.datetime.fromtimestamp(T0, dt.timezone.utc)


def test_epoch_unit_can_be_given():
    out = check(events(ts=[T0 * 1000, (T0 + 60) * 1000, (T0 + 5) * 1000, (T0 + 7) * 1000]), ts_unit="ms").events
    assert out.column("ts").to_pylist()[0] == dt.datetime.fromtimestamp(T0, dt.timezone.utc)


def test_iso_strings_naive_and_zoned_timestamps():
    iso = ["2023-11-14T22:13:20Z", "2023-11-14T23:14:20+01:00", "2023-11-14 22:13:25", "2023-11-14T22:13:27.5"]
    out = check(events(ts=iso)).events.column("ts").to_pylist()
    assert out[0] == dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.timezone.utc)
    assert out[1] == dt.datetime(2023, 11, 14, 22, 14, 20, tzinfo=dt.timezone.utc)  # +01:00 converted
    naive = pa.array([dt.datetime(2023, 11, 14, 22, 13, 20)] * 4, pa.timestamp("ms"))
    result = check(events(ts=naive, item_id=["a", "b", "c", "d"]))
    assert result.events.column("ts").to_pylist()[0] == dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.timezone.utc)
    assert any("naive" in c for c in result.coercions)


def test_missing_column_names_file_and_column():
    with pytest.raises(ContractError, match=r"events\.csv: missing column\(s\) 'label'"):
        check(events().drop_columns(["label"]))
    with pytest.raises(ContractError, match="missing column.*'surface'"):
        check(events().drop_columns(["surface"]))


def test_undeclared_column_is_an_error_not_silently_dropped():
    with pytest.raises(ContractError, match=r"'device' are not in the contract.*--ignore"):
        check(events().append_column("device", pa.array(["m"] * 4)))


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("user_id", pa.array([1.5, 2.0, 3.0, 4.0]), r"column 'user_id': has type double; expected string ids"),
        ("ts", pa.array([True, False, True, True]), r"column 'ts': has type bool; expected a timestamp"),
        ("label", pa.array([[1], [0], [0], [1]]), r"column 'label': has type list<item: int64>"),
        ("hour", pa.array(["x", "y", "z", "w"]), r"column 'hour': has type string; the contract declares it as int64"),
    ],
)
def test_wrong_column_type_names_the_column(column, value, message):
    with pytest.raises(ContractError, match=message):
        check(events(**{column: value}))


def test_null_and_empty_ids_name_rows_and_values():
    with pytest.raises(ContractError) as err:
        check(events(user_id=["u1", None, "u2", ""]))
    text = str(err.value)
    assert "events.csv: column 'user_id': 2 row(s) are null, empty or only whitespace" in text
    assert "row 2: null, row 4: ''" in text


def test_labels_other_than_0_1():
    with pytest.raises(ContractError, match=r"column 'label': 2 row\(s\) hold values other than 0/1.*row 2: 2, row 3: -1"):
        check(events(label=[1, 2, -1, 0]))
    with pytest.raises(ContractError, match=r"row 1: 0\.5"):
        check(events(label=[0.5, 1.0, 0.0, 1.0]))
    assert check(events(label=[True, False, False, True])).events.column("label").to_pylist() == [1, 0, 0, 1]
    assert check(events(label=["1", "0", "0", "1"])).events.column("label").type == pa.int8()


def test_unparseable_and_null_timestamps():
    with pytest.raises(ContractError, match=r"column 'ts': 2 row\(s\) are null or cannot be read as a time.*row 2: 'yesterday', row 4: null"):
        check(events(ts=["2023-11-14T22:13:20Z", "yesterday", "2023-11-14T22:13:25Z", None]))


def test_out_of_range_timestamps_hint_at_the_unit():
    millis = [T0 * 1000, (T0 + 60) * 1000, (T0 + 5) * 1000, (T0 + 7) * 1000]
    with pytest.raises(ContractError, match=r"column 'ts': .*outside the allowed time range.*--ts-unit"):
        check(events(ts=millis), ts_unit="s")
    with pytest.raises(ContractError, match=r"row 1: '1980-01-01"):
        check(events(ts=["1980-01-01T00:00:00Z", "2023-11-14T22:13:20Z", "2023-11-14T22:13:21Z", "2023-11-14T22:13:22Z"]))
    with pytest.raises(ContractError, match="outside the allowed time range"):
        check(events(), max_ts=pd.Timestamp("2023-01-01", tz="UTC"))


def test_duplicate_events_point_at_the_first_occurrence():
    with pytest.raises(ContractError) as err:
        check(events(user_id=["u1", "u1", "u1", "u3"], item_id=["a", "b", "a", "c"], ts=[T0, T0 + 60, T0, T0 + 7]))
    text = str(err.value)
    assert "1 row(s) are duplicate events" in text
    assert "row 3:" in text and "first seen in row 1" in text


def test_fail_message_shows_at_most_five_rows():
    n = 12
    table = pa.table({"user_id": [f"u{i}" for i in range(n)], "item_id": ["a"] * n, "ts": [T0 + i for i in range(n)], "label": [3] * n})
    with pytest.raises(ContractError, match=r"row 5: 3 \(and 7 more\)"):
        validate_events(table, EventContract(), source="big.csv")


def test_quarantine_sets_bad_rows_aside_with_reasons_and_drops_nothing():
    table = events(
        user_id=["u1", None, "u2", "u1", "u4"],
        item_id=["a", "b", "a", "a", "d"],
        ts=[T0, T0 + 1, T0 + 2, T0, T0 + 4],
        label=[1, 0, 7, 0, 1],
        surface=["home"] * 5,
        hour=[1] * 5,
        rating=[1.0] * 5,
    )
    result = check(table, on_bad="quarantine")
    assert result.events.num_rows + result.n_rejected == table.num_rows
    assert result.events.column("user_id").to_pylist() == ["u1", "u4"]
    reasons = dict(zip(result.rejected["row"], result.rejected["reason"]))
    assert set(reasons) == {2, 3, 4}
    assert reasons[2].startswith("user_id: are null, empty or only whitespace")
    assert reasons[3].startswith("label: hold values other than 0/1")
    assert reasons[4].startswith("user_id,item_id,ts: are duplicate events")
    assert result.rejected.loc[result.rejected.row == 3, "label"].item() == "7"  # input values kept


def test_quarantine_file_is_written_next_to_the_output(tmp_path):
    table = events(label=[1, 0, 9, 1])
    result = check(table, on_bad="quarantine")
    paths = RunPaths(tmp_path / "run")
    info = write_source_output(SourceOutput(result.events, None, {"name": "test"}, result.rejected, result.coercions), paths)
    assert info["n_rejected"] == 1 and info["n_events"] == 3
    quarantined = pq.read_table(paths.quarantine).to_pandas()
    assert quarantined["row"].tolist() == [3] and "label" in quarantined["reason"].item()
    read_back, contract = read_events(paths.events)
    assert read_back.num_rows == 3 and contract == CONTRACT
    assert not list(paths.data_dir.glob(".*.tmp"))


def test_contract_marks_what_a_ranker_may_use():
    contract = EventContract.from_specs(["surface", "feedback:after_event"], ["hour:request:int64", "p_click:truth:float64"])
    assert contract.ranker_feature_columns() == ["surface", "hour"]
    assert contract.history_columns() == ["surface", "feedback", "hour"]
    assert EventContract.from_json(contract.to_json()) == contract


@pytest.mark.parametrize(
    "spec, message",
    [
        ("surface:sometimes", "known_at must be one of"),
        ("hour:request:int32", "type must be one of"),
        ("a:b:c:d", "expected name"),
        ("label", "required column"),
    ],
)
def test_bad_column_specs(spec, message):
    with pytest.raises(ContractError, match=message):
        EventContract.from_specs(extras=[spec])
    with pytest.raises(ContractError, match="declared twice"):
        EventContract.from_specs(["x"], ["x"])
    with pytest.raises(ContractError, match="must be of type string"):
        ColumnSpec("surface", "condition", "request", "int64")


def test_csv_reading_keeps_leading_zeros_and_applies_the_mapping(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("uid,item_id,when,clicked\n007,0042,1700000000,1\n008,0043,1700000001,0\n")
    table = read_table(path, {"uid": "user_id", "when": "ts", "clicked": "label"})
    out = validate_events(table, EventContract(), source=str(path)).events
    assert out.column("user_id").to_pylist() == ["007", "008"]
    assert out.column("item_id").to_pylist() == ["0042", "0043"]
    with pytest.raises(ContractError, match="names source column.*nope"):
        read_table(path, {"nope": "user_id"})
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ContractError, match="unknown file type '.json'"):
        read_table(tmp_path / "x.json")
    with pytest.raises(ContractError, match="x.csv: file not found"):
        read_table(tmp_path / "x.csv")


def test_items_need_unique_ids():
    assert validate_items(pa.table({"item_id": [1, 2], "title": ["a", "b"]}), "items.csv").column("item_id").to_pylist() == ["1", "2"]
    with pytest.raises(ContractError, match=r"items\.csv: column 'item_id': 1 row\(s\) repeat an item_id.*row 3"):
        validate_items(pa.table({"item_id": ["a", "b", "a"]}), "items.csv")
    with pytest.raises(ContractError, match="missing column 'item_id'"):
        validate_items(pa.table({"id": ["a"]}), "items.csv")


def test_options_are_checked():
    with pytest.raises(ContractError, match="on_bad must be 'fail' or 'quarantine', got 'drop'"):
        ValidationOptions(on_bad="drop")
    with pytest.raises(ContractError, match="ts_unit must be one of"):
        ValidationOptions(ts_unit="days")
