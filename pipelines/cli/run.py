"""`lum run --config run.yaml` and `lum demo`: the whole job end to end, resumable (see pipelines/run/config.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from pipelines.cli.common import UP_TO_DATE, _friendly_errors
from pipelines.paths import RunPaths
from pipelines.report.for_run import report_run
from pipelines.run.config import (
    check_model_matches,
    ProtocolConfig,
    RunConfig,
    RunState,
    config_dict,
    embed_in_subprocess,
    embedding_rows,
    load_run_config,
    query_conditions,
    snapshot_times,
)

# The simulator demo: the production view (a global split by time) with rolling LUM features.
DEMO_TARGETS = {"gauc_lift_min": 0.01, "ctr_lift_min": 0.03}


def execute(ctx: click.Context, config: RunConfig, echo=click.echo) -> dict[str, Any]:
    """Run every step of `config`; returns the report summary."""
    from pipelines import cli as base  # imported here: pipelines.cli registers this module's commands

    paths = RunPaths(config.run_dir)
    state = RunState(paths, config)
    started = time.perf_counter()
    data = config.data
    if data.source == "simulator":
        state.step("data", lambda: ctx.invoke(base.data_make, preset=data.preset, seed=data.seed, n_users=data.n_users,
                                              run_dir=config.run_dir, force=False), echo)
    elif data.source == "movielens":
        if not data.path or not Path(data.path).exists():
            raise click.ClickException(f"data.path must name a MovieLens folder (got {data.path!r})")
        state.step("data", lambda: ctx.invoke(base.data_import_movielens, path=data.path, like_threshold=data.like_threshold,
                                              on_bad="fail", run_dir=config.run_dir, force=False), echo)
    else:
        raise click.ClickException(f"data.source must be simulator or movielens, got {data.source!r} (import other files with `lum data import files` first)")

    scored: list[tuple[ProtocolConfig, Path]] = []
    for protocol in config.protocols:
        scored.append((protocol, run_protocol(ctx, config, protocol, paths, state, echo)))
    summary = state.step("report", lambda: report_run(config, paths, scored, state.durations()), echo)
    echo("--- step durations (s): " + ", ".join(f"{k} {v}" for k, v in state.durations().items()))
    echo(f"finished in {time.perf_counter() - started:.1f} s; report: {paths.root / 'report' / 'report.html'}")
    return summary


def run_protocol(ctx: click.Context, config: RunConfig, protocol: ProtocolConfig, paths: RunPaths, state: RunState, echo) -> Path:
    from pipelines import cli as base
    from pipelines.steps.features import ingest_embeddings
    from pipelines.steps.rankers import evaluate_step, score_test_window, train_step
    from pipelines.cli.ranker import ranker_config

    split, lm = protocol.split, config.lm
    name = protocol.name
    state.step(f"{name}: split", lambda: ctx.invoke(base.data_split, protocol=split, fractions=tuple(protocol.fractions), at=None,
                                                    last_k=None, run_dir=config.run_dir, force=False), echo)
    model_dir = paths.model_dir(split, lm.preset)

    def pretrain() -> Any:
        if (model_dir / "lum_manifest.json").exists():
            check_model_matches(model_dir, lm)  # the step is skipped when the model exists: it must be the one asked for
        return ctx.invoke(
            base.pretrain_command, protocol=split, preset=lm.preset, epochs=lm.epochs, max_steps=None, row_tokens=lm.row_tokens,
            rows_per_batch=lm.rows_per_batch, packing=True, lr=lm.lr, bf16=False, seed=lm.seed, checkpoint_every=100,
            item_tokenization=lm.item_tokenization, conditions=(), history_events=lm.history_events, max_history=lm.max_history,
            min_item_count=lm.min_item_count, min_condition_count=lm.min_condition_count, text_columns=lm.text_columns,
            categorical_columns=lm.categorical_columns, numeric_columns=lm.numeric_columns, vector_column=lm.vector_column,
            semantic_codebook_size=lm.semantic_codebook_size, semantic_levels=lm.semantic_levels, share_category=lm.share_category,
            content_column=lm.content_column,
            init_from=None, run_dir=config.run_dir, force=False)

    state.step(f"{name}: pretrain", pretrain, echo)
    if lm.item_tokenization != "id":
        echo(f"--- {name}: evaluate LM skipped: next-item evaluation ranks item tokens, which a {lm.item_tokenization}-ID model does not have")
    elif not paths.evaluation(split, lm.preset).exists():
        state.step(f"{name}: evaluate LM", lambda: ctx.invoke(base.evaluate_command, protocol=split, preset=lm.preset, k=10,
                                                              max_users=2000, seed=0, run_dir=config.run_dir), echo)

    embed_dir = paths.embeddings(f"{split}-{lm.preset}-{protocol.features}")
    conditions = query_conditions(model_dir, tuple(config.embed.conditions), rolling=protocol.features == "rolling", events=paths.events)
    if protocol.features == "rolling":
        as_of = "rows:" + str(embedding_rows(paths, split, paths.root / "embeddings" / f"{split}-rows.parquet"))
    else:
        as_of = snapshot_times(paths, split, protocol.snapshot_every)
    made = json.loads((embed_dir / "manifest.json").read_text()) if (embed_dir / "manifest.json").exists() else None
    if made and made["settings"]["conditions"] != conditions.split(","):
        raise click.ClickException(f"{embed_dir} holds embeddings for the conditions {made['settings']['conditions']}, not {conditions.split(',')}; "
                                   "remove that folder (and the run's feature_repo/, training_sets/, rankers/) to embed again")
    if not made or not made.get("complete"):
        state.step(f"{name}: embed", lambda: embed_in_subprocess(model_dir, paths.events, as_of, embed_dir, config.embed.engine, conditions), echo)

    def features() -> str | None:
        # under the per-user split, rows of some users predate the model's training end by design of the protocol
        valid_from = first_event_time(paths) if split == "per-user" else None
        _, result, _ = ingest_embeddings(paths, embed_dir, valid_from, select=True)
        how = "already ingested" if result["skipped"] else f"{result['rows']:,} rows ingested"
        echo(f"features: model version {result['version']} selected ({how})")
        return UP_TO_DATE if result["skipped"] else None

    state.step(f"{name}: features", features, echo)
    rk = config.rankers
    for model in rk.models:
        for variant in rk.variants:
            cfg = ranker_config(model, variant, **rk.ranker_options())

            def train_and_evaluate(cfg=cfg, model=model, variant=variant) -> str | None:
                out, trained = train_step(paths, split, cfg)
                result = evaluate_step(paths, split, model, variant)["overall"]
                echo(f"{model}/{variant}: {'trained' if trained else 'up to date'}; test AUC {result['auc']:.4f}, GAUC {result['gauc']:.4f}")
                return None if trained else UP_TO_DATE

            state.step(f"{name}: {model} {variant}", train_and_evaluate, echo)
    return state.step(f"{name}: score test window", lambda: score_test_window(paths, split), echo)


def first_event_time(paths: RunPaths) -> str:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return pc.min(pq.read_table(paths.events, columns=["ts"]).column("ts")).as_py().isoformat()


@click.command("run")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None, help="Run config (YAML); see `pipelines/run/config.py`.")
@click.option("--run", "run_dir", default=None, help="Override run_dir.")
@click.pass_context
@_friendly_errors
def run_command(ctx: click.Context, config_path: str | None, run_dir: str | None) -> None:
    """Run every step (data ... report) from a config; finished steps are skipped, so it resumes after a failure."""
    execute(ctx, load_run_config(config_path, {"run_dir": run_dir}))


@click.command("demo")
@click.option("--run", "run_dir", default="runs/demo", type=click.Path(file_okay=False), help="Run folder.")
@click.option("--preset", type=click.Choice(["tiny", "default", "large"]), default="default", help="Simulator size.")
@click.option("--lm-preset", type=click.Choice(["tiny", "small", "base"]), default="tiny", help="Behaviour-LM size.")
@click.option("--epochs", type=int, default=10, help="Pretraining epochs.")
# Rolling rows end anywhere inside vLLM's 32-token prefix-cache blocks and each is its own vLLM request: on this
# 2-core CPU the torch group-query engine embeds them 36x faster (benchmarks/bench_rolling.py), so the demo uses it.
@click.option("--engine", type=click.Choice(["vllm", "torch"]), default="torch", help="Embedding engine (rolling rows: torch is faster on CPU).")
@click.pass_context
@_friendly_errors
def demo(ctx: click.Context, run_dir: str, preset: str, lm_preset: str, epochs: int, engine: str) -> None:
    """`lum run` on the embedded simulator: global split by time, rolling LUM features, every ranker, the report."""
    execute(ctx, demo_config(run_dir, preset, lm_preset, epochs, engine))


# Semantic item ids from the simulator's item content (its content vector and category), 64 codes a level: on 3,000
# sampled test users the LightGBM +LUM GAUC lift went from +0.0055 (id tokens) to +0.0137, because items with
# similar content share codes and the LM learns what follows what per code instead of per rarely clicked item.
DEMO_ITEM_TOKENS = {"item_tokenization": "semantic", "vector_column": "content", "categorical_columns": ["category"], "semantic_codebook_size": 64,
                    "semantic_levels": 2}


def demo_config(run_dir: str = "runs/demo", preset: str = "default", lm_preset: str = "tiny", epochs: int = 10, engine: str = "torch") -> RunConfig:
    """What `lum demo` runs (configs/demo.yaml writes the same down; a test keeps the two equal)."""
    return load_run_config(None, {
        "run_dir": run_dir, "data": {"source": "simulator", "preset": preset},
        "protocols": [{"split": "global", "features": "rolling"}],
        "lm": {"preset": lm_preset, "epochs": epochs, **DEMO_ITEM_TOKENS}, "embed": {"engine": engine},
        "rankers": {"request_features": True, "patience": 0, "dlrm_ids": False},
        "targets": DEMO_TARGETS,
    })
