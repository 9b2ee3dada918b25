"""Run-folder steps of the rankers: training sets through Feast, train, evaluate, score.

    runs/<name>/
      training_sets/<protocol>-<window>-<service>.parquet   (+ .json: what it was built from)
      rankers/<protocol>-<model>-<variant>/                  a saved ranker (config, feature schema, weights)
      evaluations/rankers/<protocol>-<model>-<variant>.json  test-window metrics, overall and per condition
      evaluations/rankers/<protocol>-<model>-<variant>.scores.parquet  the test-window scores behind them (reused by
                                                             `score_test_window` while ranker and test set are unchanged)
      scores/<protocol>.parquet                              the test window scored by every trained ranker

A training set is built once per (protocol, window) with every feature the store has (`ranker_lum_pooled`
when a LUM version is selected, else `ranker_pooled`); the ranker variants choose their columns from it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from contracts.files import write_json_atomic
from contracts.names import TRAINING_SET_METADATA_KEY
from feature_store.repo import FeatureRepo
from feature_store.training_set import lum_vector_as_of
from pipelines.data.contract import read_events, write_parquet_atomic
from pipelines.paths import RunPaths
from pipelines.steps.features import build_window_training_set
from ranker.metrics import metrics_by, ranking_metrics
from ranker.train import RankerConfig, TrainedRanker, train_ranker

MODELS = ("dlrm", "lightgbm")


def _state_fingerprint(paths: RunPaths, protocol: str, window: str) -> str:
    """What a training set depends on: the split, the offline tables, and the selected LUM version's ingested data
    (not which version is selected elsewhere: switching versions back and forth keeps each one's sets valid)."""
    repo = FeatureRepo(paths.feature_repo_of(protocol))
    settings = repo.settings()
    version = settings.get("model_version")
    ingested = repo.ingested().get(version) if version else None
    parts = [paths.split_summary(protocol).read_text() if paths.split_summary(protocol).exists() else "",
             (repo.data / "stats" / "stats.json").read_text() if (repo.data / "stats" / "stats.json").exists() else "",
             json.dumps([version, ingested, settings.get("conditions"), settings.get("lum_ttl_days")], sort_keys=True), window]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def ensure_training_set(paths: RunPaths, protocol: str, window: str, progress: bool = True) -> Path:
    """The (protocol, window) training set with every stored feature, rebuilt only when its inputs changed."""
    repo = FeatureRepo(paths.feature_repo_of(protocol))
    version = repo.settings().get("model_version")
    service = "ranker_lum_pooled" if version else "ranker_pooled"
    out = paths.training_set(protocol, window, service)
    stamp = out.with_suffix(".json")
    fingerprint = _state_fingerprint(paths, protocol, window)
    if out.exists() and stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return out
    started = time.perf_counter()
    build_window_training_set(paths, protocol, window, service, progress=progress)
    write_json_atomic({"fingerprint": fingerprint, "service": service, "seconds": round(time.perf_counter() - started, 1)}, stamp, default=float)
    return out


def ranker_dir(paths: RunPaths, protocol: str, model: str, variant: str) -> Path:
    return paths.root / "rankers" / f"{protocol}-{model}-{variant}"


def evaluation_file(paths: RunPaths, protocol: str, model: str, variant: str) -> Path:
    return paths.root / "evaluations" / "rankers" / f"{protocol}-{model}-{variant}.json"


def scores_file(paths: RunPaths, protocol: str) -> Path:
    return paths.root / "scores" / f"{protocol}.parquet"


def test_scores_file(paths: RunPaths, protocol: str, model: str, variant: str) -> Path:
    return paths.root / "evaluations" / "rankers" / f"{protocol}-{model}-{variant}.scores.parquet"


def ranker_fingerprint(folder: Path) -> str:
    """Hash of every file of a saved ranker folder (its config, feature pipeline and weights)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _scores_stamp(test_path: Path, folder: Path) -> dict[str, str]:
    """What a ranker's test-window scores depend on: the ranker itself and the test set it scored."""
    return {"ranker": ranker_fingerprint(folder), "test_set": json.loads(test_path.with_suffix(".json").read_text())["fingerprint"]}


def _reused_scores(path: Path, stamp: dict[str, str], rows: int) -> np.ndarray | None:
    """The scores saved at `path` when they were made under `stamp` for `rows` rows, else None."""
    if not path.exists():
        return None
    table = pq.read_table(path)
    made = json.loads((table.schema.metadata or {}).get(b"lum.scores", b"{}"))
    return table.column("score").to_numpy() if made == stamp and table.num_rows == rows else None


def train_step(paths: RunPaths, protocol: str, config: RankerConfig, force: bool = False, progress: bool = True) -> tuple[Path, bool]:
    """Train one ranker on the protocol's training window; skipped when the same config and data made it."""
    train = ensure_training_set(paths, protocol, "train", progress)
    out = ranker_dir(paths, protocol, config.model, config.variant)
    stamp = {"training_set": json.loads(train.with_suffix(".json").read_text())["fingerprint"], "config": json.loads(json.dumps(asdict(config)))}
    done = out / "lum_step.json"
    if not force and done.exists() and json.loads(done.read_text()) == stamp:
        return out, False
    table = pq.read_table(train)
    ranker = train_ranker(table, config, progress=progress)
    ranker.save(out)
    write_json_atomic(stamp, done, default=float)
    return out, True


def condition_columns(table: pa.Table) -> list[str]:
    """The categorical (string) request-context columns: the conditions metrics are broken down by."""
    meta = json.loads((table.schema.metadata or {}).get(TRAINING_SET_METADATA_KEY.encode(), b"{}"))
    return [c for c in meta.get("context_columns", []) if pa.types.is_string(table.schema.field(c).type)]


def evaluate_step(paths: RunPaths, protocol: str, model: str, variant: str, progress: bool = True) -> dict[str, Any]:
    """Test-window metrics of a trained ranker, overall and per condition value; written to evaluations/rankers/."""
    test_path = ensure_training_set(paths, protocol, "test", progress)
    test = pq.read_table(test_path)
    folder = ranker_dir(paths, protocol, model, variant)
    if not (folder / "ranker.json").exists():
        raise FileNotFoundError(f"{folder} holds no trained ranker: run `lum ranker train --protocol {protocol} --model {model} --variant {variant}`")
    frame = test.select(["user_id", "label", *condition_columns(test)]).to_pandas()
    frame["score"] = TrainedRanker.load(folder).score(test)
    # kept for `score_test_window`, which would otherwise score the same rows with the same ranker again
    scores = pa.table({"score": frame["score"].to_numpy()})
    stamp = json.dumps(_scores_stamp(test_path, folder)).encode()
    write_parquet_atomic(scores.replace_schema_metadata({b"lum.scores": stamp}), test_scores_file(paths, protocol, model, variant))
    result: dict[str, Any] = {"protocol": protocol, "model": model, "variant": variant, "overall": ranking_metrics(frame)}
    result["by_condition"] = {c: metrics_by(frame, c).reset_index().to_dict(orient="records") for c in condition_columns(test)}
    write_json_atomic(result, evaluation_file(paths, protocol, model, variant), default=float)  # numpy scalars as floats
    return result


def score_test_window(paths: RunPaths, protocol: str, progress: bool = True, rankers: list[tuple[str, str]] | None = None) -> Path:
    """The test window with every trained ranker's score (or only those of `rankers`, (model, variant) pairs: a run
    scores what its config trains, never a ranker left in the folder by an earlier config) and the slice columns the
    report needs."""
    test_path = ensure_training_set(paths, protocol, "test", progress)
    test = pq.read_table(test_path)
    frame = test.select([c for c in ("row_id", "user_id", "item_id", "ts", "label", *condition_columns(test)) if c in test.column_names]).to_pandas()
    counters = test.select(["user_n_events", "item_n_impressions"]).to_pandas()
    frame["user_history_len"] = counters["user_n_events"].fillna(0).astype(np.int64)
    frame["user_no_history"] = frame["user_history_len"] == 0
    frame["item_popularity"] = counters["item_n_impressions"]
    # the item counters are cumulative per period: no counter before the row's day is no impression before it
    frame["item_interactions"] = counters["item_n_impressions"].fillna(0).astype(np.int64)
    earlier = pd.concat([read_events(paths.split_file(protocol, w))[0].select(["item_id"]).to_pandas() for w in ("pretrain", "train")])
    frame["item_is_new"] = ~frame["item_id"].isin(set(earlier["item_id"].astype(str)))
    window, _ = read_events(paths.split_file(protocol, "test"))
    extras = [c for c in ("request_id", "position", "relevance") if c in window.column_names]
    if extras:  # the split window and the training set share row order (one row per impression)
        for column in extras:
            frame[column] = window.column(column).to_numpy()
    as_of = lum_vector_as_of(FeatureRepo(paths.feature_repo_of(protocol)), frame)
    if as_of is not None:
        frame["lum_as_of"] = as_of
    for folder in sorted((paths.root / "rankers").glob(f"{protocol}-*")):
        if not (folder / "ranker.json").exists():
            continue
        model, variant = folder.name[len(protocol) + 1 :].split("-", 1)
        if rankers is not None and (model, variant) not in rankers:
            continue
        saved = _reused_scores(test_scores_file(paths, protocol, model, variant), _scores_stamp(test_path, folder), test.num_rows)
        frame[f"score__{model}__{variant}"] = saved if saved is not None else TrainedRanker.load(folder).score(test)
    out = scores_file(paths, protocol)
    write_parquet_atomic(pa.Table.from_pandas(frame, preserve_index=False), out)
    return out


def score_requests(paths: RunPaths, ranker_folder: Path, requests: pd.DataFrame, source: str = "offline") -> pd.DataFrame:
    """Batch-score requests (user_id, item_id, ts, request-time context) with features from Feast.

    `offline`: point-in-time features as of each row's `ts` (the training-set join). `online`: the newest
    values in the online store (one lookup per (user, ts) request), as a ranking stack would see them now.
    """
    from feature_store.online import FeatureClient
    from feature_store.training_set import TrainingSetConfig, build_training_set

    ranker = TrainedRanker.load(ranker_folder)
    repo = FeatureRepo(paths.feature_repo)
    context = tuple(ranker.schema.context_columns)
    missing = [c for c in ("user_id", "item_id", *context) if c not in requests.columns]
    if missing:
        raise ValueError(f"requests lack column(s) {', '.join(missing)} that the ranker in {ranker_folder} needs")
    if source == "offline":
        service = "ranker_lum_pooled" if repo.settings().get("model_version") else "ranker_pooled"
        table = build_training_set(repo, requests, TrainingSetConfig(service, context_columns=context))
        scores = ranker.score(table)
    elif source == "online":
        client = FeatureClient(repo)
        scores = np.zeros(len(requests))
        requests = requests.reset_index(drop=True)
        keys = ["user_id", "ts", *context] if "ts" in requests.columns else ["user_id", *context]
        for _, rows in requests.groupby(keys, sort=False, dropna=False):
            first = rows.iloc[0]
            answer = client.get_ranking_features(str(first.user_id), None, rows.item_id.astype(str).tolist(),
                                                 request_time=first.ts if "ts" in rows else None)
            frame = answer.to_frame({c: first[c] for c in context})
            scores[rows.index.to_numpy()] = ranker.score(frame)
    else:
        raise ValueError(f"source must be 'offline' or 'online', got '{source}'")
    return requests.assign(score=scores)
