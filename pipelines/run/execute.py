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
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pyarrow.compute as pc
import pyarrow.parquet as pq

from contracts.embeddings import MANIFEST_FILE as EMBEDDING_MANIFEST
from contracts.embeddings import read_embedding_manifest
from pipelines.paths import RunPaths
from pipelines.report.for_run import report_run
from pipelines.run.config import ProtocolConfig, RunConfig, parse_run_config
from pipelines.run.state import STATE_FILE, RunState
from pipelines.steps import UP_TO_DATE
from pipelines.steps import data as data_steps
from pipelines.steps.embed import embed_in_subprocess, embedding_rows, query_conditions, snapshot_times
from pipelines.steps.features import ingest_embeddings, materialize_online
from pipelines.steps.lm import evaluate_step as evaluate_lm
from pipelines.steps.lm import pretrain_step
from pipelines.steps.rankers import evaluate_step, score_test_window, scores_file, train_step

Echo = Callable[[str], None]


def execute(config: RunConfig, echo: Echo = print) -> dict[str, Any]:
    """Run every step of `config`; returns the report summary."""
    paths = RunPaths(config.run_dir)
    state = RunState(paths, config)
    started = time.perf_counter()
    data = config.data
    if data.source == "simulator":
        make = lambda: _wrote(data_steps.simulate(paths, data.preset, data.seed, data.n_users), paths, echo)
    elif data.source == "movielens":
        if not Path(str(data.path)).exists():
            raise FileNotFoundError(f"data.path: no MovieLens folder at {data.path!r}")
        make = lambda: _wrote(data_steps.import_movielens(paths, str(data.path), data.like_threshold, data.on_bad), paths, echo)
    elif data.source == "files":
        if not Path(str(data.path)).is_file():
            raise FileNotFoundError(f"data.path: no events file at {data.path!r}")
        make = lambda: _wrote(data_steps.import_files(paths, str(data.path), data.files_config()), paths, echo)
    else:
        make = lambda: _wrote(data_steps.imported(paths), paths, echo)
    state.step("data", make, echo, settings=data)

    scored: list[tuple[ProtocolConfig, Path]] = []
    for protocol in config.protocols:
        scored.append((protocol, run_protocol(config, protocol, paths, state, echo)))
    state.step("online store", lambda: online_store(paths, echo), echo)
    summary = state.step("report", lambda: report_run(config, paths, scored, state.durations()), echo, settings=config.report)
    echo("--- step durations (s): " + ", ".join(f"{k} {v}" for k, v in state.durations().items()))
    echo(f"finished in {time.perf_counter() - started:.1f} s; report: {paths.root / 'report' / 'report.html'}")
    return summary


def _wrote(result: dict[str, Any] | str, paths: RunPaths, echo: Echo) -> dict[str, Any] | str:
    for line, _ in data_steps.result_lines(result, paths):
        echo(line)
    return result


def run_protocol(config: RunConfig, protocol: ProtocolConfig, paths: RunPaths, state: RunState, echo: Echo) -> Path:
    """The steps of one protocol (split ... scored test window); returns the scored test window's path."""
    split, lm = protocol.split, config.lm
    name = protocol.name
    split_config = protocol.split_config()
    state.step(f"{name}: split", lambda: data_steps.split(paths, split_config), echo, settings=split_config)
    model_dir = paths.model_dir(split, lm.pretrain.preset)

    def pretrain() -> Any:
        manifest = pretrain_step(paths, split, lm.pretrain, lm.tokenizer)
        if manifest != UP_TO_DATE:
            echo(f"wrote {model_dir} ({manifest['model_version']}, {manifest['steps']} steps, final loss {manifest['final_loss']:.4f})")
        return manifest

    state.step(f"{name}: pretrain", pretrain, echo, settings=(lm.pretrain, lm.tokenizer))
    if lm.tokenizer.item_tokenization != "id":
        echo(f"--- {name}: evaluate LM skipped: next-item evaluation ranks item tokens, which a {lm.tokenizer.item_tokenization}-ID model does not have")
    elif not paths.evaluation(split, lm.pretrain.preset).exists():
        state.step(f"{name}: evaluate LM", lambda: evaluate_lm(paths, split, lm.pretrain.preset, lm.evaluate), echo, settings=lm.evaluate)

    key = config.protocol_key(protocol)  # where this protocol's features, rankers and scores live (pipelines.paths)
    embed_dir = paths.embeddings(f"{split}-{lm.pretrain.preset}-{protocol.features}")
    conditions = query_conditions(model_dir, tuple(config.embed.conditions), rolling=protocol.features == "rolling", events=paths.events)
    rows = embedding_rows(paths, split, paths.root / "embeddings" / f"{split}-rows.parquet")
    if protocol.features == "rolling":
        as_of, for_rows = "rows:" + str(rows), None
    else:  # the daily job's snapshots, computed where a training or test row joins them (and the last one for everyone)
        as_of, for_rows = snapshot_times(paths, split, protocol.snapshot_every), rows
    job = replace(config.embed.job, engine=protocol.engine) if protocol.engine else config.embed.job
    made = read_embedding_manifest(embed_dir) if (embed_dir / EMBEDDING_MANIFEST).exists() else None
    if made:
        refuse_other_job_settings(embed_dir, made, job, conditions.split(","))
    if not made or not made.complete:
        state.step(f"{name}: embed", lambda: embed_in_subprocess(model_dir, paths.events, as_of, embed_dir, job, conditions, for_rows), echo,
                   settings=(config.embed, conditions, job.engine))

    def features() -> str | None:
        # under the per-user split, rows of some users predate the model's training end by design of the protocol
        valid_from = first_event_time(paths) if split == "per-user" else None
        refuse_other_embeddings(paths.feature_repo_of(key), embed_dir)
        _, result, _ = ingest_embeddings(paths, embed_dir, valid_from, select=True, protocol=key)
        how = "already ingested" if result["skipped"] else f"{result['rows']:,} rows ingested"
        echo(f"features: model version {result['version']} selected ({how})")
        return UP_TO_DATE if result["skipped"] else None

    state.step(f"{name}: features", features, echo, settings=str(embed_dir))
    rankers = config.rankers
    for model in rankers.models:
        for variant in rankers.variants:
            ranker_config = rankers.ranker_config(model, variant)

            def train_and_evaluate(ranker_config=ranker_config, model=model, variant=variant) -> str | None:
                _, trained = train_step(paths, key, ranker_config)
                result = evaluate_step(paths, key, model, variant)["overall"]
                echo(f"{model}/{variant}: {'trained' if trained else 'up to date'}; test AUC {result['auc']:.4f}, GAUC {result['gauc']:.4f}")
                return None if trained else UP_TO_DATE

            state.step(f"{name}: {model} {variant}", train_and_evaluate, echo, settings=ranker_config)
    configured = [(m, v) for m in rankers.models for v in rankers.variants]
    return state.step(f"{name}: score test window", lambda: score_test_window(paths, key, rankers=configured), echo)


def refuse_other_job_settings(embed_dir: Path, made: Any, job: Any, conditions: list[str] | None = None) -> None:
    """An embedding folder made for other query conditions, or with another engine or job settings, is not reused
    as if it were this config's (`conditions`: this config's, None to leave them unchecked)."""
    wanted = {"engine": job.engine, "max_history": job.max_history, "window_stride": job.window_stride, "shards": job.shards,
              "output_dtype": job.output_dtype, "dim": job.dim}
    if conditions is not None:
        wanted["conditions"] = conditions
    recorded = {"engine": made.engine, **{k: made.settings.get(k) for k in wanted if k != "engine"}}
    if wanted["max_history"] is None:  # the tokenizer's, resolved by the job: not comparable here
        wanted.pop("max_history")
    changed = [f"{k}: {recorded[k]!r} there, {v!r} in the config" for k, v in wanted.items() if recorded.get(k) != v]
    if changed:
        raise FileExistsError(f"{embed_dir} was embedded with other settings ({'; '.join(changed)}); remove that folder (and the run's "
                              "feature_repo*/, training_sets/, rankers/, scores/) to embed again, or use another run_dir")


def refuse_other_embeddings(repo_dir: Path, embed_dir: Path) -> None:
    """A run's feature repo holds one embedding folder per model version: another folder of the same version (say,
    rolling vectors left by an earlier config of this run folder) would mix into the point-in-time join."""
    from feature_store.repo import FeatureRepo, FeatureStoreError

    manifest = read_embedding_manifest(embed_dir)
    entry = FeatureRepo(repo_dir).ingested().get(manifest.model_version, {})
    others = sorted({job["source"] for job in entry.get("jobs", {}).values()} - {str(embed_dir.resolve())})
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
    return report_run(config, paths, scored, RunState(paths, config).durations(), out_dir=Path(out_dir) if out_dir else None)
