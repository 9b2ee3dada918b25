"""Materialization into the online store: safe beside a serving process, and safe to kill.

`materialize(repo)` writes the newest value of every entity into the online store, view by view: incrementally
from where the view's last run ended, or from scratch (the first run, after the selected model version or the
online store changed, and with `full=True`). Two things make a from-scratch run safe:

- **It is recorded before it begins.** `data/materialize_full.json` is written first and removed only after
  `data/materialized.json` records the finished run. A run killed half-way leaves it behind, and the next plain
  `materialize` says so and redoes the whole full run (a view it emptied would otherwise be reported "up to date"
  from the record of the run before, and serve nothing).
- **Lookups never see it half-done.** On SQLite the rebuilt views are materialized into a staging database
  (`data/online.staging.db`) while the live one serves the old values, then swapped in with one SQLite
  transaction (DROP, CREATE and INSERT of every rebuilt table, committed together): a reader sees all the old rows
  or all the new ones. Redis has no such transaction, so there the views are emptied and rewritten in place while
  `data/online_swap.json` says so. That file also brackets the SQLite swap. A lookup that starts or ends while it
  exists, or that overlaps a change of `materialized.json` (a whole materialization finished during it), is
  retried for a moment and then refused with `MaterializeInProgress` (a service answers 503): it never returns a
  mix of old and new values, nor a table in the middle of being rewritten (`read_consistently`,
  `consistent_lookup` on `FeatureClient.get_ranking_features`).

Rows pushed by the real-time stream (`lum features push`) into a view rebuilt from scratch are replaced by the
offline values, as before (a full run has always emptied the view first).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pandas as pd

from contracts.files import write_text_atomic
from feature_store.repo import PROJECT, FeatureRepo, FeatureStoreError, read_view_source, require_view_sources, waiting_file_lock

log = logging.getLogger(__name__)

FULL_MARKER = "materialize_full.json"  # under data/: a from-scratch materialization started and has not finished
SWAP_MARKER = "online_swap.json"  # under data/: the online store's rows are being replaced right now
STAGING_DB = "online.staging.db"  # under data/: the SQLite store a from-scratch run builds before the swap
EPOCH = pd.Timestamp("1970-01-01", tz="UTC")
T = TypeVar("T")


class MaterializeInProgress(FeatureStoreError):
    """A lookup overlapped a full materialization that replaces the online store's rows: answering could mix old
    and new values (or, on Redis, miss the views being rewritten). A service answers it with 503; retry shortly."""


# ---------------------------------------------------------------------- markers
def full_marker(repo: FeatureRepo) -> Path:
    return repo.data / FULL_MARKER


def swap_marker(repo: FeatureRepo) -> Path:
    return repo.data / SWAP_MARKER


def unfinished_full_materialization(repo: FeatureRepo) -> dict[str, Any] | None:
    """The record of a from-scratch materialization that started and never finished (killed), or None."""
    path = full_marker(repo)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # cut off while written: still a run that started
        return {"started": None, "file": str(path)}


def materialize_in_progress(repo: FeatureRepo | str | Path) -> bool:
    """True while a materialization replaces the online store's rows (the SQLite swap transaction, or a whole
    from-scratch run on Redis): a lookup now could mix old and new values. One `stat`."""
    repo = repo if isinstance(repo, FeatureRepo) else FeatureRepo(repo)
    return swap_marker(repo).exists()


@contextlib.contextmanager
def _marker(path: Path, record: dict[str, Any], keep_on_error: bool) -> Iterator[None]:
    """`path` exists (holding `record`) for the duration of the block. A kill leaves it; an exception leaves it when
    `keep_on_error` (the store may be left half-written: the next run must know)."""
    write_text_atomic(json.dumps(record, indent=2), path)
    try:
        yield
    except BaseException:
        if not keep_on_error:
            path.unlink(missing_ok=True)
        raise
    path.unlink(missing_ok=True)


def _materialize_lock(repo: FeatureRepo) -> contextlib.AbstractContextManager:
    """One materialization at a time per repo (a second waits): two would race on the markers and the staging file."""
    return waiting_file_lock(repo.data / ".materialize.lock")


# ---------------------------------------------------------------------- consistent lookups
@dataclass(frozen=True)
class _OnlineState:
    swapping: bool
    record: tuple[int, int, int] | None  # materialized.json's (inode, mtime_ns, size): every run rewrites it


def _online_state(repo: FeatureRepo) -> _OnlineState:
    try:
        info = repo.materialized_file.stat()
        record = (info.st_ino, info.st_mtime_ns, info.st_size)
    except FileNotFoundError:
        record = None
    return _OnlineState(swap_marker(repo).exists(), record)


def read_consistently(repo: FeatureRepo, read: Callable[[], T], wait_s: float = 2.0) -> T:
    """`read()` (a lookup of several views) run so that no materialization replaced the store's rows during it.

    A seqlock on two files: the swap marker must be absent before and after the read, and `materialized.json`
    unchanged (a whole swap finished during the read). Every row replacement happens while the marker exists,
    and the marker is removed only after `materialized.json` is rewritten, so a read that passes both checks saw
    one state of the store. Otherwise (an error of a read that overlapped the swap included) it is tried again
    until `wait_s`, then MaterializeInProgress."""
    deadline = time.monotonic() + wait_s
    delay = 0.01
    while True:
        before = _online_state(repo)
        if not before.swapping:
            try:
                result, error = read(), None
            except Exception as exc:  # e.g. "database is locked" while the swap commits
                result, error = None, exc
            if _online_state(repo) == before:
                if error is not None:
                    raise error
                return result  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise MaterializeInProgress(_in_progress_message(repo))
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def consistent_lookup(method: Callable[..., T]) -> Callable[..., T]:
    """Decorator of a lookup method of an object with a `repo` (FeatureClient.get_ranking_features): the whole
    call, settings refresh included, runs under `read_consistently`."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        return read_consistently(self.repo, lambda: method(self, *args, **kwargs))

    return wrapper


def _in_progress_message(repo: FeatureRepo) -> str:
    try:
        started = json.loads(swap_marker(repo).read_text()).get("started")
    except (OSError, ValueError):
        started = None
    since = f" (since {started})" if started else ""
    return (f"{repo.root}: a full materialization is replacing the online store's values{since}; lookups resume when it "
            "ends. If that run was killed, `lum features materialize` finishes it")


# ---------------------------------------------------------------------- materialization
def _newest_timestamp(store: Any, view: str) -> pd.Timestamp | None:
    """The newest `event_timestamp` of a feature view's offline source (a file or a folder of files)."""
    import pyarrow.compute as pc

    column = read_view_source(store, view, ["event_timestamp"]).column("event_timestamp")
    newest = pc.max(column).as_py() if len(column) else None
    return None if newest is None else pd.Timestamp(newest).tz_convert("UTC")


def materialize(repo: FeatureRepo, end: pd.Timestamp | None = None, full: bool = False) -> dict[str, Any]:
    """Write the newest value of every entity into the online store, view by view.

    Each view is materialized up to `end` (rows stamped at or before it, as the offline point-in-time join sees
    them at `end`), or by default up to just after the newest timestamp of its own offline data: a new embedding
    snapshot is picked up even when the counters already reach further. The first run, a change of the selected
    model version or of the online store, and `full=True` rebuild a view from the start, into an empty table:
    Feast only upserts, so values newer than `end` from an earlier run would otherwise stay online (and be served
    as if they were as of `end`). Later runs continue from where that view's last run ended. A from-scratch run
    that was killed is redone by the next call (the returned `redone` holds its record). See the module docstring
    for what lookups see meanwhile.
    """
    settings = repo.settings()  # first: a bad lum_features.yaml is refused before anything is read
    store = repo.store()
    with _materialize_lock(repo):
        return _materialize_locked(repo, store, settings, end, full)


def _materialize_locked(repo: FeatureRepo, store: Any, settings: dict[str, Any], end: pd.Timestamp | None, full: bool) -> dict[str, Any]:
    version = settings.get("model_version")
    if end is not None:
        end = end.tz_localize("UTC") if end.tzinfo is None else end.tz_convert("UTC")
    redone = unfinished_full_materialization(repo)
    if redone is not None and not full:
        log.warning("%s: a full materialization started %s never finished (killed?): materializing everything again",
                    repo.root, redone.get("started") or "at an unknown time")
        full = True
    state = json.loads(repo.materialized_file.read_text()) if repo.materialized_file.exists() else {}
    same_target = state.get("model_version") == version and state.get("online_store") == settings["online_store"]
    previous: dict[str, str] = state.get("views", {}) if same_target and not full else {}
    started = time.perf_counter()
    views = sorted(fv.name for fv in store.list_feature_views())
    require_view_sources(store, views)
    ends: dict[str, str] = {}
    modes: dict[str, str] = {}
    incremental: dict[str, tuple[pd.Timestamp, pd.Timestamp]] = {}
    rebuild: dict[str, pd.Timestamp] = {}
    for view in views:
        newest = _newest_timestamp(store, view)
        if newest is None:
            continue
        view_end = end or newest + pd.Timedelta(microseconds=1)
        ends[view] = view_end.isoformat()
        if view in previous and view_end <= pd.Timestamp(previous[view]):
            ends[view], modes[view] = previous[view], "up to date"
        elif view in previous:
            # from our own record of where this view's last run ended, not Feast's `materialize_incremental`: that
            # starts at the latest end of any earlier run, which after a full run to an earlier `end` lies ahead
            incremental[view], modes[view] = (pd.Timestamp(previous[view]), view_end), "incremental"
        else:
            rebuild[view], modes[view] = view_end, "full"

    for view, (start, view_end) in incremental.items():
        store.materialize(start_date=start.to_pydatetime(), end_date=view_end.to_pydatetime(), feature_views=[view])
    record = {"model_version": version, "online_store": settings["online_store"], "views": ends, "modes": modes,
              "end": max(ends.values()) if ends else None}
    if rebuild:
        marker = {"started": pd.Timestamp.now(tz="UTC").isoformat(), "pid": os.getpid(), "full": full,
                  "end": None if end is None else end.isoformat(), "views": sorted(rebuild)}
        # kept on an error too: the user asked for a full run, and on Redis the views may be half-rewritten
        with _marker(full_marker(repo), marker, keep_on_error=True):
            if store.config.online_store.type == "sqlite":
                staging = _build_staging(repo, store, rebuild)
                with _marker(swap_marker(repo), marker, keep_on_error=False):  # an error rolls the transaction back
                    _swap_in(repo, store, staging, list(rebuild))
                    _write_record(repo, record, started)
                _remove_sqlite(staging)
            else:  # Redis: no transaction over the views; lookups are refused while they are rewritten
                with _marker(swap_marker(repo), marker, keep_on_error=True):
                    for view, view_end in rebuild.items():
                        _empty_online_view(store, view)
                        store.materialize(start_date=EPOCH.to_pydatetime(), end_date=view_end.to_pydatetime(), feature_views=[view])
                    _write_record(repo, record, started)
    else:
        _write_record(repo, record, started)
    state = json.loads(repo.materialized_file.read_text())
    if redone is not None:
        state["redone"] = redone
    return state


def _write_record(repo: FeatureRepo, record: dict[str, Any], started: float) -> None:
    write_text_atomic(json.dumps({**record, "seconds": round(time.perf_counter() - started, 2)}, indent=2), repo.materialized_file)


def _empty_online_view(store: Any, view: str) -> None:
    """Delete a view's rows from the online store and recreate its (empty) table, through the online store's own
    `update` (Redis: the view's fields of every key)."""
    provider = store._get_provider()
    table = store.get_feature_view(view)
    provider.update_infra(project=store.project, tables_to_delete=[table], tables_to_keep=[], entities_to_delete=[], entities_to_keep=[], partial=True)
    provider.update_infra(project=store.project, tables_to_delete=[], tables_to_keep=[table], entities_to_delete=[], entities_to_keep=[], partial=True)


def _remove_sqlite(path: Path) -> None:
    for leftover in (path, path.with_name(path.name + "-journal")):
        leftover.unlink(missing_ok=True)


def _staging_store(repo: FeatureRepo, staging: Path) -> Any:
    """A Feast store of this repo (same registry and offline store) whose SQLite online store is `staging`."""
    import yaml
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    raw = yaml.safe_load((repo.root / "feature_store.yaml").read_text())
    raw["online_store"] = {**raw["online_store"], "path": str(staging.resolve())}
    config = RepoConfig(**raw)
    config.repo_path = repo.root
    return FeatureStore(repo_path=str(repo.root), config=config)


def _build_staging(repo: FeatureRepo, store: Any, rebuild: dict[str, pd.Timestamp]) -> Path:
    """The rebuilt views materialized from the start into a fresh SQLite file; the live store is not touched."""
    staging = repo.data / STAGING_DB
    _remove_sqlite(staging)  # left by a killed run
    staged = _staging_store(repo, staging)
    tables = [staged.get_feature_view(view) for view in rebuild]
    staged._get_provider().update_infra(project=staged.project, tables_to_delete=[], tables_to_keep=tables, entities_to_delete=[],
                                        entities_to_keep=[], partial=True)
    for view, view_end in rebuild.items():
        staged.materialize(start_date=EPOCH.to_pydatetime(), end_date=view_end.to_pydatetime(), feature_views=[view])
    online = staged._get_provider().online_store
    if getattr(online, "_conn", None) is not None:
        online._conn.close()
        online._conn = None
    return staging


def _swap_in(repo: FeatureRepo, store: Any, staging: Path, views: list[str]) -> None:
    """Replace the live SQLite tables of `views` by the staging database's, in one transaction.

    Readers of the live file (this process's and others': `lum serve`, `feast serve`) keep reading the old rows
    while the transaction runs, as long as its changes fit the page cache (sized here from the two files; past it
    SQLite takes the exclusive lock early and readers wait, which `read_consistently` absorbs), then the commit
    shows them all the new rows at once."""
    live = repo.root / store.config.online_store.path if not Path(store.config.online_store.path).is_absolute() else Path(store.config.online_store.path)
    names = [f"{PROJECT}_{view}" for view in views]
    cache_kib = 2 * (staging.stat().st_size + (live.stat().st_size if live.exists() else 0)) // 1024 + 65_536
    connection = sqlite3.connect(str(live), timeout=60.0, isolation_level=None)
    try:
        connection.execute(f"PRAGMA cache_size = -{cache_kib}")
        connection.execute("ATTACH DATABASE ? AS staged", (str(staging),))
        objects = list(connection.execute("SELECT type, name, tbl_name, sql FROM staged.sqlite_master"))
        create = {name: sql for kind, name, _, sql in objects if kind == "table"}
        missing = [name for name in names if name not in create]
        if missing:
            raise FeatureStoreError(f"{staging}: the staged online store lacks table(s) {', '.join(missing)}; nothing was swapped in")
        connection.execute("BEGIN IMMEDIATE")
        try:
            for name in names:
                connection.execute(f'DROP TABLE IF EXISTS main."{name}"')
                connection.execute(create[name])  # the staged CREATE TABLE, unqualified: into main
                connection.execute(f'INSERT INTO main."{name}" SELECT * FROM staged."{name}"')
                for kind, _, table, sql in objects:  # Feast's entity_key index of the table
                    if kind == "index" and table == name and sql:
                        connection.execute(sql)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("DETACH DATABASE staged")
    finally:
        connection.close()
