"""The offline batch embedding job: users in hash shards, resumable Parquet output, item vectors, optional PCA.

    out/
      manifest.json                    settings, finished shards, counts; `complete: true` when all are done
      users/shard-00003-of-00008.parquet   user_id, condition, embedding, event_timestamp, model_version
      items.parquet                    item_id, embedding, token, model_version
      pca.npz                          the projection (only with --dim), fitted once, reused on resume

The format (file names, columns, the manifest) is defined once in `contracts/embeddings.py`, which the feature
store reads the folder with.

Each shard holds the users whose stable hash falls in it; it is computed in memory, written under a temporary
name and renamed, then recorded in the manifest. Re-running skips recorded shards, so a killed run resumes where
it stopped and never leaves a partial shard under a final name. The event log (and a rows file) is read once:
one streaming pass splits it by shard into `out/partitions/` (stamped with the sources' fingerprints, reused on
resume, removed when the job completes), and each shard, local or on a Ray actor, reads only its own file. Memory
grows with the shard, not with the number of users.

Item vectors are the LM's output rows (`lm_head`): the dot product of a user vector with an item vector is the
model's own logit for that item under the query's condition. An item without a token of its own gets its
category's row (`token` says which). With `--dim D`, user and item vectors are both multiplied by the same D
principal directions (fitted on a sample of user vectors, not centred) so dot products are kept as far as the
directions span them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from contracts.embeddings import (
    ITEMS_FILE,
    MODEL_MANIFEST_FILE,
    PCA_FILE,
    SHARD_COUNTS,
    USER_EMBEDDING_SCHEMA,
    USERS_DIR,
    EmbeddingFolderError,
    EmbeddingManifest,
    ShardRecord,
    check_model_version,
    read_embedding_manifest,
    shard_file_name,
    write_embedding_manifest,
)
from contracts.embeddings import MANIFEST_FILE as MANIFEST
from contracts.files import atomic_path, write_parquet_atomic, write_text_atomic
from contracts.progress import bars_off
from lum.config import EmbedJobConfig  # noqa: F401  (re-exported)
from lum.embed import REQUEST, QueryGroup, TorchEngine, VllmEngine, build_queries, resolve_conditions
from lum.model import read_manifest, verify_weights
from lum.ray_runner import run_shards_with_ray
from lum.tokenizer import BehaviourTokenizer


class EmbedJobError(ValueError):
    """Bad input to the embedding job; the message says what was expected."""


@dataclass(frozen=True)
class AsOf:
    """Snapshot times, or `rows`: one query per (user, time) of an impressions table (rolling mode).

    `for_rows` (snapshots only): an impressions table (user_id, ts) whose rows the snapshots are for. A user is then
    embedded at an as-of time only when one of the user's rows joins that snapshot (the newest as-of time at or
    before the row, as Feast's point-in-time join picks it), and at the last as-of time in any case (the snapshot a
    service serves next). The vectors a training set joins are those a full daily job writes; the rest are skipped.
    """

    times: tuple[pd.Timestamp, ...] = ()
    rows_path: str | None = None
    for_rows: str | None = None

    @classmethod
    def parse(cls, text: str, for_rows: str | None = None) -> "AsOf":
        if text.startswith("rows:"):
            if for_rows:
                raise EmbedJobError("--for-rows restricts snapshot times; rolling mode (--as-of rows:PATH) embeds each row already")
            return cls(rows_path=text[5:])
        try:
            times = tuple(sorted(_utc(t) for t in text.split(",")))
        except ValueError as exc:
            raise EmbedJobError(f"cannot read as-of time(s) '{text}': expected ISO times, comma-separated, or rows:PATH") from exc
        return cls(times=times, for_rows=for_rows)

    def describe(self) -> str:
        if self.rows_path:
            return f"rows:{self.rows_path}"
        return ",".join(t.isoformat() for t in self.times) + (f" for rows:{self.for_rows}" if self.for_rows else "")


# The latest as-of time accepted after the last event of --events: a job embedding as of a later time (a mistyped
# year, decades on) would be accepted silently and serve vectors no log supports.
MAX_AS_OF_AFTER_LAST_EVENT = pd.Timedelta(days=366)


def _parquet_schema(path: str, option: str, expected: str) -> pa.Schema:
    """The schema of a Parquet input; EmbedJobError naming the file and its option when it is no Parquet file (a CSV)."""
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise EmbedJobError(f"{path} (given as {option}): not a Parquet file ({exc}); expected {expected}") from exc


def _utc(text: str | pd.Timestamp) -> pd.Timestamp:
    ts = pd.Timestamp(text)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def shard_of(user_ids: np.ndarray, shards: int) -> np.ndarray:
    """Stable shard index per user id (the same in every process and run)."""
    return (pd.util.hash_array(np.asarray(user_ids, dtype=object)) % np.uint64(shards)).astype(np.int64)


def _read_shard(path: str, columns: list[str], shard: int, shards: int) -> pd.DataFrame:
    """Stream a Parquet file and keep the rows of one shard's users."""
    parts = []
    for batch in pq.ParquetFile(path).iter_batches(columns=columns, batch_size=1 << 20):
        frame = batch.to_pandas()
        parts.append(frame[shard_of(frame["user_id"].astype(str).to_numpy(), shards) == shard])
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def round_to_dtype(matrix: np.ndarray, dtype: str) -> np.ndarray:
    """float32 [N, D] values rounded to `dtype` (float32 | float16 | bfloat16), as float32.

    Arrow has no list<float16> (or bfloat16) that every reader takes, so 16-bit vectors are stored as float32 that
    hold only 16-bit values: the ranker reads them unchanged, and the shards are written with byte-stream-split
    encoding, which stores the bytes a 16-bit value leaves zero in almost nothing (bfloat16: the low two bytes).
    bfloat16 rounds to nearest even on the float32 bits, as torch does.
    """
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    if dtype == "float16":
        return matrix.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        bits = matrix.view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
        return rounded.view(np.float32)
    return matrix


# the vectors' bytes split by significance (a 16-bit value's zero bytes then cost almost nothing) and zstd: 20k
# 64-d vectors take 4.3 MB as float32, 2.3 MB as float16, 1.8 MB as bfloat16 (5.7 MB with pyarrow's defaults)
VECTOR_PARQUET_OPTIONS = {"use_byte_stream_split": ["embedding.list.element"], "compression": "zstd",
                          "use_dictionary": ["user_id", "condition", "model_version"]}
PARTITIONS_DIR = "partitions"  # out/partitions/<source>/shard-*.parquet: the inputs split by user shard, while the job runs


def partition_by_shard(path: str, columns: list[str], shards: int, out: Path) -> list[Path]:
    """One streaming pass over a Parquet file, writing each shard's rows (users hashed by `shard_of`) to
    `out/shard-xxxxx-of-yyyyy.parquet`; every shard gets a file, empty or not. Files go to a staging folder
    renamed into place whole, so a killed pass leaves no partial partition under `out`."""
    staging = out.with_name(f".{out.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    source = pq.ParquetFile(path)
    schema = source.schema_arrow
    schema = pa.schema([schema.field(c) for c in columns])
    writers = [pq.ParquetWriter(staging / shard_file_name(s, shards), schema) for s in range(shards)]
    try:
        for batch in source.iter_batches(columns=columns, batch_size=1 << 20):
            table = pa.Table.from_batches([batch]).select(columns)
            which = shard_of(table.column("user_id").to_pandas().astype(str).to_numpy(), shards)
            order = np.argsort(which, kind="stable")
            bounds = np.searchsorted(which[order], np.arange(shards + 1))
            for s in range(shards):
                if bounds[s + 1] > bounds[s]:
                    writers[s].write_table(table.take(order[bounds[s]:bounds[s + 1]]))
    finally:
        for writer in writers:
            writer.close()
    if out.exists():  # an earlier partition of other inputs (or one killed before its stamp was written)
        shutil.rmtree(out)
    staging.replace(out)
    return [out / shard_file_name(s, shards) for s in range(shards)]


def _file_fingerprint(path: str | Path) -> str:
    stat = Path(path).stat()
    return hashlib.sha256(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


class EmbeddingJob:
    """One `lum embed` run. Use `run()`; `open_engine`/`close` are separate so tests can share an engine."""

    def __init__(self, model_dir: str | Path, events_path: str | Path, as_of: AsOf, out_dir: str | Path, config: EmbedJobConfig):
        self.model_dir, self.events_path, self.out_dir = Path(model_dir), str(events_path), Path(out_dir)
        self.as_of, self.config = as_of, config
        if not (self.model_dir / "config.json").exists():
            raise EmbedJobError(f"{self.model_dir} is not a LUM model folder (no config.json): point --model at the output of `lum pretrain`")
        self.manifest_in = read_manifest(self.model_dir)
        try:  # the version names a folder of the feature store, whose ingest refuses unsafe names: refuse it before any work
            check_model_version(self.manifest_in.get("model_version"), str(self.model_dir / MODEL_MANIFEST_FILE))
        except EmbeddingFolderError as exc:
            raise EmbedJobError(str(exc)) from None
        verify_weights(self.model_dir, self.manifest_in)  # before any engine loads them
        self.tokenizer = BehaviourTokenizer.load(self.model_dir, expected_fingerprint=self.manifest_in["tokenizer_fingerprint"])
        model_config = json.loads((self.model_dir / "config.json").read_text())
        if model_config["vocab_size"] != self.tokenizer.vocab_size:
            raise EmbedJobError(
                f"{self.model_dir}: the model has {model_config['vocab_size']} token rows but its tokenizer {self.tokenizer.vocab_size} tokens"
            )
        self.max_model_len = int(model_config["max_position_embeddings"])
        self.hidden_size = int(model_config["hidden_size"])
        self.conditions = resolve_conditions(self.tokenizer, config.conditions)
        self.max_history = config.max_history or self.tokenizer.config.max_history
        tpb = 1 + self.tokenizer.config.tokens_per_item
        fill = self.tokenizer.config.prompt_align - 1  # the longest left fill of a prompt (see build_queries)
        self.max_history = min(self.max_history, (self.max_model_len - 2 - fill) // tpb)
        self.model_version = self.manifest_in["model_version"]
        self.engine: Any = None
        self._check_inputs()

    # ------------------------------------------------------------------ inputs
    def _check_inputs(self) -> None:
        if not Path(self.events_path).exists():
            raise EmbedJobError(f"{self.events_path}: events file not found")
        schema = _parquet_schema(self.events_path, "--events",
                                 "the run's data/events.parquet or a split window (a CSV log becomes one with `lum data import files`)")
        needed = ["user_id", "item_id", "ts", "label", *self.tokenizer.config.condition_columns]
        missing = [c for c in needed if c not in schema.names]
        if missing:
            raise EmbedJobError(f"{self.events_path}: missing column(s) {', '.join(missing)} that this model's tokenizer needs")
        self.event_columns = needed
        ts = pq.read_table(self.events_path, columns=["ts"]).column("ts")
        first = pd.Timestamp(ts.to_pandas().min()) if len(ts) else None
        if self.as_of.rows_path is None:
            if not self.as_of.times:
                raise EmbedJobError("no as-of time given")
            if first is None or all(t <= first for t in self.as_of.times):
                raise EmbedJobError(
                    f"as-of time(s) {self.as_of.describe()} are not after the first event ({first}): no user has history before them"
                )
            last = pd.Timestamp(ts.to_pandas().max())
            late = [t for t in self.as_of.times if t > last + MAX_AS_OF_AFTER_LAST_EVENT]
            if late:  # a mistyped year: the vectors would describe users as of a time the log says nothing about
                raise EmbedJobError(
                    f"--as-of {late[0].isoformat()} is {(late[0] - last).days:,} days after the last event of {self.events_path} "
                    f"({last.isoformat()}); as-of times may be at most {MAX_AS_OF_AFTER_LAST_EVENT.days} days after it: check the year"
                )
        elif not Path(self.as_of.rows_path).exists():
            raise EmbedJobError(f"{self.as_of.rows_path}: rows file for rolling embeddings not found")
        else:
            rows_schema = _parquet_schema(self.as_of.rows_path, "--as-of rows:PATH", "a Parquet of (user_id, ts) rows, such as a split window")
            lacking = [c for c in ("user_id", "ts") if c not in rows_schema.names]
            if lacking:
                raise EmbedJobError(f"{self.as_of.rows_path} (--as-of rows:PATH): lacks column(s) {', '.join(lacking)}; expected (user_id, ts) rows")
        if self.as_of.for_rows:
            if not Path(self.as_of.for_rows).exists():
                raise EmbedJobError(f"{self.as_of.for_rows}: the --for-rows file (user_id, ts) not found")
            for_rows_schema = _parquet_schema(self.as_of.for_rows, "--for-rows", "a Parquet of (user_id, ts) rows")
            lacking = [c for c in ("user_id", "ts") if c not in for_rows_schema.names]
            if lacking:
                raise EmbedJobError(f"{self.as_of.for_rows}: the --for-rows file lacks column(s) {', '.join(lacking)}")
        if REQUEST in dict(self.conditions):
            if self.as_of.rows_path is None:
                raise EmbedJobError("the `request` condition takes each row's own context: it needs rolling mode (--as-of rows:PATH)")
            names = pq.read_schema(self.as_of.rows_path).names
            lacking = [c for c in self.tokenizer.config.condition_columns if c not in names]
            if lacking:
                raise EmbedJobError(f"{self.as_of.rows_path}: the `request` condition needs the condition column(s) {', '.join(lacking)} in the rows file")

    def _as_of_rows(self, shard: int, events: pd.DataFrame) -> pd.DataFrame:
        """(user_id, ts, key) queries of one shard; snapshot users come from the shard's `events` already read."""
        if self.as_of.rows_path:
            # the `request` condition needs each row's own context; a (user, time) is one request, one context
            rows = self._shard_rows("rows", shard)
            rows = rows.drop_duplicates(["user_id", "ts"]).reset_index(drop=True)
            rows["ts"] = pd.to_datetime(rows["ts"], utc=True)
            return rows.assign(key=rows["ts"])
        users = events["user_id"].astype(str).unique()
        times = self.as_of.times
        if not self.as_of.for_rows:
            frames = [pd.DataFrame({"user_id": users, "ts": t, "key": t}) for t in times]
            return pd.concat(frames, ignore_index=True)
        rows = self._shard_rows("for_rows", shard)
        row_ns = pd.to_datetime(rows["ts"], utc=True).astype("datetime64[ns, UTC]").astype("int64").to_numpy()
        which = np.searchsorted(np.array([t.value for t in times], dtype=np.int64), row_ns, side="right") - 1  # the newest as-of <= ts
        needed = pd.DataFrame({"user_id": rows["user_id"].astype(str).to_numpy(), "k": which})[which >= 0]
        last = pd.DataFrame({"user_id": users, "k": len(times) - 1})
        pairs = pd.concat([needed, last], ignore_index=True).drop_duplicates().sort_values(["user_id", "k"], kind="stable")
        stamps = pd.Series(times).iloc[pairs["k"].to_numpy()].to_numpy()
        return pd.DataFrame({"user_id": pairs["user_id"].to_numpy(), "ts": stamps, "key": stamps})

    # ------------------------------------------------------------------ engine
    def open_engine(self, engine: Any = None) -> None:
        if engine is not None:
            self.engine = engine
        elif self.config.engine == "vllm":
            self.engine = VllmEngine(str(self.model_dir), self.max_model_len, self.config.vllm)
        else:
            self.engine = TorchEngine(str(self.model_dir))

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    # ------------------------------------------------------------------ output
    def settings(self) -> dict[str, Any]:
        """What makes two runs the same run (resume only continues a run with identical settings)."""
        return self._settings({"for_rows": self.as_of.for_rows}, {"output_dtype": self.config.output_dtype, "dim": self.config.dim})

    def _settings(self, inputs: dict[str, str | None], options: dict[str, Any]) -> dict[str, Any]:
        """The settings of a job over this job's prompts (this one, `lum retrieve`'s): the model, the events and
        their fingerprints, the as-of times, the conditions and the prompt options; then the job's own input
        files (`inputs`, fingerprinted after `rows`; None when not given) and options (last). The keys keep this
        order: it is the manifest's."""
        files = {"rows": self.as_of.rows_path, **inputs}
        return {
            "model_version": self.model_version,
            "events": _file_fingerprint(self.events_path),
            "as_of": self.as_of.describe(),
            **{name: None if not path else _file_fingerprint(path) for name, path in files.items()},
            "conditions": [n for n, _ in self.conditions],
            "max_history": self.max_history,
            "prompt_align": 1 if self.as_of.rows_path else self.tokenizer.config.prompt_align,
            "window_stride": self.config.window_stride,
            "shards": self.config.shards,
            **options,
        }

    def _shard_path(self, shard: int) -> Path:
        return self.out_dir / USERS_DIR / shard_file_name(shard, self.config.shards)

    # ------------------------------------------------------------------ inputs split by shard
    def _sources(self) -> dict[str, tuple[str, list[str]]]:
        """name -> (Parquet path, columns) of every input a shard reads its users' rows from."""
        sources = {"events": (self.events_path, self.event_columns)}
        if self.as_of.rows_path:
            context = list(self.tokenizer.config.condition_columns) if REQUEST in dict(self.conditions) else []
            sources["rows"] = (self.as_of.rows_path, ["user_id", "ts", *context])
        if self.as_of.for_rows:
            sources["for_rows"] = (self.as_of.for_rows, ["user_id", "ts"])
        return sources

    def partition_inputs(self) -> None:
        """Split every input by shard in one pass each (skipped when the stamped partition is of the same files)."""
        for name, (path, columns) in self._sources().items():
            folder = self.out_dir / PARTITIONS_DIR / name
            stamp = {"source": _file_fingerprint(path), "columns": columns, "shards": self.config.shards}
            done = folder / "partition.json"
            if done.exists() and json.loads(done.read_text()) == stamp:
                continue
            partition_by_shard(path, columns, self.config.shards, folder)
            write_text_atomic(json.dumps(stamp), done)

    def _shard_rows(self, name: str, shard: int) -> pd.DataFrame:
        """One shard's rows of input `name`: its partition file when the inputs were split, else a filtering pass."""
        path, columns = self._sources()[name]
        part = self.out_dir / PARTITIONS_DIR / name / shard_file_name(shard, self.config.shards)
        if part.exists():
            return pq.read_table(part).to_pandas()
        return _read_shard(path, columns, shard, self.config.shards)

    def embed_shard(self, shard: int, bar: tqdm | None = None) -> tuple[pd.DataFrame, np.ndarray, dict[str, int]]:
        """Rows (user_id, condition, event_timestamp) and vectors [N, H] of one shard, plus counts."""
        events = self._shard_rows("events", shard)
        queries = self._as_of_rows(shard, events)
        # snapshots fill prompts to whole prefix-cache blocks; rolling rows share their history across rows instead
        align = 1 if self.as_of.rows_path else self.tokenizer.config.prompt_align
        groups, skipped = build_queries(self.tokenizer, events, queries, self.conditions, self.max_history, self.config.window_stride, align)
        keys: list[tuple[str, object, str]] = []
        vectors: list[np.ndarray] = []
        for start in range(0, len(groups), self.config.groups_per_call):
            chunk: list[QueryGroup] = groups[start : start + self.config.groups_per_call]
            for group, out in zip(chunk, self.engine.embed(chunk)):
                vectors.append(out)
                keys += [(group.user_id, key, name) for key, name in group.keys]
            if bar is not None:  # users/s is the bar's rate; tokens/s counts history + query tokens computed
                self._tokens_done += sum(len(g.tokens) + g.n_queries for g in chunk)
                bar.update(len({g.user_id for g in chunk}))
                bar.set_postfix(tok_s=f"{self._tokens_done / max(time.perf_counter() - self._started, 1e-9):,.0f}")
        rows = pd.DataFrame(keys, columns=["user_id", "event_timestamp", "condition"])
        matrix = np.concatenate(vectors) if vectors else np.zeros((0, self.hidden_size), np.float32)
        counts = {"users": int(rows["user_id"].nunique()), "rows": len(rows), "queries_without_history": skipped,
                  "tokens": int(sum(len(g.tokens) + g.n_queries for g in groups))}
        return rows, matrix, counts

    def _table(self, rows: pd.DataFrame, matrix: np.ndarray, projection: np.ndarray | None) -> pa.Table:
        if projection is not None:
            matrix = matrix @ projection.T
        matrix = round_to_dtype(matrix, self.config.output_dtype)
        values = pa.array(matrix.ravel(), pa.float32())
        offsets = pa.array(np.arange(0, matrix.size + 1, max(matrix.shape[1], 1), dtype=np.int32)[: len(matrix) + 1])
        embedding = pa.ListArray.from_arrays(offsets, values) if len(matrix) else pa.array([], pa.list_(pa.float32()))
        return pa.table(
            {
                "user_id": pa.array(rows["user_id"].astype(str), pa.string()),
                "condition": pa.array(rows["condition"].astype(str), pa.string()),
                "embedding": embedding,
                "event_timestamp": pa.array(pd.to_datetime(rows["event_timestamp"], utc=True)).cast(pa.timestamp("us", tz="UTC")),
                "model_version": pa.array([self.model_version] * len(rows), pa.string()),
            },
            schema=USER_EMBEDDING_SCHEMA,
        )

    def _projection(self, sample: np.ndarray) -> np.ndarray | None:
        if self.config.dim is None:
            return None
        path = self.out_dir / PCA_FILE
        if path.exists():
            return np.load(path)["components"]
        from sklearn.decomposition import PCA

        if self.config.dim > min(sample.shape):
            raise EmbedJobError(f"--dim {self.config.dim} is larger than the sample allows ({sample.shape[0]} vectors of {sample.shape[1]})")
        rng = np.random.default_rng(0)
        pick = sample[rng.permutation(len(sample))[: self.config.pca_sample]]
        pca = PCA(n_components=self.config.dim, random_state=0).fit(pick)
        with atomic_path(path, suffix=".npz") as tmp:  # np.savez appends .npz to any other name
            np.savez(
                tmp,
                components=pca.components_.astype(np.float32),
                explained_variance_ratio=pca.explained_variance_ratio_,
                model_version=np.array(self.model_version),
            )
        return pca.components_.astype(np.float32)

    def item_table(self, projection: np.ndarray | None) -> pa.Table:
        from safetensors import safe_open

        with safe_open(str(self.model_dir / "model.safetensors"), framework="np") as f:
            head = f.get_tensor("lm_head.weight")
        tok = self.tokenizer
        items = tok.known_items()
        # semantic mode: the first code's row, the only item-side logit a query's hidden state gives directly
        ids = tok.item_ids(pd.Series(items, dtype="string"))[:, 0]
        matrix = head[ids].astype(np.float32)
        if projection is not None:
            matrix = matrix @ projection.T
        matrix = round_to_dtype(matrix, self.config.output_dtype)
        return pa.table(
            {
                "item_id": pa.array(items, pa.string()),
                "embedding": pa.array(list(matrix), pa.list_(pa.float32())),
                "token": pa.array([tok.vocab[i] for i in ids], pa.string()),
                "model_version": pa.array([self.model_version] * len(items), pa.string()),
            }
        )

    # ------------------------------------------------------------------ the run
    def write_shard(self, shard: int, projection: np.ndarray | None, bar: tqdm | None = None) -> ShardRecord:
        """Embed one shard and write it (temporary name, then rename); fits the projection first if needed."""
        rows, matrix, counts = self.embed_shard(shard, bar)
        if self.config.dim and projection is None:
            projection = self._projection(matrix)
        write_parquet_atomic(self._table(rows, matrix, projection), self._shard_path(shard), **VECTOR_PARQUET_OPTIONS)
        return ShardRecord(self._shard_path(shard).name, counts)

    def constructor_args(self) -> dict[str, Any]:
        """What a worker process needs to rebuild this job (for Ray actors)."""
        return {"model_dir": str(self.model_dir), "events_path": self.events_path, "as_of": self.as_of, "out_dir": str(self.out_dir), "config": self.config}

    def run(self, progress: bool = True, ray_actors: int | None = None, ray_address: str | None = None) -> dict[str, Any]:
        """Embed every unfinished shard; with `ray_actors`, on a Ray Data pool of that many engine actors."""
        (self.out_dir / USERS_DIR).mkdir(parents=True, exist_ok=True)
        manifest = self._manifest_to_resume()
        todo = [s for s in range(self.config.shards) if s not in manifest.shards or not self._shard_path(s).exists()]
        if todo and self.config.shards > 1:
            self.partition_inputs()  # the log is read once here, not once per shard
        needs_local_engine = not ray_actors or (self.config.dim and not (self.out_dir / PCA_FILE).exists())
        if todo and self.engine is None and needs_local_engine:
            self.open_engine()
        bar = tqdm(desc="embedding", unit="user", disable=bars_off(progress))
        started = self._started = time.perf_counter()
        self._tokens_done = 0
        pca_path = self.out_dir / PCA_FILE
        projection = np.load(pca_path)["components"] if (self.config.dim and pca_path.exists()) else None
        if ray_actors and todo:
            if self.config.dim and projection is None:  # the projection is fitted once, on the first shard, here
                manifest.shards[todo[0]] = self.write_shard(todo[0], None, bar)
                projection = np.load(pca_path)["components"]
                write_embedding_manifest(manifest, self.out_dir)
                todo = todo[1:]
            for shard, record in run_shards_with_ray(self, todo, projection, ray_actors, ray_address):
                manifest.shards[shard] = record
                write_embedding_manifest(manifest, self.out_dir)
                bar.update(record.counts["users"])
        else:
            for shard in todo:
                manifest.shards[shard] = self.write_shard(shard, projection, bar)
                if self.config.dim and projection is None:
                    projection = np.load(pca_path)["components"]
                write_embedding_manifest(manifest, self.out_dir)
        bar.close()
        if not (self.out_dir / ITEMS_FILE).exists() or todo:
            if self.config.dim and projection is None:
                projection = self._projection(np.zeros((0, self.hidden_size)))
            write_parquet_atomic(self.item_table(projection), self.out_dir / ITEMS_FILE)
        manifest.totals = {k: sum(s.counts[k] for s in manifest.shards.values()) for k in SHARD_COUNTS}
        manifest.complete = True
        manifest.seconds_this_run = round(time.perf_counter() - started, 2)
        manifest.embedding_dim = self.config.dim or self.hidden_size
        write_embedding_manifest(manifest, self.out_dir)
        if (self.out_dir / PARTITIONS_DIR).exists():  # a copy of the inputs, needed only while shards remain
            shutil.rmtree(self.out_dir / PARTITIONS_DIR)
        return manifest.to_json()

    def _manifest_to_resume(self) -> EmbeddingManifest:
        """The manifest of an earlier run into the same folder with the same settings, or a new one."""
        settings = self.settings()
        path = self.out_dir / MANIFEST
        if not path.exists():
            return EmbeddingManifest(settings, engine=self.config.engine, hidden_size=self.hidden_size, source_model=str(self.model_dir))
        previous = json.loads(path.read_text())
        previous_settings = previous.get("settings") if isinstance(previous, dict) else previous
        if previous_settings != settings:
            raise EmbedJobError(
                f"{self.out_dir} holds embeddings made with other settings ({previous_settings}); choose another --out or remove it"
            )
        try:
            return EmbeddingManifest.from_json(previous, path)
        except EmbeddingFolderError as exc:
            raise EmbedJobError(f"{exc}; choose another --out or remove it") from exc


def read_user_embeddings(out_dir: str | Path) -> pa.Table:
    """All finished shards of a complete job, in (user_id, condition, event_timestamp) order."""
    out_dir = Path(out_dir)
    try:
        manifest = read_embedding_manifest(out_dir)
        paths = manifest.shard_paths(out_dir) if manifest.complete else []
    except EmbeddingFolderError as exc:
        raise EmbedJobError(str(exc)) from exc
    if not manifest.complete:
        raise EmbedJobError(f"{out_dir}: the embedding job has not finished (re-run it to resume)")
    tables = [pq.read_table(path) for path in paths]
    table = pa.concat_tables(tables)
    return table.sort_by([("user_id", "ascending"), ("condition", "ascending"), ("event_timestamp", "ascending")])
