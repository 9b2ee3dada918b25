"""Experiment tracking: a finished run's settings, metrics and report logged to MLflow (`tracking: {mlflow: URI}`).

    log_run_to_mlflow("runs/demo", "file:///srv/mlruns")     # what `lum run` does at its end when the config asks

One MLflow run per call, in the experiment `tracking.experiment` (default `lum`), named after the run folder:

* params: the run config as `run_state.json` recorded it, flattened to dotted keys (`rankers.lightgbm.num_leaves`);
* metrics: every configured ranker's test-window metrics (`ranker.<protocol>-<model>-<variant>.<metric>`: auc, gauc,
  logloss, ne, calibration, ...), every LM evaluation's (`lm.<split>-<preset>.<metric>`: hr@10, ndcg@10, ...), and
  each step's seconds (`seconds.<step>`); MLflow allows letters, digits and `_-. /` in a key, anything else is `_`;
* artifacts: the report folder (report.html, report.md, report.json, the plots) under `report/`, and run_state.json.

mlflow (the `mlflow-skinny` client) is imported here only, when a run asks for tracking: a run without it never
imports it.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from pipelines.paths import RunPaths
from pipelines.run.state import STATE_FILE, flat_settings

_BAD_KEY = re.compile(r"[^\w\-. /]")
PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value (longer ones, e.g. a list of 32 query conditions, are cut)


def mlflow_key(name: str) -> str:
    return _BAD_KEY.sub("_", name)


def _numbers(value: Any, prefix: str) -> dict[str, float]:
    """The finite numbers of a nested mapping, by dotted key (booleans and NaN left out)."""
    return {key: float(v) for key, v in flat_settings(value, prefix).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def run_metrics(run_dir: str | Path) -> dict[str, float]:
    """The metrics `log_run_to_mlflow` logs, read from a finished run folder: those of the rankers and LM models its
    recorded config trains (never files an earlier config left there), and the steps' seconds."""
    from pipelines.run.config import parse_run_config
    from pipelines.steps.rankers import evaluation_file

    paths = RunPaths(run_dir)
    state = json.loads((paths.root / STATE_FILE).read_text())
    config = parse_run_config(state["config"], str(paths.root / STATE_FILE))
    metrics: dict[str, float] = {}
    for protocol in config.protocols:
        key = config.protocol_key(protocol)
        for model in config.rankers.models:
            for variant in config.rankers.variants:
                made = evaluation_file(paths, key, model, variant)
                if made.exists():
                    metrics.update(_numbers(json.loads(made.read_text())["overall"], f"ranker.{key}-{model}-{variant}"))
        lm = paths.evaluation(protocol.split, config.lm.pretrain.preset)
        if lm.exists():
            metrics.update(_numbers(json.loads(lm.read_text()).get("overall", {}), f"lm.{protocol.split}-{config.lm.pretrain.preset}"))
    for step, record in state.get("steps", {}).items():
        if isinstance(record.get("seconds"), (int, float)):
            metrics[f"seconds.{step}"] = float(record["seconds"])
    return {mlflow_key(k): v for k, v in metrics.items()}


def log_run_to_mlflow(run_dir: str | Path, uri: str, experiment: str = "lum") -> str:
    """Log a finished run folder to the MLflow tracking server or store at `uri`; returns the MLflow run id."""
    try:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise ImportError(f"tracking.mlflow is set ({uri}) but mlflow is not installed: install mlflow-skinny "
                          "(docs/run.md#tracking)") from exc
    import time

    paths = RunPaths(run_dir)
    state_file = paths.root / STATE_FILE
    if not state_file.exists():
        raise FileNotFoundError(f"{paths.root} has no {STATE_FILE}: not a folder `lum run` made")
    state = json.loads(state_file.read_text())
    params = {mlflow_key(k): json.dumps(v) if not isinstance(v, str) else v for k, v in flat_settings(state["config"]).items()}
    metrics = run_metrics(paths.root)
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses its file store unless asked (it wants a database, which needs alembic, not in mlflow-skinny);
        # a file:// URI in the run config is that request: a local store a team browses with `mlflow ui`
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=paths.root.resolve().name, tags={"lum.run_dir": str(paths.root.resolve())})
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        items = [Param(k, v[:PARAM_VALUE_MAX]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=items[start:start + 100])
        values = [Metric(k, v, now, 0) for k, v in sorted(metrics.items())]
        for start in range(0, len(values), 1000):
            client.log_batch(run_id, metrics=values[start:start + 1000])
        report = paths.root / "report"
        if report.is_dir():
            client.log_artifacts(run_id, str(report), "report")
        client.log_artifact(run_id, str(state_file))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
