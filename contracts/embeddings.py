"""The embedding folder: what `lum embed` writes (lum/embed_job.py) and `lum features ingest` reads (feature_store/repo.py).

    <folder>/
      manifest.json                          the job: settings, finished shards, counts; `complete` when all are done
      users/shard-00003-of-00008.parquet     user_id, condition, embedding, event_timestamp, model_version
      items.parquet                          item_id, embedding, token, model_version
      pca.npz                                the projection (only with --dim), fitted once, reused on resume

A folder is untrusted input to its reader (it may come from another machine or a hand-edited copy):
`read_embedding_manifest` parses the manifest as plain JSON (no pickle), checks every field it uses and names
the file and the field in its errors. Names that become paths are checked too: a model version becomes a folder
of the feature repo and a shard's `file` is opened under `users/`, so neither may hold a path separator.

The model folder the vectors come from (`source_model` in the manifest) is described by its own manifest,
`lum_manifest.json`, of which a reader of embeddings needs only the end of the training window.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import pyarrow as pa

from contracts.files import write_json_atomic

__all__ = [
    "EmbeddingFolderError",
    "EmbeddingManifest",
    "ITEMS_FILE",
    "ITEM_EMBEDDING_COLUMNS",
    "MANIFEST_FILE",
    "MODEL_MANIFEST_FILE",
    "PCA_FILE",
    "SHARD_COUNTS",
    "ShardRecord",
    "USERS_DIR",
    "USER_EMBEDDING_SCHEMA",
    "check_model_version",
    "model_data_end",
    "read_embedding_manifest",
    "read_job_manifest",
    "require_columns",
    "shard_file_name",
    "shard_paths_of",
    "shard_records",
    "write_embedding_manifest",
]

MANIFEST_FILE = "manifest.json"
USERS_DIR = "users"
ITEMS_FILE = "items.parquet"
PCA_FILE = "pca.npz"
MODEL_MANIFEST_FILE = "lum_manifest.json"  # in the model folder (lum/model.py writes it)

USER_EMBEDDING_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("condition", pa.string()),
        ("embedding", pa.list_(pa.float32())),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),  # the as-of time: only events strictly before it were used
        ("model_version", pa.string()),
    ]
)
ITEM_EMBEDDING_COLUMNS = ("item_id", "embedding", "token", "model_version")
SHARD_COUNTS = ("users", "rows", "queries_without_history", "tokens")  # per finished shard, summed into `totals`

# a model version names a folder of the feature repo: no separators, no `.` or `..`
_MODEL_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_SHARD_FILE = re.compile(r"shard-\d{5,}-of-\d{5,}\.parquet")
M = TypeVar("M")  # a manifest class (read_job_manifest)


class EmbeddingFolderError(ValueError):
    """An embedding folder that cannot be read; the message names the file and the field."""


def shard_file_name(shard: int, shards: int) -> str:
    """`shard-00003-of-00008.parquet`: the file of one hash shard of the users."""
    return f"shard-{shard:05d}-of-{shards:05d}.parquet"


def check_model_version(version: Any, where: str) -> str:
    """`version` when it is a safe folder name; otherwise an EmbeddingFolderError naming `where`."""
    if not isinstance(version, str) or not _MODEL_VERSION.fullmatch(version):
        raise EmbeddingFolderError(
            f"{where}: model version {_short(version)} is not a valid name (letters, digits and . _ + -, starting "
            "with a letter or digit, at most 128 characters)"
        )
    return version


@dataclass
class ShardRecord:
    """One finished shard: its file under `users/` and its counts (see SHARD_COUNTS)."""

    file: str
    counts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, **self.counts}


@dataclass
class EmbeddingManifest:
    """`manifest.json` of an embedding folder.

    `settings` is kept as the job wrote it: it is what makes two runs the same run (a resumed job must have equal
    settings) and what the feature store hashes into a job id. The fields a reader needs are checked on reading
    and have accessors below.
    """

    settings: dict[str, Any]
    engine: str | None = None
    shards: dict[int, ShardRecord] = field(default_factory=dict)  # in the order they finished
    complete: bool = False
    hidden_size: int | None = None
    source_model: str | None = None  # the model folder the vectors came from
    totals: dict[str, int] | None = None  # set when complete
    seconds_this_run: float | None = None
    embedding_dim: int | None = None  # set when complete: the vectors' length (after any --dim projection)

    @property
    def model_version(self) -> str:
        return self.settings["model_version"]

    @property
    def conditions(self) -> list[str]:
        return list(self.settings["conditions"])

    @property
    def as_of(self) -> str:
        return self.settings["as_of"]

    @property
    def rolling(self) -> bool:
        """Rolling mode: one query per (user, time) row of a rows file (settings.rows is that file's fingerprint)."""
        return self.settings.get("rows") is not None

    def shard_files(self) -> list[str]:
        """The shard file names in shard order."""
        return [self.shards[s].file for s in sorted(self.shards)]

    def shard_paths(self, folder: str | Path) -> list[Path]:
        """The shard files under `folder/users/`, in shard order; an error naming the first one that is missing."""
        return shard_paths_of(self.shards, folder)

    def to_json(self) -> dict[str, Any]:
        """The manifest as written: optional fields that are unset are left out."""
        out: dict[str, Any] = {"settings": self.settings}
        if self.engine is not None:
            out["engine"] = self.engine
        out["shards"] = {str(s): record.to_json() for s, record in self.shards.items()}
        out["complete"] = self.complete
        for name in ("hidden_size", "source_model", "totals", "seconds_this_run", "embedding_dim"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_json(cls, data: Any, source: str | Path) -> EmbeddingManifest:
        """A checked manifest from parsed JSON; `source` (the file) is named in every error."""
        where = str(source)
        if not isinstance(data, dict):
            raise EmbeddingFolderError(f"{where}: expected a JSON object, got {type(data).__name__}")
        settings = _field(data, "settings", dict, where)
        check_model_version(_field(settings, "model_version", str, where, "settings."), where)
        conditions = _field(settings, "conditions", list, where, "settings.")
        if not all(isinstance(c, str) and c for c in conditions) or len(set(conditions)) != len(conditions):
            raise EmbeddingFolderError(f"{where}: field 'settings.conditions' must be a list of distinct non-empty strings")
        _field(settings, "as_of", str, where, "settings.")
        _optional(settings, "rows", str, where, "settings.")
        shards = shard_records(data, where)
        complete = _optional(data, "complete", bool, where) or False
        embedding_dim = _optional(data, "embedding_dim", int, where)
        if complete and embedding_dim is None:
            raise EmbeddingFolderError(f"{where}: field 'embedding_dim' is missing from a complete job's manifest")
        if embedding_dim is not None and embedding_dim < 1:
            raise EmbeddingFolderError(f"{where}: field 'embedding_dim' must be at least 1, got {embedding_dim}")
        totals = _optional(data, "totals", dict, where)
        if totals is not None:
            totals = {k: _field(totals, k, int, where, "totals.") for k in totals}
        seconds = _optional(data, "seconds_this_run", (int, float), where)
        return cls(
            settings=settings,
            engine=_optional(data, "engine", str, where),
            shards=shards,
            complete=complete,
            hidden_size=_optional(data, "hidden_size", int, where),
            source_model=_optional(data, "source_model", str, where),
            totals=totals,
            seconds_this_run=None if seconds is None else float(seconds),
            embedding_dim=embedding_dim,
        )


def shard_records(data: dict[str, Any], where: str) -> dict[int, ShardRecord]:
    """The checked `shards` field of a sharded folder's manifest (an embedding or a candidates folder): shard numbers,
    file names that stay under `users/`, integer counts."""
    shards = {}
    for key, record in _field(data, "shards", dict, where).items():
        if not (isinstance(key, str) and key.isdigit() and key.isascii()):
            raise EmbeddingFolderError(f"{where}: field 'shards' has key {_short(key)}, expected a shard number")
        name = f"shards.{key}."
        if not isinstance(record, dict):
            raise EmbeddingFolderError(f"{where}: field '{name[:-1]}' must be an object, got {type(record).__name__}")
        file = _field(record, "file", str, where, name)
        if not _SHARD_FILE.fullmatch(file):
            raise EmbeddingFolderError(f"{where}: field '{name}file' is {_short(file)}, expected a name like {shard_file_name(0, 1)}")
        counts = {k: _field(record, k, int, where, name) for k in record if k != "file"}
        shards[int(key)] = ShardRecord(file, counts)
    return shards


def shard_paths_of(shards: dict[int, ShardRecord], folder: str | Path, error: type[EmbeddingFolderError] = EmbeddingFolderError) -> list[Path]:
    """The shard files under `folder/users/`, in shard order; `error` naming the first one that is missing."""
    paths = [Path(folder) / USERS_DIR / shards[s].file for s in sorted(shards)]
    for path in paths:
        if not path.is_file():
            raise error(f"{path}: shard file listed in {Path(folder) / MANIFEST_FILE} not found")
    return paths


def read_job_manifest(folder: str | Path, from_json: Callable[[Any, Path], M], error: type[EmbeddingFolderError], written_by: str) -> M:
    """The checked `manifest.json` of a sharded job's folder (an embedding or a candidates folder): the file read
    as UTF-8 JSON and handed to `from_json` (the manifest class's checks). `error` says that the folder is not
    `written_by`'s output when the file is missing, and names the file when it is not valid JSON."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise error(f"{folder} is not the output of `{written_by}` (no {MANIFEST_FILE})")
    return from_json(_json_file(path, error), path)


def read_embedding_manifest(folder: str | Path) -> EmbeddingManifest:
    """The checked manifest of an embedding folder (complete or not: callers decide what they need)."""
    return read_job_manifest(folder, EmbeddingManifest.from_json, EmbeddingFolderError, "lum embed")


def write_embedding_manifest(manifest: EmbeddingManifest, folder: str | Path) -> None:
    """Write `folder/manifest.json` atomically, as the embedding job always has (indented; odd values as strings)."""
    write_json_atomic(manifest.to_json(), Path(folder) / MANIFEST_FILE, indent=2, default=str)


def require_columns(names: list[str], wanted: tuple[str, ...] | list[str], path: str | Path) -> None:
    """An EmbeddingFolderError naming the file and the columns it lacks, if any of `wanted` is not in `names`."""
    missing = [c for c in wanted if c not in names]
    if missing:
        raise EmbeddingFolderError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(names)})")


def model_data_end(model_dir: str | Path) -> str | None:
    """The last event time the model was trained on (`training_window.ts_max` of its lum_manifest.json), if known."""
    path = Path(model_dir) / MODEL_MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = _json_file(path, EmbeddingFolderError)
    window = manifest.get("training_window") if isinstance(manifest, dict) else None
    end = window.get("ts_max") if isinstance(window, dict) else None
    if end is not None and not isinstance(end, str):
        raise EmbeddingFolderError(f"{path}: field 'training_window.ts_max' must be a time string, got {_short(end)}")
    return end


# ---------------------------------------------------------------------------------------------------------------
# checks


def _short(value: Any) -> str:
    """repr of a value read from an untrusted file, cut short for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "true or false", float: "a number"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    # bool is an int to Python, never to a manifest
    if isinstance(value, bool):
        return kind is bool or (isinstance(kind, tuple) and bool in kind)
    return isinstance(value, kind)


def _json_file(path: Path, error: type[EmbeddingFolderError]) -> Any:
    """A JSON file's content; `error` naming the file when it is not UTF-8 JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, prefix: str = "") -> Any:
    if key not in data:
        raise EmbeddingFolderError(f"{where}: field '{prefix}{key}' is missing")
    value = data[key]
    if not _is(value, kind):
        raise EmbeddingFolderError(f"{where}: field '{prefix}{key}' must be {_type_name(kind)}, got {_short(value)}")
    return value


def _optional(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, prefix: str = "") -> Any:
    return None if data.get(key) is None else _field(data, key, kind, where, prefix)
