"""Run-folder steps of the feature store: prepare the Feast repo, ingest embeddings, build training sets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from contracts.files import write_json_atomic
from feature_store.offline_tables import TABLES_FORMAT, StatsConfig
from feature_store.repo import FeatureRepo, OfflineStoreConfig, OnlineStoreConfig
from feature_store.training_set import TrainingSetConfig, build_training_set
from pipelines.data.contract import read_events, write_parquet_atomic
from pipelines.data.sources.base import read_dataset_info
from pipelines.data.split import dataset_fingerprint
from pipelines.paths import RunPaths
from pipelines.steps.lm import default_history_events

# Request-time columns that are not ranking features: ids of a session or request do not generalise, and the
# slot `position` is decided by the ranker itself (learning from it would copy the logging policy's order).
NOT_FEATURES = ("session_id", "request_id", "position")


def prepare_repo(
    paths: RunPaths,
    online: OnlineStoreConfig | None = None,
    lum_ttl_days: float | None = None,
    model_version: str | None = None,
    rebuild_stats: bool = False,
    protocol: str | None = None,
    offline: OfflineStoreConfig | None = None,
) -> tuple[FeatureRepo, list[str], bool]:
    """Create/update the run's Feast repo (or a protocol key's, see pipelines.paths), (re)build the offline tables
    when the events changed, `feast apply`.

    Returns the repo, the registered feature views, and whether the offline tables were rebuilt.
    """
    read_dataset_info(paths)  # a clear error when the run has no data yet
    repo = FeatureRepo(paths.feature_repo_of(protocol))
    repo.init(online=online, lum_ttl_days=lum_ttl_days, offline=offline)
    stamp = repo.data / "stats" / "stats.json"
    fingerprint = dataset_fingerprint(paths)
    rebuilt = False
    main_stamp = paths.feature_repo / "data" / "stats" / "stats.json"
    if repo.root != paths.feature_repo and not rebuild_stats and _stats_fingerprint(stamp) != fingerprint == _stats_fingerprint(main_stamp):
        # a secondary protocol's repo: the counters come from the same events, so the main repo's tables are copied
        shutil.copytree(main_stamp.parent, stamp.parent, dirs_exist_ok=True)
    if rebuild_stats or _stats_fingerprint(stamp) != fingerprint:
        events, _ = read_events(paths.events)
        items = pq.read_table(paths.items).to_pandas() if paths.items.exists() else None
        history = "all" if default_history_events(paths) == "all" else "positive"
        counts = repo.build_stats(events.to_pandas(), items, StatsConfig(history_labels=history))
        write_json_atomic({"dataset_fingerprint": fingerprint, "rows": counts, "history_labels": history,
                           "tables_format": TABLES_FORMAT}, stamp, default=float)  # numpy scalars as floats
        rebuilt = True
    if model_version:
        repo.select_version(model_version)
    return repo, repo.apply(), rebuilt


def _stats_fingerprint(stamp: Path) -> str | None:
    """The dataset fingerprint the offline tables beside `stamp` were built from (None when never built, or built in
    an older table layout: they are rebuilt)."""
    if not stamp.exists():
        return None
    built = json.loads(stamp.read_text())
    return built.get("dataset_fingerprint") if built.get("tables_format") == TABLES_FORMAT else None


def ingest_embeddings(paths: RunPaths, embed_dir: Path, item_valid_from: str | None = None,
                      select: bool | None = None, protocol: str | None = None,
                      offline: OfflineStoreConfig | None = None) -> tuple[FeatureRepo, dict[str, Any], list[str]]:
    """Ingest a `lum embed` output into the run's repo (or a protocol key's), then rebuild what changed and
    `feast apply` once (with `offline`: on that offline store from now on)."""
    repo = FeatureRepo(paths.feature_repo_of(protocol))
    repo.init()
    result = repo.ingest(embed_dir, item_valid_from=item_valid_from, select=select)
    _, views, _ = prepare_repo(paths, protocol=protocol, offline=offline)
    return repo, result, views


def context_columns(events_path: Path, exclude: tuple[str, ...] = NOT_FEATURES) -> tuple[str, ...]:
    """The event columns a ranker may use for the row itself: those the contract marks as known at request time."""
    _, contract = read_events(events_path)
    return tuple(c for c in contract.ranker_feature_columns() if c not in exclude)


def build_window_training_set(
    paths: RunPaths, protocol: str, window: str, service: str, conditions: tuple[str, ...] | None = None, progress: bool = True
) -> Path:
    """The training set of a split window (train or test) for one feature service, written to the run folder."""
    split_file = paths.split_file(protocol, window)
    if not split_file.exists():
        raise FileNotFoundError(f"{split_file} not found: run `lum data split --protocol {protocol}` first")
    impressions, _ = read_events(split_file)
    repo = FeatureRepo(paths.feature_repo_of(protocol))
    config = TrainingSetConfig(feature_service=service, context_columns=context_columns(split_file), conditions=conditions)
    table = build_training_set(repo, impressions.to_pandas(), config, progress=progress)
    out = paths.training_set(protocol, window, service)
    write_parquet_atomic(table, out)
    return out


def training_set_summary(path: Path) -> dict[str, Any]:
    table = pq.read_table(path)
    frame = table.select([c for c in table.column_names if c.startswith("missing_") or c == "label"]).to_pandas()
    summary: dict[str, Any] = {"rows": table.num_rows, "columns": table.num_columns}
    if "label" in frame:
        summary["positive_rate"] = round(float(frame["label"].mean()), 4)
    for column in frame.columns:
        if column.startswith("missing_"):
            summary[f"{column}_share"] = round(float(frame[column].mean()), 4)
    return summary


def materialize_online(paths: RunPaths) -> dict[str, Any]:
    """The online store (SQLite, or Redis when the repo says so) filled with the newest value of every entity of the
    selected model version and the counters, so a lookup answers right after a run; incremental on a re-run."""
    from feature_store.materialize import materialize

    if not (paths.feature_repo / "feature_store.yaml").exists():
        raise FileNotFoundError(f"{paths.feature_repo} has no Feast repo yet: the features step comes first")
    return materialize(FeatureRepo(paths.feature_repo))
