"""Reference interpreter of an exported ranker's model_spec.json: the model inputs from the raw feature columns.

Standalone (numpy and pandas only; pyarrow to read Parquet): `lum ranker export` copies it into every export, so
a team porting the inputs to another stack can run it beside their own code and compare.

    python spec_reference.py model_spec.json rows.parquet inputs.npz

`rows.parquet` holds one row per candidate with the raw feature columns Feast serves (the training set's columns:
ids, request context, counters and flags, `hist_*` lists, `lum_*` vectors, `ts`). `inputs.npz` gets, for
LightGBM, `features` [N, F] float32 (NaN: missing); for the DLRM, `dense` [N, F] float32 (standardised) and
`values` / `lengths` int64 (the sparse ids, key-major). Each input's `compute` is an op of the closed vocabulary
below (docs/deploy.md#input-transforms says the same in words). Rows of one request (same user and `ts`) must
be passed together: the request ops compare a candidate with the other candidates of its request.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import pandas as pd


def text(value: Any) -> str | None:
    """A value as the vocabularies and comparisons see it; None for a null."""
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float | np.floating) and np.isnan(value)):
        return None
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating) and float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


class Rows:
    """The raw columns of N rows, read the way the ops need them."""

    def __init__(self, frame: pd.DataFrame, spec: dict[str, Any]):
        self.frame, self.spec, self.n = frame.reset_index(drop=True), spec, len(frame)
        self.ops = spec["ops"]

    def numbers(self, column: str) -> np.ndarray:
        return pd.to_numeric(self.frame[column]).to_numpy(dtype=np.float64, na_value=np.nan)

    def texts(self, column: str) -> list[str | None]:
        return [text(v) for v in self.frame[column]]

    def lists(self, column: str, last: int) -> list[np.ndarray]:
        """Each row's list (a null list is empty), only its last `last` entries."""
        out = []
        for value in self.frame[column]:
            entries = np.asarray([] if value is None or (np.ndim(value) == 0 and pd.isna(value)) else value, dtype=object)
            out.append(entries[len(entries) - min(len(entries), last):])
        return out

    def vectors(self, column: str) -> np.ndarray:
        """[N, D] float64, a NaN row where the vector is null."""
        values = [None if v is None or (np.ndim(v) == 0 and pd.isna(v)) else np.asarray(v, dtype=np.float64) for v in self.frame[column]]
        dim = next((len(v) for v in values if v is not None), 1)
        return np.stack([np.full(dim, np.nan) if v is None else v for v in values]) if values else np.zeros((0, dim))

    def request_seconds(self, column: str) -> np.ndarray:
        times = pd.to_datetime(self.frame[column], utc=True)
        return ((times - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(microseconds=1)).to_numpy(dtype=np.float64) / 1e6

    def table(self, name: str) -> tuple[dict[str, int], np.ndarray]:
        """(item -> row, unit vectors) of one of the spec's vector tables (item_factors, lm_item_vectors)."""
        table = self.spec[name]
        vectors = np.asarray(table["vectors"], dtype=np.float64).reshape(len(table["items"]), -1)
        return {item: i for i, item in enumerate(table["items"])}, vectors


def _condition_index(rows: Rows) -> np.ndarray:
    """[N] which LUM condition is each row's request condition, -1 when none matches."""
    rule = rows.ops["request_condition"]
    if "always" in rule:
        return np.full(rows.n, rule["always"])
    best, best_size = np.full(rows.n, -1), np.zeros(rows.n, dtype=int)
    for candidate in rule["candidates"]:
        match = np.ones(rows.n, dtype=bool)
        for column, value in candidate["match"].items():
            match &= np.asarray([t == value for t in rows.texts(column)], dtype=bool)
        better = match & (len(candidate["match"]) > best_size)
        best[better], best_size[better] = candidate["index"], len(candidate["match"])
    return best


def _per_request(values: np.ndarray, rows: Rows, stat: str) -> np.ndarray:
    """Each value against its request's (the rows of the same user and time): minus the mean, minus the max, or its
    rank (1 = highest, ties share the average rank); a NaN value stays NaN and is left out of the others."""
    user, time = rows.ops["request_group"]
    keys = pd.DataFrame({"user": rows.texts(user), "time": pd.to_datetime(rows.frame[time], utc=True)})
    groups = keys.groupby(["user", "time"], sort=False, dropna=False).ngroup().to_numpy()
    out = np.full(rows.n, np.nan)
    for g in np.unique(groups):
        at = np.flatnonzero(groups == g)
        x = values[at]
        present = ~np.isnan(x)
        if not present.any():
            continue
        if stat == "vs_request_mean":
            out[at] = x - x[present].mean()
        elif stat == "vs_request_max":
            out[at] = x - x[present].max()
        else:  # request_rank: 1 + how many are higher, + half of the other equal ones
            p = x[present]
            out[at[present]] = [1 + (p > v).sum() + ((p == v).sum() - 1) / 2 for v in p]
    return out


def evaluate(op: dict[str, Any], rows: Rows) -> np.ndarray:
    """[N] float64 values of one op (NaN: missing)."""
    kind = op["op"]
    if kind == "raw":
        values = rows.numbers(op["column"])
        return np.where(np.isnan(values), op["null_as"], values) if "null_as" in op else values
    if kind == "vocabulary_id":
        vocabulary = rows.spec["vocabularies"][op["vocabulary"]]
        return np.asarray([vocabulary["ids"].get(t, vocabulary["oov_id"]) if t is not None else vocabulary["oov_id"]
                           for t in rows.texts(op["column"])], dtype=np.float64)
    if kind == "signed_log1p":
        x = evaluate(op["of"], rows)
        return np.sign(x) * np.log1p(np.abs(x))
    if kind == "log1p":
        x = evaluate(op["of"], rows)
        return np.log1p(np.maximum(x, op["clip_min"]) if "clip_min" in op else x)
    if kind == "is_missing":
        return np.isnan(evaluate(op["of"], rows)).astype(np.float64)
    if kind in ("dot", "cosine"):
        a, b = rows.vectors(op["a"]), rows.vectors(op["b"])
        dot = (a * b).sum(axis=1)
        if kind == "dot":
            return dot
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.nan)
    if kind == "component":
        return rows.vectors(op["column"])[:, op["index"]]
    if kind == "any_missing":
        return np.any([np.isnan(rows.vectors(c)).any(axis=1) for c in op["columns"]], axis=0).astype(np.float64)
    if kind == "at_request_condition":
        which = _condition_index(rows)
        per_condition = np.stack([evaluate(o, rows) for o in op["by_condition"]], axis=1) if op["by_condition"] else np.zeros((rows.n, 1))
        return np.where(which >= 0, per_condition[np.arange(rows.n), np.maximum(which, 0)], np.nan)
    if kind in ("vs_request_mean", "vs_request_max", "request_rank"):
        return _per_request(evaluate(op["of"], rows), rows, kind)
    if kind in ("list_length", "history_share_equal", "history_count_equal", "history_contains", "hours_since_newest_equal",
                "history_similarity"):
        return _history(op, rows)
    raise ValueError(f"unknown op '{kind}' in model_spec.json")


def _history(op: dict[str, Any], rows: Rows) -> np.ndarray:
    """The ops over each row's last `last` history entries (newest last)."""
    kind, last = op["op"], op["last"]
    entries = rows.lists(op["list"], last)
    if kind == "list_length":
        return np.asarray([len(e) for e in entries], dtype=np.float64)
    if kind == "history_similarity":
        index, table = rows.table(op["history_vectors"])
        target = op["target"]
        if "vector_column" in target:
            targets = rows.vectors(target["vector_column"])
            with np.errstate(invalid="ignore", divide="ignore"):
                targets = targets / np.linalg.norm(targets, axis=1, keepdims=True) if target.get("normalize") else targets
        else:
            target_index, target_table = rows.table(target["vectors"])
            missing = np.full(target_table.shape[1], np.nan)
            targets = np.stack([target_table[target_index[t]] if t in target_index else missing for t in rows.texts(target["key_column"])])
        out = np.full(rows.n, np.nan)
        for r, items in enumerate(entries):
            items = items[len(items) - min(len(items), op["newest"]):] if op["newest"] else items
            sims = np.asarray([table[index[text(i)]] @ targets[r] if text(i) in index else np.nan for i in items], dtype=np.float64)
            sims = sims[~np.isnan(sims)]
            if len(sims):
                out[r] = sims.max() if op["reduce"] == "max" else sims.mean()
        return out
    targets = rows.texts(op["equals"])
    same = [np.asarray([text(v) is not None and text(v) == t for v in e], dtype=bool) for e, t in zip(entries, targets)]
    if kind == "history_contains":
        return np.asarray([s.any() for s in same], dtype=np.float64)
    if kind == "history_count_equal":
        return np.asarray([s.sum() for s in same], dtype=np.float64)
    if kind == "history_share_equal":
        newest = op.get("newest") or last
        return np.asarray([s[len(s) - min(len(s), newest):].mean() if len(s) else np.nan for s in same], dtype=np.float64)
    # hours_since_newest_equal: the smallest (request time - entry time) / 3600 over the equal entries; NaN when none
    times = rows.lists(op["times"], last)
    now = rows.request_seconds(op["request_time"])
    return np.asarray([((now[r] - times[r][s].astype(np.float64)) / 3600.0).min() if s.any() else np.nan for r, s in enumerate(same)])


def _sparse_ids(op: dict[str, Any], rows: Rows) -> list[np.ndarray]:
    """Each row's ids of one DLRM sparse key."""
    if op["op"] == "vocabulary_id":
        return [np.asarray([i], dtype=np.int64) for i in evaluate(op, rows).astype(np.int64)]
    if op["op"] == "vocabulary_ids_of_last":
        vocabulary = rows.spec["vocabularies"][op["vocabulary"]]
        return [np.asarray([vocabulary["ids"].get(text(v), vocabulary["oov_id"]) if text(v) is not None else vocabulary["oov_id"]
                            for v in e], dtype=np.int64) for e in rows.lists(op["list"], op["last"])]
    if op["op"] == "age_buckets_of_last":  # 1 + the number of edges at or below the age; an unknown age is the oldest
        now, edges = rows.request_seconds(op["request_time"]), np.asarray(op["edges_hours"])
        out = []
        for r, times in enumerate(rows.lists(op["times"], op["last"])):
            hours = np.nan_to_num((now[r] - times.astype(np.float64)) / 3600.0, nan=np.inf)
            out.append(np.asarray([1 + (edges <= max(h, 0.0)).sum() for h in hours], dtype=np.int64))
        return out
    raise ValueError(f"unknown sparse op '{op['op']}' in model_spec.json")


def build_inputs(spec: dict[str, Any], frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """The model inputs of `frame`'s rows as `spec` describes them (see the module docstring)."""
    rows = Rows(frame, spec)
    if spec["model"] == "lightgbm":
        columns = [evaluate(f["compute"], rows) for f in spec["features"]]
        return {"features": np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((rows.n, 0), np.float32)}
    dense = []
    for d in spec["dense"]:
        with np.errstate(invalid="ignore", divide="ignore"):
            x = (evaluate(d["compute"], rows) - d["mean"]) / d["std"]
        dense.append(np.where(np.isfinite(x), x, 0.0))
    per_key = [_sparse_ids(s["compute"], rows) for s in spec["sparse"]]  # key-major, as the program reads them
    values = [ids for key in per_key for ids in key]
    return {"dense": np.stack(dense, axis=1).astype(np.float32),
            "values": np.concatenate(values) if values else np.zeros(0, np.int64),
            "lengths": np.asarray([len(ids) for ids in values], dtype=np.int64)}


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python spec_reference.py model_spec.json rows.parquet inputs.npz")
    with open(sys.argv[1]) as f:
        model_spec = json.load(f)
    np.savez(sys.argv[3], **build_inputs(model_spec, pd.read_parquet(sys.argv[2])))
