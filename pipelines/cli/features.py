"""`lum features ...`: the Feast feature store of a run folder.

    lum features apply        create/update runs/<run>/feature_repo, build the point-in-time offline tables, feast apply
    lum features ingest DIR   register the output of `lum embed` for its model version (then apply)
    lum features materialize  newest values into the online store (SQLite, or Redis), incrementally
    lum features push FILE|-  new events into the online store per event (the real-time stream; no materialize)
    lum features get          one ranking request's features from the online store (Python SDK or HTTP)
    lum features serve        Feast's HTTP feature server on this repo (`feast serve`)
    lum features training-set a split window's point-in-time training set for a feature service
"""

from __future__ import annotations

import io
import json
from typing import Any

import click
import numpy as np

from pipelines.cli.common import _friendly_errors, run_option
from pipelines.paths import RunPaths
from pipelines.run.lock import writer_lock

SERVICES = ["ranker_base", "ranker_pooled", "ranker_lum", "ranker_lum_pooled"]


@click.group()
def features() -> None:
    """The Feast feature store: apply, ingest, materialize, get, serve, training-set."""


@features.command("apply")
@click.option("--online-store", type=click.Choice(["sqlite", "redis"]), default=None, help="Online store [default: keep, sqlite at first].")
@click.option("--redis-url", default=None, help="Redis connection string host:port[,db=N] (with --online-store redis).")
@click.option("--model-version", default=None, help="Select this ingested model version for the LUM views.")
@click.option("--lum-ttl-days", type=float, default=None, help="TTL of user-interest vectors [default: keep, 30 at first; 0 = forever].")
@click.option("--rebuild-stats", is_flag=True, help="Recompute the offline tables even when the events did not change.")
@click.option("--offline-store", type=click.Choice(["file", "duckdb", "ray"]), default=None,
              help="Engine of training-set joins and materialization [default: keep, duckdb at first] (docs/feature-store.md#engines).")
@click.option("--ray-address", default=None, help="With --offline-store ray: HOST:PORT of a running Ray cluster [default: a local Ray].")
@click.option("--ray-cpus", type=int, default=None, help="With --offline-store ray and no --ray-address: CPU slots of the local Ray [default: every core].")
@run_option
@_friendly_errors
def features_apply(online_store, redis_url, model_version, lum_ttl_days, rebuild_stats, offline_store, ray_address, ray_cpus, run_dir) -> None:
    """Create or update the run's Feast repo and register its definitions (`feast apply`)."""
    from feature_store.repo import OfflineStoreConfig, OnlineStoreConfig
    from pipelines.steps.features import prepare_repo

    paths = RunPaths(run_dir)
    online = None
    if online_store or redis_url:
        online = OnlineStoreConfig(kind=online_store or "redis", redis_url=redis_url or "localhost:6379")
    if (ray_address or ray_cpus) and offline_store != "ray":
        raise click.UsageError("--ray-address and --ray-cpus go with --offline-store ray")
    offline = OfflineStoreConfig(offline_store, ray_address=ray_address, ray_cpus=ray_cpus) if offline_store else None
    with writer_lock(run_dir, "lum features apply"):  # one writer per run folder (pipelines/run/lock.py)
        repo, views, rebuilt = prepare_repo(paths, online=online, lum_ttl_days=lum_ttl_days, model_version=model_version,
                                            rebuild_stats=rebuild_stats, offline=offline)
    settings = repo.settings()
    click.echo(f"{'built' if rebuilt else 'kept'} the offline tables in {repo.data / 'stats'}")
    click.echo(f"registered {len(views)} feature views in {repo.root}: {', '.join(views)}")
    click.echo(f"LUM model version: {settings.get('model_version') or 'none ingested yet (run `lum features ingest`)'}; "
               f"online store: {settings['online_store']['kind']}; offline store: {settings['offline_store']['kind']}")


@features.command("ingest")
@click.argument("embed_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--item-valid-from", default=None, help="Timestamp of the item vectors [default: the end of the model's training data].")
@click.option("--select/--no-select", default=None, help="Make this version the selected one [default: only when none is selected].")
@run_option
@_friendly_errors
def features_ingest(embed_dir, item_valid_from, select, run_dir) -> None:
    """Register the Parquet output of `lum embed` (user and item vectors) for its model version."""
    from pipelines.steps.features import ingest_embeddings

    with writer_lock(run_dir, "lum features ingest"):
        repo, result, views = ingest_embeddings(RunPaths(run_dir), embed_dir, item_valid_from, select)
    if result["skipped"]:
        click.echo(f"{embed_dir} was already ingested for {result['version']}: skipped")
    else:
        click.echo(f"ingested {result['rows']:,} user embeddings (dimension {result['dim']}, conditions {', '.join(result['conditions'])}) "
                   f"for model version {result['version']}")
    click.echo(f"selected version: {repo.settings().get('model_version')}; registered {', '.join(views)}")


@features.command("materialize")
@click.option("--end", default=None, help="Materialize up to this time [default: the newest timestamp of the offline data].")
@click.option("--full", is_flag=True, help="Materialize everything again instead of continuing from the last run "
              "(SQLite: built aside and swapped in at once; Redis: lookups are refused meanwhile).")
@run_option
@_friendly_errors
def features_materialize(end, full, run_dir) -> None:
    """Write the newest feature values into the online store (incremental after the first run)."""
    from feature_store.materialize import materialize
    from feature_store.repo import FeatureRepo
    from pipelines.data.contract import utc_timestamp

    with writer_lock(run_dir, "lum features materialize"):
        state = materialize(FeatureRepo(RunPaths(run_dir).feature_repo), end=utc_timestamp(end) if end else None, full=full)
    if "redone" in state:
        click.echo(f"a full materialization started {state['redone'].get('started') or 'earlier'} had not finished (killed?): "
                   "materialized every view again from the start")
    kind = state["online_store"]["kind"]
    for view, mode in state["modes"].items():
        click.echo(f"  {view}: {mode} (up to {state['views'][view]})")
    click.echo(f"online store ({kind}, model version {state['model_version']}) holds everything up to {state['end']}; {state['seconds']} s")


@features.command("push")
@click.argument("source", type=click.Path(allow_dash=True, dir_okay=False))
@run_option
@_friendly_errors
def features_push(source, run_dir) -> None:
    """Apply new events (user_id, item_id, ts, label) to the online store: user counters and recent behaviours are
    updated per event, so a request sees every behaviour before it without a materialize. SOURCE: a .parquet,
    .csv or .jsonl file, or - for JSON lines on stdin. The batch is checked whole: a bad event applies nothing."""
    import sys
    from pathlib import Path

    import pandas as pd

    from feature_store.repo import FeatureRepo
    from feature_store.stream import StreamInputError, push_events

    if source == "-":
        text = sys.stdin.read()
        frame = pd.read_json(io.StringIO(text), lines=True, dtype=False) if text.strip() else pd.DataFrame()
        name = "stdin"
    else:
        path = Path(source)
        if not path.exists():
            raise click.ClickException(f"{path}: no such file")
        suffix = path.suffix.lower()
        if suffix not in (".parquet", ".csv", ".jsonl", ".json"):
            raise click.ClickException(f"{path}: unknown file type '{path.suffix}': expected .parquet, .csv or .jsonl")
        frame = (pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path, dtype={"user_id": str, "item_id": str})
                 if suffix == ".csv" else pd.read_json(path, lines=True, dtype=False))
        name = str(path)
    try:
        with writer_lock(run_dir, "lum features push"):
            done = push_events(FeatureRepo(RunPaths(run_dir).feature_repo), frame, source=name)
    except StreamInputError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"pushed {done['events']:,} events of {done['users']:,} users: {done['rows']['user_stats']:,} counter rows, "
               f"{done['rows']['user_recent_items']:,} history rows")


@features.command("get")
@click.option("--user", "user_id", required=True, help="User id.")
@click.option("--items", "item_ids", default="", help="Comma-separated candidate item ids.")
@click.option("--conditions", default=None, help="Comma-separated query conditions [default: all served].")
@click.option("--request-time", default=None, help="Request time for the TTL check [default: the store's materialized-until time].")
@click.option("--http", "http_url", default=None, help="Ask a running `feast serve` at this URL instead of the Python SDK.")
@run_option
@_friendly_errors
def features_get(user_id, item_ids, conditions, request_time, http_url, run_dir) -> None:
    """Print one ranking request's features from the online store, as JSON."""
    from feature_store.online import FeatureClient

    repo = RunPaths(run_dir).feature_repo
    if not (repo / "feature_store.yaml").exists():  # no repo at all: "never materialized" would send the user to the wrong step
        raise click.BadParameter(f"{repo} holds no feature repo: run `lum features apply --run {run_dir}` (or `lum run`) first",
                                 param_hint="--run")
    client = FeatureClient(repo, http_url=http_url)
    answer = client.get_ranking_features(user_id, conditions.split(",") if conditions else None,
                                         [i for i in item_ids.split(",") if i], request_time=request_time)
    def vec(v: np.ndarray) -> list[float]:
        return [round(float(x), 5) for x in v]

    click.echo(json.dumps(_nan_to_null({
        "user_id": answer.user_id, "model_version": answer.model_version, "request_time": answer.request_time.isoformat(),
        "user_found": answer.user_found, "user_counters": answer.user_counters, "hist_item_ids": answer.hist_item_ids,
        "conditions": [{"condition": c, "found": bool(f), "stale": bool(s), "as_of": None if t is None else t.isoformat(), "embedding": vec(v) if f else None}
                       for c, f, s, t, v in zip(answer.conditions, answer.user_vector_found, answer.user_vector_stale, answer.user_vector_as_of,
                                                answer.user_vectors)],
        "items": [{"item_id": i, "found": bool(ok), "category": cat, **{k: (None if np.isnan(v[n]) else float(v[n])) for k, v in answer.item_counters.items()},
                   "lum_found": bool(lf)}
                  for n, (i, ok, cat, lf) in enumerate(zip(answer.item_ids, answer.item_found, answer.item_category, answer.item_vector_found))],
    }), indent=2, default=str, allow_nan=False))


def _nan_to_null(value: Any) -> Any:
    """NaN (an unknown user's counters) as JSON null: `NaN` is not JSON, and a stack's parser would reject the answer."""
    if isinstance(value, float):
        return None if value != value else value
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_null(v) for v in value]
    return value


@features.command("serve")
@click.option("--port", type=int, default=6566)
@click.option("--host", default="127.0.0.1")
@run_option
@_friendly_errors
def features_serve(port, host, run_dir) -> None:
    """Run Feast's HTTP feature server on the run's repo until interrupted (see README for the request)."""
    import os

    from feature_store.repo import FeatureRepo
    from feature_store.serve import FeatureServer

    server = FeatureServer(FeatureRepo(RunPaths(run_dir).feature_repo), port=port, host=host)
    server.repo.store()
    click.echo(f"serving {server.repo.root} on {server.url} (POST /get-online-features); Ctrl-C stops it")
    os.chdir(server.repo.root)
    os.execvp(server.command()[0], server.command())


@features.command("training-set")
@click.option("--protocol", type=click.Choice(["global", "per-user"]), default="global")
@click.option("--window", type=click.Choice(["train", "test"]), default="train")
@click.option("--service", type=click.Choice(SERVICES), default="ranker_lum_pooled", help="Feature service (ranker variant).")
@click.option("--conditions", default=None, help="Comma-separated LUM query conditions [default: all of the selected version].")
@run_option
@_friendly_errors
def features_training_set(protocol, window, service, conditions, run_dir) -> None:
    """Build a split window's point-in-time training set: one row per impression, in order."""
    from pipelines.steps.features import build_window_training_set, training_set_summary

    with writer_lock(run_dir, "lum features training-set"):
        out = build_window_training_set(RunPaths(run_dir), protocol, window, service, tuple(conditions.split(",")) if conditions else None)
    click.echo(f"wrote {out}: {json.dumps(training_set_summary(out))}")
