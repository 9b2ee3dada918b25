"""feature_store.stream.check_events on hand-built batches (tests/test_stream.py pushes real batches into Feast, e2e):
a valid batch comes out typed as the store keeps ids and times; a bad one is refused whole with its row and field."""

from __future__ import annotations

import unicodedata

import pandas as pd
import pytest

from feature_store.stream import StreamInputError, check_events


def _batch(**changes) -> pd.DataFrame:
    frame = pd.DataFrame({"user_id": ["u1", 7], "item_id": ["i1", "i2"], "ts": ["2025-01-20T10:00:00Z", "2025-01-20T11:30:00+01:00"],
                          "label": [1, 0.0]})
    for column, (row, value) in changes.items():
        frame[column] = frame[column].astype(object)
        frame.at[row, column] = value
    return frame


def test_a_valid_batch_is_typed_as_the_store_keeps_it():
    out = check_events(_batch(item_id=(1, unicodedata.normalize("NFD", "caf\u00e9"))))
    assert out.user_id.tolist() == ["u1", "7"]  # ids are strings
    assert out.item_id.tolist() == ["i1", "caf\u00e9"]  # in the NFC spelling the import stores
    assert out.ts.tolist() == [pd.Timestamp("2025-01-20 10:00", tz="UTC"), pd.Timestamp("2025-01-20 10:30", tz="UTC")]
    assert out.label.tolist() == [1, 0] and out.label.dtype == "int64"


@pytest.mark.parametrize("changes, message", [
    ({"label": (1, 2)}, "events: row 1: field 'label' is 2, expected 0 or 1; nothing was applied"),
    ({"label": (0, "yes")}, "events: row 0: field 'label' is 'yes', expected 0 or 1"),
    ({"item_id": (1, None)}, "events: row 1: field 'item_id' is empty; nothing was applied"),
    ({"user_id": (0, "")}, "events: row 0: field 'user_id' must be a non-empty id of at most 1,024 UTF-8 bytes"),
    ({"user_id": (1, "\u00e9" * 513)}, "events: row 1: field 'user_id' must be a non-empty id of at most 1,024 UTF-8 bytes"),
    ({"ts": (1, "yesterday")}, "events: field 'ts' must be a timestamp"),
])
def test_a_bad_event_refuses_the_whole_batch_naming_its_row_and_field(changes, message):
    with pytest.raises(StreamInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_events(_batch(**changes))


def test_a_missing_field_is_named_with_what_an_event_needs():
    with pytest.raises(StreamInputError, match=r"push.jsonl: missing field\(s\) label \(an event needs user_id, item_id, ts, label\)"):
        check_events(_batch().drop(columns=["label"]), source="push.jsonl")
