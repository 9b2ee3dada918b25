"""The offline batch retrieval job (`lum retrieve`): top-N candidates per (user, condition), sharded and resumable.

    out/
      manifest.json                          settings, finished shards, counts; `complete: true` when all are done
      users/shard-00003-of-00008.parquet     user_id, condition, event_timestamp, rank, item_id, score, model_version

The job takes the embedding job's inputs and checks (model folder, weights' hash, tokenizer, events, as-of times
or rows, conditions; `lum.embed_job.EmbeddingJob`) and asks the same prompts; instead of a hidden state it
generates items (lum/retrieve.py). Shards work as there: users by stable hash, each shard computed in memory,
written under a temporary name and renamed, then recorded in the manifest; a re-run skips recorded shards, and
a folder made with other settings is refused. The format is defined in contracts/candidates.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from contracts.candidates import (
    CANDIDATE_COUNTS,
    CANDIDATE_SCHEMA,
    CandidateFolderError,
    CandidateManifest,
    write_candidate_manifest,
)
from contracts.embeddings import MANIFEST_FILE, USERS_DIR, ShardRecord, shard_file_name
from contracts.files import write_parquet_atomic
from contracts.progress import bars_off
from lum.config import RetrieveJobConfig  # noqa: F401  (re-exported)
from lum.embed import build_queries
from lum.embed_job import AsOf, EmbeddingJob, EmbedJobError, _read_shard
from lum.retrieve import ItemTrie, TorchRetrievalEngine, VllmRetrievalEngine, beam_search


class RetrieveJobError(EmbedJobError):
    """Bad input to the retrieval job; the message says what was expected."""


def read_catalogue(path: str | Path) -> list[str]:
    """The item ids of a catalogue Parquet (column item_id): the only items the search may produce."""
    path = Path(path)
    if not path.is_file():
        raise RetrieveJobError(f"{path}: catalogue file not found")
    if "item_id" not in pq.read_schema(path).names:
        raise RetrieveJobError(f"{path}: the catalogue needs an item_id column (has: {', '.join(pq.read_schema(path).names)})")
    items = pq.read_table(path, columns=["item_id"]).column("item_id").to_pandas()
    if items.isna().any():
        raise RetrieveJobError(f"{path}: column item_id holds {int(items.isna().sum())} empty value(s)")
    return sorted(set(items.astype(str)))


class RetrievalJob(EmbeddingJob):
    """One `lum retrieve` run. Use `run()`; `open_engine(engine)` lets tests share an engine."""

    def __init__(self, model_dir: str | Path, events_path: str | Path, as_of: AsOf, out_dir: str | Path, config: RetrieveJobConfig,
                 catalogue: str | Path | None = None):
        if as_of.for_rows:
            raise RetrieveJobError("--for-rows is an embedding-job option; retrieval embeds nothing to join")
        super().__init__(model_dir, events_path, as_of, out_dir, config)  # type: ignore[arg-type]  # the fields it reads are shared
        self.catalogue = None if catalogue is None else str(catalogue)
        self.trie = ItemTrie.from_tokenizer(self.tokenizer, read_catalogue(catalogue) if catalogue else None)

    def open_engine(self, engine: Any = None) -> None:
        if engine is not None:
            self.engine = engine
        elif self.config.engine == "vllm":
            self.engine = VllmRetrievalEngine(str(self.model_dir), self.max_model_len, max(self.config.beam, self.config.top), self.config.vllm)
        else:
            self.engine = TorchRetrievalEngine(str(self.model_dir))

    def settings(self) -> dict[str, Any]:
        """What makes two runs the same run (resume only continues a run with identical settings)."""
        return self._settings({"catalogue": self.catalogue}, {"top": self.config.top, "beam": self.config.beam})

    def retrieve_shard(self, shard: int, bar: tqdm | None = None) -> tuple[pa.Table, dict[str, int]]:
        """The candidates table of one shard and its counts."""
        events = _read_shard(self.events_path, self.event_columns, shard, self.config.shards)
        queries = self._as_of_rows(shard, events)
        align = 1 if self.as_of.rows_path else self.tokenizer.config.prompt_align
        groups, skipped = build_queries(self.tokenizer, events, queries, self.conditions, self.max_history, self.config.window_stride, align)
        columns: dict[str, list[Any]] = {name: [] for name in ("user_id", "condition", "event_timestamp", "rank", "item_id", "score")}
        for start in range(0, len(groups), self.config.groups_per_call):
            chunk = groups[start : start + self.config.groups_per_call]
            for group, lists in zip(chunk, beam_search(self.engine, self.trie, chunk, self.config.beam, self.config.top)):
                for (key, name), ranked in zip(group.keys, lists):
                    columns["user_id"] += [group.user_id] * len(ranked)
                    columns["condition"] += [name] * len(ranked)
                    columns["event_timestamp"] += [key] * len(ranked)
                    columns["rank"] += list(range(len(ranked)))
                    columns["item_id"] += [item for item, _ in ranked]
                    columns["score"] += [score for _, score in ranked]
            if bar is not None:
                bar.update(len({g.user_id for g in chunk}))
        table = pa.table(
            {
                "user_id": pa.array(columns["user_id"], pa.string()),
                "condition": pa.array(columns["condition"], pa.string()),
                "event_timestamp": pa.array(pd.to_datetime(pd.Series(columns["event_timestamp"], dtype=object), utc=True)).cast(pa.timestamp("us", tz="UTC")),
                "rank": pa.array(columns["rank"], pa.int32()),
                "item_id": pa.array(columns["item_id"], pa.string()),
                "score": pa.array(np.asarray(columns["score"], dtype=np.float32), pa.float32()),
                "model_version": pa.array([self.model_version] * len(columns["user_id"]), pa.string()),
            },
            schema=CANDIDATE_SCHEMA,
        )
        counts = {"users": len({g.user_id for g in groups}), "queries": int(sum(g.n_queries for g in groups)), "rows": table.num_rows,
                  "queries_without_history": skipped}
        return table, counts

    def run(self, progress: bool = True, ray_actors: int | None = None, ray_address: str | None = None) -> dict[str, Any]:
        """Retrieve for every unfinished shard (Ray is not offered for retrieval: `ray_actors` must be None)."""
        if ray_actors:
            raise RetrieveJobError("retrieval runs on one engine per process; --ray is an embedding-job option")
        (self.out_dir / USERS_DIR).mkdir(parents=True, exist_ok=True)
        manifest = self._candidates_to_resume()
        todo = [s for s in range(self.config.shards) if s not in manifest.shards or not self._shard_path(s).exists()]
        if todo and self.engine is None:
            self.open_engine()
        bar = tqdm(desc="retrieving", unit="user", disable=bars_off(progress))
        started = time.perf_counter()
        for shard in todo:
            table, counts = self.retrieve_shard(shard, bar)
            write_parquet_atomic(table, self._shard_path(shard))
            manifest.shards[shard] = ShardRecord(shard_file_name(shard, self.config.shards), counts)
            write_candidate_manifest(manifest, self.out_dir)
        bar.close()
        manifest.totals = {k: sum(s.counts[k] for s in manifest.shards.values()) for k in CANDIDATE_COUNTS}
        manifest.complete = True
        manifest.seconds_this_run = round(time.perf_counter() - started, 2)
        write_candidate_manifest(manifest, self.out_dir)
        return manifest.to_json()

    def _candidates_to_resume(self) -> CandidateManifest:
        settings = self.settings()
        path = self.out_dir / MANIFEST_FILE
        fresh = CandidateManifest(settings, engine=self.config.engine, source_model=str(self.model_dir), catalogue_items=self.trie.n_items)
        if not path.exists():
            return fresh
        try:
            previous = CandidateManifest.from_json(json.loads(path.read_text()), path)
        except (CandidateFolderError, json.JSONDecodeError) as exc:
            raise RetrieveJobError(f"{exc}; choose another --out or remove it") from exc
        if previous.settings != settings:
            raise RetrieveJobError(f"{self.out_dir} holds candidates made with other settings ({previous.settings}); choose another --out or remove it")
        return previous
