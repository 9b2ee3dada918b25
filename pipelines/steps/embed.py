"""Run-folder step of the embeddings: which query conditions, as-of times and rows (the job itself runs in a process of its
own: lum.embed_process.embed_in_subprocess)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from contracts.embeddings import MODEL_MANIFEST_FILE
from pipelines.data.contract import read_contract, read_events, write_parquet_atomic
from pipelines.paths import RunPaths


def query_conditions(model_dir: Path, configured: tuple[str, ...], rolling: bool, events: Path) -> str:
    """The configured query conditions, or by default: in rolling mode `request` (each row's own context, the
    condition LUM's ranker features are about), plus one per value of the model's first condition column."""
    if configured:
        if "request" in configured and not request_time_conditions(model_dir, events):
            raise ValueError("embed.conditions asks `request`, but the model's condition columns are not all known at request time "
                             "(querying a row's own post-event context would leak its label)")
        return ",".join(configured)
    from lum.tokenizer import BehaviourTokenizer

    manifest = json.loads((model_dir / MODEL_MANIFEST_FILE).read_text())
    first = manifest["condition_columns"][0]
    tokenizer = BehaviourTokenizer.load(model_dir, expected_fingerprint=manifest["tokenizer_fingerprint"])
    names = tokenizer.condition_names(column=first)
    if not names:
        raise ValueError(f"{model_dir}: no condition token of the form {first}=VALUE; set embed.conditions in the run config")
    return ",".join((["request"] if rolling and request_time_conditions(model_dir, events) else []) + sorted(names))


def request_time_conditions(model_dir: Path, events: Path) -> bool:
    """Whether every condition column of the model is known at request time. Only then may a row's own context be
    a query condition: MovieLens' feedback level is derived from the rating, so querying it would leak the label."""

    manifest = json.loads((model_dir / MODEL_MANIFEST_FILE).read_text())
    contract = read_contract(events)
    known = {c.name: c.known_at for c in contract.conditions}
    return all(known.get(c) == "request" for c in manifest["condition_columns"])


def embedding_rows(paths: RunPaths, split: str, out: Path) -> Path:
    """(user_id, ts, condition columns) of the ranker-training and test windows: the moments (and contexts) a
    rolling embedding is needed for."""
    if not out.exists():  # kept once written: the embedding job's resume check fingerprints this file
        _, contract = read_events(paths.split_file(split, "train"))
        columns = ["user_id", "ts", *contract.condition_names]
        tables = [pq.read_table(paths.split_file(split, w), columns=columns) for w in ("train", "test")]
        write_parquet_atomic(pa.concat_tables(tables), out)
    return out


def snapshot_times(paths: RunPaths, split: str, every: str) -> str:
    """The daily (every `every`) batch job's as-of times: each period boundary from the start of the training window
    to the end of the test window, and the first boundary after the last event (the snapshot the online store
    serves after the run)."""
    summary = json.loads(paths.split_summary(split).read_text())["windows"]
    start = pd.Timestamp(summary["train"]["ts_min"]).floor(every)
    last = pd.Timestamp(summary["test"]["ts_max"])
    after = last.floor(every) + pd.tseries.frequencies.to_offset(every)
    return ",".join(t.isoformat() for t in pd.date_range(start, after, freq=every))
