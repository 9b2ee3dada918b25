"""A run's Feast feature repo: create it, build the offline tables, ingest embeddings, apply, materialize.

    feature_repo/
      feature_store.yaml          Feast's config: local provider, the offline store (duckdb, file or ray), SQLite or Redis online store
      definitions.py              the Feast objects (copied from feature_store/repo_template/)
      lum_features.yaml           what varies: the selected model version, its query conditions, TTLs
      data/
        registry.db               Feast's registry (written by apply)
        online.db                 the SQLite online store (written by materialize)
        stats/*.parquet           ordinary features, point-in-time (see offline_tables.py)
        lum_user/<version>/<job>/*.parquet   ingested user embeddings of each model version (several coexist), one
                                       folder per embedding job, moved in whole (staging/<job>/ until then)
        lum_item/<version>/items.parquet
        ingested.json             every ingested embedding job, by version: dimension, conditions, as-of times
        materialized.json         what the online store holds: model version and materialized-until time
        materialize_full.json     a from-scratch materialization started and has not finished (materialize.py)
        online_swap.json          the online store's rows are being replaced right now (materialize.py)
        online.staging.db         the SQLite store a from-scratch materialization builds before its swap

Every file is written under a temporary name and renamed; ingestion checks everything (dimension against the
job's manifest, NaN, duplicate as-of times) before it moves a single file.

A run folder may be copied or moved. Feast's registry records absolute paths (each FileSource, and the SQLite
file of each online table), so `store()` checks them against the folder the repo is in now and re-applies it when
they name another folder (the registry is then rewritten with this folder's paths), and `definitions.py` drops the
other folder's online-table records before a plain `feast apply` reads them (Feast would DROP those tables there).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from contracts.embeddings import (
    ITEM_EMBEDDING_COLUMNS,
    ITEMS_FILE,
    MANIFEST_FILE,
    USER_EMBEDDING_SCHEMA,
    EmbeddingFolderError,
    EmbeddingManifest,
    check_model_version,
    model_data_end,
    read_embedding_manifest,
    require_columns,
)
from contracts.files import copy_file_atomic, write_bytes_atomic, write_parquet_atomic, write_text_atomic
from contracts.names import slug
from feature_store.offline_tables import StatsConfig, write_stats_tables

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parent / "repo_template"
PROJECT = "lum"
SQLITE_ONLINE_PATH = "data/online.db"  # relative to the repo root, as feature_store.yaml names it


class FeatureStoreError(ValueError):
    """Bad input or a missing step; the message says what was expected or which command to run."""


@dataclass(frozen=True)
class OnlineStoreConfig:
    kind: Literal["sqlite", "redis"] = "sqlite"
    redis_url: str = "localhost:6379"  # host:port[,db=N,...] (Feast's connection_string)

    def yaml(self) -> dict[str, Any]:
        if self.kind == "redis":
            return {"type": "redis", "connection_string": self.redis_url}
        if self.kind == "sqlite":
            return {"type": "sqlite", "path": SQLITE_ONLINE_PATH}
        raise FeatureStoreError(f"online store must be sqlite or redis, got '{self.kind}'")


OFFLINE_STORES = ("file", "duckdb", "ray")
RAY_STORAGE_PATH = "data/ray_storage"  # relative to the repo root: where the Ray offline store stages its results


@dataclass(frozen=True)
class OfflineStoreConfig:
    """The engine of the point-in-time training-set join and of materialization (docs/feature-store.md, "Engines").

    file: Feast's Dask file store; duckdb: Feast's DuckDB store (ibis), one process; ray: Feast's Ray offline store
    and Ray compute engine, on a local Ray started in-process or the cluster at `ray_address`. Every engine reads the
    same Parquet files and gives the same training rows (tests/test_offline_engines.py).
    """

    # the default: the faster of file / duckdb on the demo's world, 21k against 8.6k rows/s at 1M rows, and at 0.25M and 4M
    # too (benchmarks/bench_offline_join.py, docs/results/feature-store.md#offline-engines)
    kind: Literal["file", "duckdb", "ray"] = "duckdb"
    ray_address: str | None = None  # ray only: "HOST:PORT" of a running cluster's GCS (or "auto"); None: a local Ray in this process
    ray_cpus: int | None = None  # ray only, local Ray: its CPU slots (worker processes); None: every core

    def __post_init__(self) -> None:
        if self.kind not in OFFLINE_STORES:
            raise FeatureStoreError(f"offline store must be one of {', '.join(OFFLINE_STORES)}, got '{self.kind}'")
        for name in ("ray_address", "ray_cpus"):
            if getattr(self, name) is not None and self.kind != "ray":
                raise FeatureStoreError(f"{name} is a setting of the ray offline store, not of '{self.kind}'")
        if self.ray_address is not None and self.ray_cpus is not None:
            raise FeatureStoreError("ray_cpus sizes the local Ray that Feast starts; a cluster at ray_address has its own")
        if self.ray_cpus is not None and self.ray_cpus < 1:
            raise FeatureStoreError(f"ray_cpus must be at least 1, got {self.ray_cpus}")

    def yaml(self) -> dict[str, Any]:
        """The `offline_store` section of feature_store.yaml."""
        if self.kind == "ray":
            return {"type": "ray", "storage_path": RAY_STORAGE_PATH, **self._ray_connection()}
        return {"type": self.kind}

    def batch_engine(self) -> dict[str, Any] | None:
        """The `batch_engine` section (Feast's compute engine for materialization); None: Feast's local engine."""
        if self.kind != "ray":
            return None
        return {"type": "ray.engine", **self._ray_connection()}

    def _ray_connection(self) -> dict[str, Any]:
        if self.ray_address:
            return {"ray_address": self.ray_address}
        # Feast starts a local Ray in the process (GCS, raylet and worker processes on 127.0.0.1), `ray_cpus` workers
        return {"ray_conf": {"num_cpus": self.ray_cpus}} if self.ray_cpus else {}


def view_source_path(store: Any, view: str) -> Path:
    """The file or folder a feature view's offline source reads (the DuckDB store's glob of a version's files:
    the folder itself)."""
    path = store.get_feature_view(view).batch_source.path
    if "*" in path:  # the DuckDB store's glob of a folder's files (repo_template/definitions.py)
        path = path[: path.index("*")]
    return Path(path)


def require_view_sources(store: Any, views: list[str]) -> None:
    """FeatureStoreError naming the first missing offline source of `views`, instead of the bare path that Feast's
    engines raise (or, for the DuckDB store, an empty answer)."""
    for view in views:
        path = view_source_path(store, view)
        if not path.exists():
            raise FeatureStoreError(
                f"{path}: the offline source of feature view '{view}' does not exist; the run folder may have moved or "
                f"been copied without its data/ (this repo is {store.repo_path}): run `lum features apply --run RUN` on the run folder where it is now")


def read_view_source(store: Any, view: str, columns: list[str]) -> pa.Table:
    """Columns of a feature view's offline source (its Parquet file, or the folder of files of an ingested version)."""
    import pyarrow.dataset as ds

    require_view_sources(store, [view])
    return ds.dataset(str(view_source_path(store, view)), format="parquet").to_table(columns=columns)


def _read_registry(root: Path) -> Any:
    """The registry proto of the repo at `root` (None when `feast apply` has not run there)."""
    from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

    path = root / "data" / "registry.db"
    if not path.exists():
        return None
    registry = RegistryProto()
    registry.ParseFromString(path.read_bytes())
    return registry


def _is_own(path: str, own: Path) -> bool:
    return Path(path).resolve().is_relative_to(own)


def foreign_registry_paths(root: str | Path) -> list[str]:
    """Paths the repo's Feast registry records outside the repo at `root`: its FileSources' files and its SQLite
    online tables' database. Not empty after the run folder was copied or moved (`FeatureRepo.store` re-applies)."""
    root = Path(root).resolve()
    registry = _read_registry(root)
    if registry is None:
        return []
    uris = [fv.spec.batch_source.file_options.uri for fv in registry.feature_views]
    uris += [ds.file_options.uri for ds in registry.data_sources] + [ds.batch_source.file_options.uri for ds in registry.data_sources]
    foreign = [u for u in uris if u and Path(u).is_absolute() and not _is_own(u, root / "data")]
    own_db = (root / SQLITE_ONLINE_PATH).resolve()
    foreign += [o.sqlite_table.path for o in registry.infra.infra_objects
                if o.WhichOneof("infra_object") == "sqlite_table" and Path(o.sqlite_table.path).resolve() != own_db]
    return list(dict.fromkeys(foreign))


def forget_other_repos_tables(root: str | Path) -> list[str]:
    """Drop the registry's records of SQLite online tables that live in another folder's online store; returns
    their database paths.

    Feast's registry records each SQLite online table with the absolute path of its database. In a copied or moved
    repo those records still name the original folder, and `feast apply` "replaces" them by tearing the original's
    tables down (DROP TABLE in the other repo's online.db), or fails when that folder is gone. The records are plain
    protos, edited here without opening the other database; `feast apply` then creates this repo's own tables (if
    they do not exist: the copied online.db keeps its rows). Called by `FeatureRepo.apply` and, for a plain `feast
    apply`, by the repo's definitions.py, which Feast imports before it reads the registry.
    """
    root = Path(root).resolve()
    registry = _read_registry(root)
    if registry is None:
        return []
    own = (root / SQLITE_ONLINE_PATH).resolve()
    objects = list(registry.infra.infra_objects)
    foreign = [o for o in objects if o.WhichOneof("infra_object") == "sqlite_table" and Path(o.sqlite_table.path).resolve() != own]
    if not foreign:
        return []
    del registry.infra.infra_objects[:]
    registry.infra.infra_objects.extend(o for o in objects if o not in foreign)
    write_bytes_atomic(registry.SerializeToString(), root / "data" / "registry.db")
    return sorted({o.sqlite_table.path for o in foreign})


@dataclass
class RepoSettings:
    """lum_features.yaml: what varies between feature repos (definitions.py and every lookup read it). One definition
    of each setting and its default; `lum features apply` writes it, the plain `feast` CLI reads it through
    definitions.py."""

    model_version: str | None = None  # the selected LUM version (a folder under data/lum_user/); None: no LUM views
    conditions: list[str] = field(default_factory=list)  # its query conditions
    lum_dim: int | None = None  # its vectors' length
    lum_ttl_days: float = 30  # a LUM vector older than this before the request is missing (the feature view's TTL)
    stats_ttl_days: float = 0  # the counters' and recent items' TTL; 0: forever (Feast's convention)
    online_store: OnlineStoreConfig = field(default_factory=OnlineStoreConfig)
    offline_store: OfflineStoreConfig = field(default_factory=OfflineStoreConfig)

    @classmethod
    def from_mapping(cls, data: Any, where: str) -> RepoSettings:
        """Checked settings of a mapping (a parsed lum_features.yaml): an unknown key, a wrong type or an unsafe
        `model_version` (it becomes a path: `../../etc` would make materialize read outside the repo) is a
        FeatureStoreError naming `where` and the key."""
        if not isinstance(data, dict):
            raise FeatureStoreError(f"{where}: expected a mapping of settings (model_version, conditions, ...), got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FeatureStoreError(f"{where}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values = dict(data)
        version = values.get("model_version")
        if version is not None:
            try:
                check_model_version(version, f"{where} (model_version)")
            except EmbeddingFolderError as exc:
                raise FeatureStoreError(f"{exc}; select an ingested version with `lum features apply --model-version V`") from None
        conditions = values.get("conditions") or []
        if not isinstance(conditions, list) or not all(isinstance(c, str) for c in conditions):
            raise FeatureStoreError(f"{where}: conditions must be a list of condition names, got {conditions!r}")
        for name in ("lum_ttl_days", "stats_ttl_days"):
            value = values.get(name, getattr(cls(), name))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise FeatureStoreError(f"{where}: {name} must be a number of days >= 0 (0: forever), got {value!r}")
        dim = values.get("lum_dim")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise FeatureStoreError(f"{where}: lum_dim must be a positive integer, got {dim!r}")
        try:
            values["online_store"] = OnlineStoreConfig(**(values.get("online_store") or {}))
            # a repo written before the setting existed used Feast's file store (a new repo gets the default, DuckDB)
            values["offline_store"] = OfflineStoreConfig(**values.get("offline_store", {"kind": "file"}))
        except TypeError as exc:
            raise FeatureStoreError(f"{where}: {exc}") from None
        values["conditions"] = list(conditions)
        return cls(**values)

    def to_mapping(self) -> dict[str, Any]:
        """The settings as lum_features.yaml holds them (the stores as mappings)."""
        return asdict(self)


def read_settings(path: Path) -> dict[str, Any]:
    """lum_features.yaml as checked settings (RepoSettings), every key present, as a mapping."""
    return RepoSettings.from_mapping(yaml.safe_load(path.read_text()) or {}, str(path)).to_mapping()


@contextlib.contextmanager
def waiting_file_lock(path: Path) -> Iterator[None]:
    """An exclusive `flock` on `path` for the block; a second holder waits (the kernel frees it if a holder dies)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class FeatureRepo:
    """One Feast repo folder; every command of `lum features` goes through this class."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.data = self.root / "data"

    # ------------------------------------------------------------------ layout
    @property
    def settings_file(self) -> Path:
        return self.root / "lum_features.yaml"

    @property
    def ingested_file(self) -> Path:
        return self.data / "ingested.json"

    @property
    def materialized_file(self) -> Path:
        return self.data / "materialized.json"

    def settings(self) -> dict[str, Any]:
        if not self.settings_file.exists():
            raise FeatureStoreError(f"{self.root} is not a LUM feature repo (no lum_features.yaml): run `lum features apply` first")
        return read_settings(self.settings_file)

    def ingested(self) -> dict[str, Any]:
        return json.loads(self.ingested_file.read_text()) if self.ingested_file.exists() else {}

    # ------------------------------------------------------------------ create / configure
    def init(self, online: OnlineStoreConfig | None = None, lum_ttl_days: float | None = None, stats_ttl_days: float | None = None,
             offline: OfflineStoreConfig | None = None) -> None:
        """Create or update the repo files (never the data): feature_store.yaml, definitions.py, lum_features.yaml."""
        self.data.mkdir(parents=True, exist_ok=True)
        settings = read_settings(self.settings_file) if self.settings_file.exists() else RepoSettings().to_mapping()
        if online is not None:
            settings["online_store"] = asdict(online)
        if offline is not None:
            settings["offline_store"] = asdict(offline)
        if lum_ttl_days is not None:
            settings["lum_ttl_days"] = lum_ttl_days
        if stats_ttl_days is not None:
            settings["stats_ttl_days"] = stats_ttl_days
        self._write_settings(settings)
        copy_file_atomic(TEMPLATE / "definitions.py", self.root / "definitions.py")
        (self.root / ".feastignore").write_text("data/\n")

    def _write_settings(self, settings: dict[str, Any]) -> None:
        online = OnlineStoreConfig(**settings["online_store"])
        offline = self.offline_config(settings)
        store_yaml = {
            "project": PROJECT,
            "provider": "local",
            "registry": "data/registry.db",
            "offline_store": offline.yaml(),
            "online_store": online.yaml(),
            "entity_key_serialization_version": 3,
        }
        if offline.batch_engine():
            store_yaml["batch_engine"] = offline.batch_engine()
        header = "# Written by `lum features apply`; edit lum_features.yaml or pass options to that command instead.\n"
        write_text_atomic(header + yaml.safe_dump(store_yaml, sort_keys=False), self.root / "feature_store.yaml")
        write_text_atomic(yaml.safe_dump(settings, sort_keys=False), self.settings_file)

    @staticmethod
    def offline_config(settings: dict[str, Any]) -> OfflineStoreConfig:
        """The offline store of settings read by `read_settings` (RepoSettings: a repo written before the setting
        existed used Feast's file store)."""
        return OfflineStoreConfig(**settings.get("offline_store", {"kind": "file"}))

    def select_version(self, version: str) -> None:
        versions = self.ingested()
        if version not in versions:
            known = ", ".join(sorted(versions)) or "none"
            raise FeatureStoreError(f"model version '{version}' was never ingested into {self.root} (ingested: {known}); run `lum features ingest` first")
        settings = self.settings()
        entry = versions[version]
        settings.update(model_version=version, conditions=entry["conditions"], lum_dim=entry["dim"])
        self._write_settings(settings)

    def store(self):
        """The Feast `FeatureStore` of this repo (raises a clear error when `apply` has not run)."""
        from feast import FeatureStore

        if not (self.root / "feature_store.yaml").exists():
            raise FeatureStoreError(f"{self.root} has no feature_store.yaml: run `lum features apply` first")
        if not (self.data / "registry.db").exists():
            raise FeatureStoreError(f"{self.root} has no Feast registry (data/registry.db): run `lum features apply` first")
        self._follow_move()
        return FeatureStore(repo_path=str(self.root))

    def _follow_move(self) -> None:
        """Re-apply the repo when its registry names another folder's files: the run folder was copied or moved, and
        Feast would read (and materialize from) the original's offline files. Once per copy: the re-apply records
        this folder's paths."""
        if not foreign_registry_paths(self.root):
            return
        with self._apply_lock():
            foreign = foreign_registry_paths(self.root)  # another process may have re-applied while we waited
            if foreign:
                log.warning("%s: the Feast registry names files of another folder (%s): the run folder was copied or moved; "
                            "re-applying it here", self.root, foreign[0])
                # this version's definitions.py, whose import protects the original's tables from a plain `feast apply`
                copy_file_atomic(TEMPLATE / "definitions.py", self.root / "definitions.py")
                self._apply_locked()

    def _apply_lock(self) -> contextlib.AbstractContextManager:
        """One `feast apply` at a time per repo (two processes that both found a moved repo re-apply it once)."""
        self.data.mkdir(parents=True, exist_ok=True)
        return waiting_file_lock(self.data / ".apply.lock")

    # ------------------------------------------------------------------ offline tables
    def build_stats(self, events: pd.DataFrame, items: pd.DataFrame | None, config: Any = None) -> dict[str, int]:
        return write_stats_tables(events, items, self.data / "stats", config or StatsConfig())

    def apply(self) -> list[str]:
        """Run the real `feast apply` in the repo folder; returns the feature views registered.

        A subprocess on purpose: Feast imports `definitions.py` as a module named after the file, relative to
        the working directory, so in-process applies of two repos would share one cached module.
        """
        with self._apply_lock():
            return self._apply_locked()

    def _apply_locked(self) -> list[str]:
        import subprocess
        import sys

        from feast import FeatureStore

        if not (self.data / "stats" / "user_stats.parquet").exists():
            raise FeatureStoreError(f"{self.root} has no offline tables yet (data/stats/): build them with `lum features apply --run RUN`")
        forget_other_repos_tables(self.root)
        feast_cli = Path(sys.executable).with_name("feast")
        command = [str(feast_cli) if feast_cli.exists() else "feast", "apply"]
        done = subprocess.run(command, cwd=self.root, capture_output=True, text=True)
        if done.returncode != 0:
            raise FeatureStoreError(f"`feast apply` failed in {self.root} (exit {done.returncode}):\n{done.stderr[-3000:] or done.stdout[-3000:]}")
        return sorted(fv.name for fv in FeatureStore(repo_path=str(self.root)).list_feature_views())

    # ------------------------------------------------------------------ ingestion
    def ingest(self, embed_dir: str | Path, item_valid_from: str | pd.Timestamp | None = None, select: bool | None = None) -> dict[str, Any]:
        """Register the Parquet output of `lum embed` for its model version.

        Checks, before anything is written: the job finished; every vector has the dimension its manifest states
        and no NaN; the version's dimension and item vectors agree with earlier ingests; no as-of time of the job
        was ingested before for that version. Item vectors get `item_valid_from` as their timestamp (default:
        the end of the model's training data, when it first existed).
        """
        embed_dir = Path(embed_dir)
        manifest_path = embed_dir / MANIFEST_FILE
        try:  # the folder is untrusted input: its manifest is checked field by field
            manifest = read_embedding_manifest(embed_dir)
        except EmbeddingFolderError as exc:
            raise FeatureStoreError(str(exc)) from exc
        if not manifest.complete:
            raise FeatureStoreError(f"{embed_dir}: the embedding job has not finished; re-run `lum embed` with the same --out to resume it")
        settings = manifest.settings
        version, dim = manifest.model_version, int(manifest.embedding_dim)
        job_id = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        versions = self.ingested()
        entry = versions.get(version, {"dim": dim, "conditions": [], "jobs": {}, "item_valid_from": None})
        if job_id in entry["jobs"]:
            if select:
                self.select_version(version)
            return {"version": version, "job": job_id, "rows": 0, "skipped": True}
        if entry["dim"] != dim:
            raise FeatureStoreError(f"{embed_dir}: embeddings of dimension {dim}, but version {version} was ingested with dimension {entry['dim']}")

        as_of_times: set[pd.Timestamp] = set()
        rows = 0
        try:
            shard_files = manifest.shard_paths(embed_dir)
            for path in shard_files:
                table = pq.read_table(path)
                require_columns(table.column_names, USER_EMBEDDING_SCHEMA.names, path)
                rows += table.num_rows
                self._check_vectors(table, "embedding", dim, path, manifest_path)
                as_of_times |= set(pd.to_datetime(table.column("event_timestamp").to_pandas(), utc=True).unique()) if not manifest.rolling else set()
            items = pq.read_table(embed_dir / ITEMS_FILE)
            require_columns(items.column_names, ITEM_EMBEDDING_COLUMNS, embed_dir / ITEMS_FILE)
        except EmbeddingFolderError as exc:
            raise FeatureStoreError(str(exc)) from exc
        if not manifest.rolling:
            clash = sorted(t for t in as_of_times if t.isoformat() in set(entry.get("as_of", [])))
            if clash:
                raise FeatureStoreError(
                    f"{embed_dir}: as-of time(s) {', '.join(t.isoformat() for t in clash[:5])} of version {version} were already ingested "
                    "from another job; two embeddings for one (user, condition, time) would make the join ambiguous"
                )
        self._check_vectors(items, "embedding", dim, embed_dir / ITEMS_FILE, manifest_path)
        valid_from = self._item_valid_from(manifest, item_valid_from) if entry["item_valid_from"] is None else pd.Timestamp(entry["item_valid_from"])
        item_table = pa.table({
            "item_id": items.column("item_id"),
            "item_embedding": items.column("embedding"),
            "item_model_version": items.column("model_version"),
            "event_timestamp": pa.array(np.full(items.num_rows, valid_from.value // 1000, dtype=np.int64)).cast(pa.timestamp("us", tz="UTC")),
        })
        item_path = self.data / "lum_item" / version / ITEMS_FILE
        if item_path.exists() and not pq.read_table(item_path).select(["item_id", "item_embedding"]).equals(item_table.select(["item_id", "item_embedding"])):
            raise FeatureStoreError(
                f"{embed_dir}: its item vectors differ from those already ingested for version {version} (another --dim projection?); "
                "embed every job of a version with the same settings, or ingest it as its own version"
            )

        # all checks passed: copy the shards into a staging folder, move it into the version's source folder with one
        # rename, then record the job. Feast reads every file under the version's folder (Dask does not skip hidden
        # names), so an interrupted ingest must leave nothing there: readers see all of a job's shards or none.
        user_dir = self.data / "lum_user" / version
        user_dir.mkdir(parents=True, exist_ok=True)
        staging = self.data / "staging" / job_id
        if staging.exists():  # left by an interrupted ingest of this job
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        for path in shard_files:
            copy_file_atomic(path, staging / path.name)
        if (user_dir / job_id).exists():  # moved in by an ingest killed before it recorded the job
            shutil.rmtree(user_dir / job_id)
        staging.replace(user_dir / job_id)
        if not item_path.exists():
            write_parquet_atomic(item_table, item_path)
        conditions = manifest.conditions
        entry["conditions"] = entry["conditions"] + [c for c in conditions if c not in entry["conditions"]]
        entry["item_valid_from"] = valid_from.isoformat()
        entry["as_of"] = sorted(set(entry.get("as_of", [])) | {t.isoformat() for t in as_of_times})
        entry["jobs"][job_id] = {"source": str(embed_dir.resolve()), "as_of": settings["as_of"], "rows": rows, "conditions": conditions,
                                 "mode": "rolling" if settings.get("rows") else "snapshot"}
        versions[version] = entry
        write_text_atomic(json.dumps(versions, indent=2), self.ingested_file)
        if select or (select is None and not self.settings().get("model_version")):
            self.select_version(version)
        return {"version": version, "job": job_id, "rows": rows, "skipped": False, "dim": dim, "conditions": conditions}

    @staticmethod
    def _check_vectors(table: pa.Table, column: str, dim: int, path: Path, manifest_path: Path) -> None:
        vectors = table.column(column)
        lengths = pc.list_value_length(vectors).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != dim).any():
            bad = int(np.flatnonzero(lengths != dim)[0])
            raise FeatureStoreError(
                f"{path}: row {bad + 1} has a vector of length {int(lengths[bad])}, but {manifest_path} says the embedding dimension is {dim}"
            )
        flat = pc.list_flatten(vectors).to_numpy(zero_copy_only=False)
        n_nan = int(np.isnan(flat).sum())
        if n_nan:
            raise FeatureStoreError(f"{path}: column '{column}' holds {n_nan} NaN value(s); nothing was ingested")

    @staticmethod
    def _item_valid_from(manifest: EmbeddingManifest, override: str | pd.Timestamp | None) -> pd.Timestamp:
        if override is not None:
            ts = pd.Timestamp(override)
            return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
        try:
            data_end = model_data_end(manifest.source_model) if manifest.source_model else None
        except EmbeddingFolderError as exc:
            raise FeatureStoreError(str(exc)) from exc
        if data_end:
            ts = pd.Timestamp(data_end)
            return (ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")) + pd.Timedelta(microseconds=1)
        raise FeatureStoreError(
            "cannot tell when the model's item vectors became valid (its lum_manifest.json has no data end); pass --item-valid-from"
        )

    # ------------------------------------------------------------------ helpers for readers
    def lum_columns(self) -> dict[str, str]:
        """slug -> condition name of the selected version's query conditions."""
        return {slug(c): c for c in self.settings().get("conditions") or []}
