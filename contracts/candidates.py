"""The candidates folder: what `lum retrieve` writes (lum/retrieve_job.py) and a ranking stack or the report reads.

    <folder>/
      manifest.json                          the job: settings, finished shards, counts; `complete` when all are done
      users/shard-00003-of-00008.parquet     user_id, condition, event_timestamp, rank, item_id, score, model_version

One row per retrieved item: `rank` 0 is the best, `score` the log-probability the model gives the item among the
catalogue's items under the query's condition (see lum/retrieve.py), `event_timestamp` the as-of time (only
events strictly before it were seen). The folder is laid out as an embedding folder is (contracts/embeddings.py):
users in hash shards, each written under a temporary name and then recorded, so a killed job resumes; the
manifest is read as plain JSON and checked field by field, shard file names included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from contracts.embeddings import (
    MANIFEST_FILE,
    EmbeddingFolderError,
    ShardRecord,
    _field,
    _optional,
    check_model_version,
    read_job_manifest,
    shard_paths_of,
    shard_records,
)
from contracts.files import write_json_atomic

__all__ = ["CANDIDATE_COUNTS", "CANDIDATE_SCHEMA", "CandidateFolderError", "CandidateManifest", "KIND", "read_candidate_manifest",
           "read_candidates", "write_candidate_manifest"]

KIND = "candidates"  # the manifest's `kind`: an embedding folder's manifest has none
CANDIDATE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("condition", pa.string()),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),  # the as-of time: only events strictly before it were used
        ("rank", pa.int32()),
        ("item_id", pa.string()),
        ("score", pa.float32()),
        ("model_version", pa.string()),
    ]
)
CANDIDATE_COUNTS = ("users", "queries", "rows", "queries_without_history")  # per finished shard, summed into `totals`


class CandidateFolderError(EmbeddingFolderError):
    """A candidates folder that cannot be read; the message names the file and the field."""


@dataclass
class CandidateManifest:
    """`manifest.json` of a candidates folder; `settings` is what makes two runs the same run (resume)."""

    settings: dict[str, Any]
    engine: str | None = None
    shards: dict[int, ShardRecord] = field(default_factory=dict)
    complete: bool = False
    source_model: str | None = None
    catalogue_items: int | None = None  # items the search could produce
    totals: dict[str, int] | None = None
    seconds_this_run: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": KIND, "settings": self.settings, "engine": self.engine,
                               "shards": {str(s): r.to_json() for s, r in self.shards.items()}, "complete": self.complete}
        for name in ("source_model", "catalogue_items", "totals", "seconds_this_run"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def shard_paths(self, folder: str | Path) -> list[Path]:
        return shard_paths_of(self.shards, folder, CandidateFolderError)

    @classmethod
    def from_json(cls, data: Any, source: str | Path) -> CandidateManifest:
        where = str(source)
        try:
            if not isinstance(data, dict) or data.get("kind") != KIND:
                raise CandidateFolderError(f"{where}: not the manifest of a candidates folder (expected \"kind\": \"{KIND}\")")
            settings = _field(data, "settings", dict, where)
            check_model_version(_field(settings, "model_version", str, where, "settings."), where)
            shards = shard_records(data, where)
            totals = _optional(data, "totals", dict, where)
            seconds = _optional(data, "seconds_this_run", (int, float), where)
            return cls(
                settings=settings,
                engine=_optional(data, "engine", str, where),
                shards=shards,
                complete=_optional(data, "complete", bool, where) or False,
                source_model=_optional(data, "source_model", str, where),
                catalogue_items=_optional(data, "catalogue_items", int, where),
                totals=None if totals is None else {k: _field(totals, k, int, where, "totals.") for k in totals},
                seconds_this_run=None if seconds is None else float(seconds),
            )
        except CandidateFolderError:
            raise
        except EmbeddingFolderError as exc:  # the shared field checks raise the embedding folder's error
            raise CandidateFolderError(str(exc)) from exc


def read_candidate_manifest(folder: str | Path) -> CandidateManifest:
    """The checked manifest of a candidates folder (complete or not)."""
    return read_job_manifest(folder, CandidateManifest.from_json, CandidateFolderError, "lum retrieve")


def write_candidate_manifest(manifest: CandidateManifest, folder: str | Path) -> None:
    write_json_atomic(manifest.to_json(), Path(folder) / MANIFEST_FILE, indent=2, default=str)


def read_candidates(folder: str | Path) -> pa.Table:
    """Every candidate of a finished job, in (user_id, condition, event_timestamp, rank) order."""
    manifest = read_candidate_manifest(folder)
    if not manifest.complete:
        raise CandidateFolderError(f"{folder}: the retrieval job has not finished (re-run it to resume)")
    tables = [pq.read_table(p) for p in manifest.shard_paths(folder)]
    table = pa.concat_tables(tables) if tables else CANDIDATE_SCHEMA.empty_table()
    if table.schema != CANDIDATE_SCHEMA:
        raise CandidateFolderError(f"{folder}: shard columns {table.schema.names} are not the candidates schema {CANDIDATE_SCHEMA.names}")
    return table.sort_by([("user_id", "ascending"), ("condition", "ascending"), ("event_timestamp", "ascending"), ("rank", "ascending")])
