"""`lum run`: every step of a run config, from events to the A/B report, resumable.

    data -> split -> pretrain the LM -> next-item evaluation -> embed (rolling or snapshot) -> Feast
         -> training sets -> rankers (DLRM, LightGBM x variants) -> evaluation -> scored test window
         -> online store (materialized) -> report

Each step keeps its output in the run folder and is skipped when that output is up to date, so running the same
config again after a failure resumes at the failed step. `run_state.json` records each step's state, settings
hash and duration (`lum status --run DIR` prints them). The steps are the functions of `pipelines.steps`, the
same ones the single-step commands (`lum data split`, `lum pretrain`, ...) call.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pyarrow.compute as pc
import pyarrow.parquet as pq

from contracts.embeddings import MANIFEST_FILE as EMBEDDING_MANIFEST
from contracts.embeddings import MODEL_MANIFEST_FILE, read_embedding_manifest
from contracts.files import file_sha256
from lum.embed_process import embed_in_subprocess
from pipelines.data.split import dataset_fingerprint
from pipelines.paths import RunPaths
from pipelines.run.config import ProtocolConfig, RunConfig, config_dict, parse_run_config
from pipelines.run.lock import run_lock
from pipelines.run.report import report_run
from pipelines.run.state import STATE_FILE, RunState, SettingsChangedError, StepChange, describe_changes
from pipelines.run.subruns import before_test_window, seed_config, seed_dir, share_data, validation_config, validation_fractions
from pipelines.steps import UP_TO_DATE
from pipelines.steps import data as data_steps
from pipelines.steps.embed import embedding_rows, query_conditions, snapshot_times
from pipelines.steps.features import ingest_embeddings, materialize_online
from pipelines.steps.lm import evaluate_step as evaluate_lm
from pipelines.steps.lm import pretrain_step
from pipelines.steps.rankers import evaluate_step, ranker_dir, score_test_window, scores_file, train_step
from pipelines.steps.retrieval import retrieval_ab_step
from ranker.config import RankerConfig

Echo = Callable[[str], None]


def execute(config: RunConfig, echo: Echo = print, force: bool = False, online: bool = True) -> dict[str, Any]:
    """Run every step of `config`; returns the report summary.

    Before any step runs, every step's settings are compared with those it ran with (`changed_steps`): a step that
    ran with other settings is a `SettingsChangedError` naming every such step and setting, unless `force`: then it
    is redone, and so is every step that depends on it, and only those. `seeds` > 1 runs the other seeds after the
    run's own steps and before its report; `holdout: validation` runs the config on the log without its test window
    instead (`pipelines.run.subruns`). `online`: materialize the online store (a sub-run serves nothing).

    The run holds the run folder's lock throughout (`pipelines.run.lock`): a second writer is refused.
    """
    tracking = config.tracking.mlflow
    if tracking:  # before any work: a run that cannot be logged is told so now, not after an hour
        check_mlflow(tracking)
    with run_lock(config.run_dir, "lum run"):
        changes = changed_steps(config, online)
        if changes and not force:
            raise SettingsChangedError(describe_changes(changes))
        summary = _execute(config, echo, force, online)
        if tracking:
            from pipelines.run.tracking import log_run_to_mlflow

            # the validation run's report is the one this run made
            logged = config.run_dir if config.holdout == "test" else validation_config(config).run_dir
            run_id = log_run_to_mlflow(logged, tracking, config.tracking.experiment)
            echo(f"logged to MLflow at {tracking}: experiment {config.tracking.experiment!r}, run {run_id}")
        return summary


def check_mlflow(uri: str) -> None:
    """A clear error when the config asks for MLflow tracking and mlflow is not installed."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise ValueError(f"tracking.mlflow: {uri} asks for MLflow tracking, but mlflow is not installed "
                         "(install mlflow-skinny; docs/run.md#tracking)")


def changed_steps(config: RunConfig, online: bool = True, planned: dict[str, dict[str, Any]] | None = None) -> list[StepChange]:
    """The steps of `config` (its sub-runs' included) whose settings differ from those `run_state.json` recorded,
    found without running anything: the same walk as the run, where each step only compares its settings.

    Settings read from a step's output (the model's default query conditions, the split's snapshot times) are read
    from what the folder holds; a protocol whose outputs are not there yet is checked up to that point, and its
    later steps are checked as they come (`RunState.step` refuses them then). `planned`: filled with {run folder:
    {step: its record with the settings it would run with}} (the run state a finished run of `config` would have).
    """
    changes: list[StepChange] = []
    _execute(config, lambda line: None, False, online, check=changes, planned=planned)
    return changes


class _NotYetMade(Exception):
    """Check mode: a setting is read from an output that is not there yet, so the rest of the protocol is unchecked."""


def _execute(config: RunConfig, echo: Echo, force: bool, online: bool, check: list[StepChange] | None = None,
             planned: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The run (`check`: None), or its check: every step compares its settings into `check` and runs nothing."""
    paths = RunPaths(config.run_dir)
    state = RunState(paths, config, force=force, check=check)
    if planned is not None:
        planned[config.run_dir] = state.state["steps"]  # filled in as the check walks the steps
    started = time.perf_counter()
    data = config.data
    data_settings: dict[str, Any] = {"data": data}
    if data.source == "simulator":
        make = lambda redo: _wrote(data_steps.simulate(paths, data.preset, data.seed, data.n_users, force=redo), paths, echo)
    elif data.source == "movielens":
        if not Path(str(data.path)).exists():
            raise FileNotFoundError(f"data.path: no MovieLens folder at {data.path!r}")
        make = lambda redo: _wrote(data_steps.import_movielens(paths, str(data.path), data.like_threshold, data.on_bad, force=redo), paths, echo)
    elif data.source == "files":
        if not Path(str(data.path)).is_file():
            raise FileNotFoundError(f"data.path: no events file at {data.path!r}")
        # the file's content is a setting: a log replaced at the same path is a change, never silently kept
        data_settings["events_sha256"] = file_sha256(Path(str(data.path)))
        if data.items and Path(data.items).is_file():
            data_settings["items_sha256"] = file_sha256(Path(data.items))
        make = lambda redo: _wrote(data_steps.import_files(paths, str(data.path), data.files_config(), force=redo), paths, echo)
    else:
        make = lambda redo: _wrote(data_steps.imported(paths), paths, echo)
        state.forget_failed("data")  # an earlier try found nothing imported: it made nothing to protect
        if paths.dataset_info.exists():  # data another step put here: its fingerprint is the setting
            data_settings["dataset"] = dataset_fingerprint(paths)
    state.step("data", make, echo, settings=data_settings)
    if config.holdout == "validation":
        return execute_validation(config, paths, state, echo, force, planned)

    scored: list[tuple[ProtocolConfig, Path]] = []
    for protocol in config.protocols:
        try:
            scored.append((protocol, run_protocol(config, protocol, paths, state, echo)))
        except _NotYetMade:
            assert check is not None  # raised in check mode only
    # the online store and the report are made again from the steps' outputs whenever those change: nothing to check
    if online:
        state.step("online store", lambda redo: online_store(paths, echo), echo)
    seed_reports = []
    for k in range(1, config.seeds):
        sub = seed_config(config, k)
        into = RunPaths(sub.run_dir)
        state.step(f"seed {k}: data", lambda redo: _wrote(share_data(paths, into, why=f"seed {k}", force=redo), into, echo), echo,
                   settings={"after": state.settings_of("data")})
        echo(f"=== seed {k + 1} of {config.seeds} (every training seed + {k}): {sub.run_dir}")
        seed_reports.append({"seed": k, "run": sub.run_dir, "report": _execute(sub, echo, force, online=False, check=check, planned=planned)})
    if check is not None:
        return {}
    summary = state.step("report", lambda redo: report_run(config, paths, scored, state.durations(), seed_reports=seed_reports), echo)
    echo("--- step durations (s): " + ", ".join(f"{k} {v}" for k, v in state.durations().items()))
    echo(f"finished in {time.perf_counter() - started:.1f} s; report: {paths.root / 'report' / 'report.html'}")
    return summary


def execute_validation(config: RunConfig, paths: RunPaths, state: RunState, echo: Echo, force: bool,
                       planned: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """`holdout: validation`: the run's split (the same step as the test run's, so that run reuses it), then the log
    without the test window into run_dir/validation, and the config run there; returns that run's report."""
    protocol = config.protocols[0]
    split_step = run_split(protocol, paths, state, echo)
    sub = validation_config(config)

    def cut(redo: bool) -> Any:
        why = f"validation: {protocol.split} test window cut off"
        made = share_data(paths, RunPaths(sub.run_dir), keep=before_test_window(paths, protocol), why=why, force=redo)
        return _wrote(made, RunPaths(sub.run_dir), echo)

    state.step("validation data", cut, echo, settings={"after": state.settings_of(split_step)})
    if protocol.last_k is not None:
        windows = f"each user's last {protocol.last_k[1]} event(s) of the rest as validation, the {protocol.last_k[0]} before for training"
    else:
        windows = "windows " + ", ".join(f"{f:.3f}" for f in validation_fractions(protocol, config.validation_share)) + " of the rest"
    echo(f"=== validation run (the test window is not in it; {windows}): {sub.run_dir}")
    return _execute(sub, echo, force, online=False, check=state.check, planned=planned)


def _wrote(result: dict[str, Any] | str, paths: RunPaths, echo: Echo) -> dict[str, Any] | str:
    for line, _ in data_steps.result_lines(result, paths):
        echo(line)
    return result


# settings that change how fast a step runs, never what it makes: changing them is not a change of the step
RUNTIME_ONLY = ("threads", "checkpoint_every")


def content_settings(config: Any) -> dict[str, Any]:
    """A config as plain values without its RUNTIME_ONLY fields (at any depth)."""
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in RUNTIME_ONLY}
        return value
    return strip(config_dict(config))


def run_split(protocol: ProtocolConfig, paths: RunPaths, state: RunState, echo: Echo) -> str:
    """The split step of `protocol` (one step, shared by the test run and the validation run); returns its name."""
    split_config = protocol.split_config()
    name = f"{protocol.name}: split"
    state.step(name, lambda redo: data_steps.split(paths, split_config, force=redo), echo,
               settings={"split": split_config, "after": state.settings_of("data")})
    return name


def run_protocol(config: RunConfig, protocol: ProtocolConfig, paths: RunPaths, state: RunState, echo: Echo) -> Path:
    """The steps of one protocol (split ... scored test window); returns the scored test window's path.

    Each step's settings hold the settings hash of the step it reads from (`after`), so a step redone with other
    settings changes those of every step downstream of it (see `RunState`).
    """
    split, lm = protocol.split, config.lm
    name = protocol.name
    run_split(protocol, paths, state, echo)
    model_dir = paths.model_dir(split, lm.pretrain.preset)

    def pretrain(redo: bool) -> Any:
        manifest = pretrain_step(paths, split, lm.pretrain, lm.tokenizer, force=redo)
        if manifest != UP_TO_DATE:
            echo(f"wrote {model_dir} ({manifest['model_version']}, {manifest['steps']} steps, final loss {manifest['final_loss']:.4f})")
        return manifest

    state.step(f"{name}: pretrain", pretrain, echo, settings={
        "lm.pretrain": content_settings(lm.pretrain), "lm.tokenizer": lm.tokenizer, "after": state.settings_of(f"{name}: split")})
    model_settings = state.settings_of(f"{name}: pretrain")
    evaluation = paths.evaluation(split, lm.pretrain.preset)  # id and semantic-id models alike: the model retrieves its list
    state.step(f"{name}: evaluate LM",
               lambda redo: UP_TO_DATE if evaluation.exists() and not redo else evaluate_lm(paths, split, lm.pretrain.preset, lm.evaluate),
               echo, settings={"lm.evaluate": lm.evaluate, "after": model_settings})

    key = config.protocol_key(protocol)  # where this protocol's features, rankers and scores live (pipelines.paths)
    embed_dir = paths.embeddings(f"{split}-{lm.pretrain.preset}-{protocol.features}")
    rows = paths.root / "embeddings" / f"{split}-rows.parquet"
    try:
        conditions = query_conditions(model_dir, tuple(config.embed.conditions), rolling=protocol.features == "rolling", events=paths.events)
        if state.check is None:  # written once from the split (the check writes nothing)
            embedding_rows(paths, split, rows)
        if protocol.features == "rolling":
            as_of, for_rows = "rows:" + str(rows), None
        else:  # the daily job's snapshots, computed where a training or test row joins them (and the last one for everyone)
            as_of, for_rows = snapshot_times(paths, split, protocol.snapshot_every), rows
    except (OSError, ValueError, KeyError) as exc:
        if state.check is not None:  # the model or split this reads is not made yet: checked when the run gets here
            raise _NotYetMade(str(exc)) from exc
        raise
    job = replace(config.embed.job, engine=protocol.engine) if protocol.engine else config.embed.job

    def embed(redo: bool) -> str | None:
        if redo:
            remove_tree(embed_dir)
        made = read_embedding_manifest(embed_dir) if (embed_dir / EMBEDDING_MANIFEST).exists() else None
        if made:  # a folder the state file does not describe (an older run, a copy): checked against the config itself
            refuse_other_job_settings(embed_dir, made, job, conditions.split(","), model_version=model_version(model_dir))
            if made.complete:
                return UP_TO_DATE
        embed_in_subprocess(model_dir, paths.events, as_of, embed_dir, job, conditions, for_rows)
        return None

    job_settings = {k: getattr(job, k) for k in ("engine", "max_history", "window_stride", "shards", "output_dtype", "dim", "pca_sample")}
    state.step(f"{name}: embed", embed, echo, settings={
        "embed.job": job_settings, "embed.conditions": conditions, "features": protocol.features, "as_of": as_of if for_rows else "rows",
        "after": model_settings})

    def features(redo: bool) -> str | None:
        if redo:  # the repo holds the embeddings an earlier config made: it is built again from this one's
            remove_tree(paths.feature_repo_of(key))
        # under the per-user split, rows of some users predate the model's training end by design of the protocol
        valid_from = first_event_time(paths) if split == "per-user" else None
        refuse_other_embeddings(paths.feature_repo_of(key), embed_dir)
        _, result, _ = ingest_embeddings(paths, embed_dir, valid_from, select=True, protocol=key, offline=config.features.offline())
        how = "already ingested" if result["skipped"] else f"{result['rows']:,} rows ingested"
        echo(f"features: model version {result['version']} selected ({how})")
        return UP_TO_DATE if result["skipped"] else None

    # the embeddings folder as the run folder names it (a copied or moved run folder holds the same one)
    state.step(f"{name}: features", features, echo, settings={"embeddings": run_relative(paths, embed_dir), "after": state.settings_of(f"{name}: embed")})
    feature_settings = state.settings_of(f"{name}: features")
    rankers = config.rankers
    for model in rankers.models:
        for variant in rankers.variants:
            ranker_config = rankers.ranker_config(model, variant)

            def train_and_evaluate(redo: bool, ranker_config=ranker_config, model=model, variant=variant) -> str | None:
                _, trained = train_step(paths, key, ranker_config_as_made(paths, key, ranker_config), force=redo)
                result = evaluate_step(paths, key, model, variant)["overall"]
                echo(f"{model}/{variant}: {'trained' if trained else 'up to date'}; test AUC {result['auc']:.4f}, GAUC {result['gauc']:.4f}")
                return None if trained else UP_TO_DATE

            # the other model's section is not this ranker's setting: changing LightGBM's leaves leaves the DLRMs alone
            own = {k: v for k, v in content_settings(ranker_config).items() if k not in {"dlrm", "lightgbm"} - {model}}
            state.step(f"{name}: {model} {variant}", train_and_evaluate, echo, settings={"ranker": own, "after": feature_settings})
    configured = [(m, v) for m in rankers.models for v in rankers.variants]
    # the scores are reused per ranker only while ranker and test set are unchanged (pipelines.steps.rankers)
    scored = state.step(f"{name}: score test window", lambda redo: score_test_window(paths, key, rankers=configured), echo)
    retrieval = config.retrieval
    if retrieval.enabled and config.data.source == "simulator" and key == split:  # one per split: it does not depend on the features
        engine = retrieval.engine
        out = paths.retrieval_ab(split)

        def retrieval_ab(redo: bool) -> str | None:
            if out.exists() and not redo:
                return UP_TO_DATE
            result = retrieval_ab_step(paths, split, model_dir, retrieval.requests, retrieval.added, retrieval.beam, engine, configured)
            merged = next(r for r in result["rows"] if r["candidates"] == "logged + LUM")
            echo(f"retrieval A/B: {merged['requests']:,} requests; LUM candidates lift the recall of the would-click items by "
                 f"{merged['recall_lift']:+.1%} and the oracle CTR@10 by {merged['oracle_ctr@10_lift']:+.1%}")
            return None

        # after the rankers: each of them orders the candidate sets too
        state.step(f"{name}: retrieval A/B", retrieval_ab, echo, settings={"retrieval": retrieval, "engine": engine, "after": model_settings,
                                                                          "rankers": [state.settings_of(f"{name}: {m} {v}") for m, v in configured]})
    return scored


def ranker_config_as_made(paths: RunPaths, key: str, config: RankerConfig) -> RankerConfig:
    """`config` with the other model's section (LightGBM's for a DLRM, and the reverse) as the saved ranker recorded
    it. `train_step` retrains when any part of its RankerConfig differs from the one it saved, and a RankerConfig
    carries both models' sections: without this, changing a LightGBM setting would retrain every DLRM, which never
    reads it."""
    other = "lightgbm" if config.model == "dlrm" else "dlrm"
    done = ranker_dir(paths, key, config.model, config.variant) / "lum_step.json"
    try:
        recorded = json.loads(done.read_text())["config"][other]
    except (OSError, ValueError, KeyError, TypeError):
        return config  # no ranker saved yet (or an unreadable stamp, which train_step replaces): as configured
    if not isinstance(recorded, dict):
        return config
    try:
        return RankerConfig.from_json({**config.to_json(), other: recorded})
    except ValueError:  # a section no longer valid today: train as configured
        return config


def model_version(model_dir: Path) -> str | None:
    """The model version a model folder's manifest names (None when there is no finished model)."""
    manifest = model_dir / MODEL_MANIFEST_FILE
    return json.loads(manifest.read_text()).get("model_version") if manifest.exists() else None


def remove_tree(folder: Path) -> None:
    """Remove a step's output folder so that no reader sees it half removed: renamed aside first, then deleted."""
    if not folder.exists():
        return
    aside = folder.with_name(f".{folder.name}.removing")
    if aside.exists():
        shutil.rmtree(aside)
    folder.rename(aside)
    shutil.rmtree(aside)


def refuse_other_job_settings(embed_dir: Path, made: Any, job: Any, conditions: list[str] | None = None, model_version: str | None = None) -> None:
    """An embedding folder made for other query conditions, by another model, or with another engine or job settings
    is not reused as if it were this config's (`conditions`, `model_version`: this config's, None to leave them
    unchecked)."""
    wanted: dict[str, Any] = {"engine": job.engine, "max_history": job.max_history, "window_stride": job.window_stride, "shards": job.shards,
                              "output_dtype": job.output_dtype, "dim": job.dim}
    if conditions is not None:
        wanted["conditions"] = conditions
    if model_version is not None:
        wanted["model_version"] = model_version
    recorded = {"engine": made.engine, "model_version": made.model_version,
                **{k: made.settings.get(k) for k in wanted if k not in ("engine", "model_version")}}
    if wanted["max_history"] is None:  # the tokenizer's, resolved by the job: not comparable here
        wanted.pop("max_history")
    changed = [f"{k}: {recorded[k]!r} there, {v!r} in the config" for k, v in wanted.items() if recorded.get(k) != v]
    if changed:
        raise FileExistsError(f"{embed_dir} was embedded with other settings ({'; '.join(changed)}); remove that folder (and the run's "
                              "feature_repo*/, training_sets/, rankers/, scores/) to embed again, or use another run_dir")


def run_relative(paths: RunPaths, path: Path) -> str:
    """`path` relative to the run folder when it lies inside it (what a step records, so that a copied or moved run
    folder resumes), else as given."""
    resolved = Path(path).resolve()
    root = paths.root.resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)


def refuse_other_embeddings(repo_dir: Path, embed_dir: Path) -> None:
    """A run's feature repo holds one embedding folder per model version: another folder of the same version (say,
    rolling vectors left by an earlier config of this run folder) would mix into the point-in-time join."""
    from feature_store.repo import FeatureRepo, FeatureStoreError

    manifest = read_embedding_manifest(embed_dir)
    entry = FeatureRepo(repo_dir).ingested().get(manifest.model_version, {})
    # the same folder of this run, also where the run folder was copied or moved since (sources are recorded absolute)
    inside = "/" + str(embed_dir.resolve().relative_to(repo_dir.resolve().parent)) if embed_dir.resolve().is_relative_to(repo_dir.resolve().parent) else None
    others = sorted(s for s in {job["source"] for job in entry.get("jobs", {}).values()}
                    if s != str(embed_dir.resolve()) and not (inside and s.endswith(inside)))
    if others:
        raise FeatureStoreError(
            f"{repo_dir} already holds embeddings of {manifest.model_version} from {', '.join(others)}, not from {embed_dir}: a run folder made "
            "with another config (feature mode or protocol order)? Remove the run's feature_repo*/, training_sets/, rankers/ and scores/, "
            "or use another run_dir")


def online_store(paths: RunPaths, echo: Echo) -> str | None:
    """Materialize the online store (the last protocol's selected model version and the counters): a ranking stack's
    lookups answer right after the run."""
    result = materialize_online(paths)
    echo(f"online store ({result['online_store']['kind']}, model version {result['model_version']}) holds everything up to {result['end']}")
    return UP_TO_DATE if all(mode == "up to date" for mode in result["modes"].values()) else None


def first_event_time(paths: RunPaths) -> str:
    return pc.min(pq.read_table(paths.events, columns=["ts"]).column("ts")).as_py().isoformat()


def rebuild_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """The report of a finished run, built again from what its steps wrote (`lum report --run DIR`); into the run's
    report/ folder, or `out_dir`. The config is the one the run recorded in run_state.json."""
    paths = RunPaths(run_dir)
    state_path = paths.root / STATE_FILE
    if not state_path.exists():
        raise FileNotFoundError(f"{paths.root} has no {STATE_FILE}: not a folder `lum run` made")
    state = json.loads(state_path.read_text())
    config = parse_run_config(state["config"], str(state_path))
    scored = [(p, scores_file(paths, config.protocol_key(p))) for p in config.protocols]
    missing = [str(path) for _, path in scored if not path.exists()]
    if missing:
        raise FileNotFoundError(f"{paths.root} has no scored test window ({', '.join(missing)}): finish the run with `lum run` first")
    seed_reports = []
    for k in range(1, config.seeds):
        made = seed_dir(paths.root, k) / "report" / "report.json"
        if not made.exists():
            raise FileNotFoundError(f"{paths.root}: seed {k} of {config.seeds} has no report ({made}): finish the run with `lum run` first")
        seed_reports.append({"seed": k, "run": str(made.parents[1]), "report": json.loads(made.read_text())})
    out = Path(out_dir) if out_dir else None
    if out is not None:  # into another folder: the run is only read
        return report_run(config, paths, scored, RunState(paths, config).durations(), out_dir=out, seed_reports=seed_reports)
    with run_lock(paths.root, "lum report"):
        return report_run(config, paths, scored, RunState(paths, config).durations(), seed_reports=seed_reports)
