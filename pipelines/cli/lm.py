"""`lum pretrain | evaluate | embed | retrieve`: the behaviour LM, its embeddings and its candidates.

Their options are made from the components' config dataclasses (lum.pretrain.PretrainConfig,
lum.tokenizer.TokenizerConfig, lum.evaluate.EvalConfig, lum.embed_job.EmbedJobConfig), so a default is defined
once and `lum pretrain` builds exactly the objects `lum run` builds from a run config's `lm:` section.
"""

from __future__ import annotations

import json
from typing import Any

import click
from pydantic import TypeAdapter, ValidationError

from lum.config import EmbedJobConfig, EvalConfig, PretrainConfig, RetrieveJobConfig, TokenizerConfig
from pipelines.cli.common import UP_TO_DATE, _friendly_errors, force_option, run_option
from pipelines.cli.options import build_config, config_options
from pipelines.paths import RunPaths
from pipelines.run.lock import writer_lock

PROTOCOL_OPTION = click.option("--protocol", type=click.Choice(["global", "per-user"]), default="global", help="Which split's windows.")
# `--seed` is the pretraining seed; the tokenizer's own seed (semantic codebooks) has its own option
TOKENIZER_NAMES = {"seed": "tokenizer-seed", "condition_columns": "condition", "text_columns": "text-column",
                   "categorical_columns": "categorical-column", "numeric_columns": "numeric-column"}


def pretrain_configs(options: dict[str, Any]) -> tuple[PretrainConfig, TokenizerConfig]:
    """The (PretrainConfig, TokenizerConfig) of `lum pretrain`'s parsed options."""
    return build_config(PretrainConfig, options), build_config(TokenizerConfig, options, rename=TOKENIZER_NAMES)


@click.command("pretrain")
@PROTOCOL_OPTION
@config_options(PretrainConfig)
@config_options(TokenizerConfig, rename=TOKENIZER_NAMES)
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None, help="Continue pretraining this model on the window.")
@run_option
@force_option
@_friendly_errors
def pretrain_command(protocol: str, init_from: str | None, run_dir: str, force: bool, **options: Any) -> None:
    """Pretrain the behaviour LM on a split's pretraining window (resumes from its last checkpoint).

    Several processes: torchrun --nproc_per_node=2 -m pipelines.cli pretrain ...
    """
    from pipelines.steps.lm import pretrain_step

    pretrain_config, tokenizer_config = pretrain_configs(options)
    paths = RunPaths(run_dir)
    out = paths.model_dir(protocol, pretrain_config.preset)
    with writer_lock(run_dir, "lum pretrain"):  # one writer per run folder (pipelines/run/lock.py)
        manifest = pretrain_step(paths, protocol, pretrain_config, tokenizer_config, init_from=init_from, force=force)
    if manifest == UP_TO_DATE:
        click.echo(f"{out} already holds a model trained with these settings: skipped (pass --force to train again)")
    elif manifest:
        click.echo(f"wrote {out} ({manifest['model_version']}, {manifest['steps']} steps, final loss {manifest['final_loss']:.4f})")


@click.command("evaluate")
@PROTOCOL_OPTION
@click.option("--preset", default=PretrainConfig().preset, show_default=True, help="The model size whose run folder model is evaluated.")
@config_options(EvalConfig)
@run_option
@_friendly_errors
def evaluate_command(protocol: str, preset: str, run_dir: str, **options: Any) -> None:
    """Next-item HR@k, NDCG@k and Recall@R of the model's retrieved lists against popularity, recent items and SASRec."""
    from lum.evaluate import format_evaluation
    from pipelines.steps.lm import evaluate_step

    paths = RunPaths(run_dir)
    with writer_lock(run_dir, "lum evaluate"):
        result = evaluate_step(paths, protocol, preset, build_config(EvalConfig, options))
    click.echo(format_evaluation(result))
    click.echo(f"wrote {paths.evaluation(protocol, preset)}")


@click.command("embed")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False), help="A model folder written by `lum pretrain`.")
@click.option("--events", "events_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Events Parquet (the run's data/events.parquet or a split window).")
@click.option("--as-of", "as_of", required=True, help="Snapshot time(s) TS[,TS...], or rows:PATH for one embedding per (user, time) row (rolling).")
@click.option("--for-rows", "for_rows", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Snapshots only: a Parquet of rows (user_id, ts); embed a user at an as-of time only when one of its rows joins that "
                   "snapshot (the newest at or before the row), and at the last as-of time always.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (resumed when it exists).")
@config_options(EmbedJobConfig)
@click.option("--settings-json", default=None, help="The whole EmbedJobConfig as JSON (what `lum run` passes); replaces the options above.")
@click.option("--ray", "ray_actors", type=int, default=None, help="Run the shards on Ray Data with this many engine actors.")
@click.option("--ray-address", default=None, help="Ray cluster address (default: start a local instance).")
@_friendly_errors
def embed_command(model_dir: str, events_path: str, as_of: str, for_rows: str | None, out_dir: str, settings_json: str | None,
                  ray_actors: int | None, ray_address: str | None, **options: Any) -> None:
    """Embed users per query condition with the behaviour LM (LUM's knowledge querying)."""
    from lum.embed_process import leave_without_vllm_teardown, run_job

    if settings_json is not None:
        try:
            config = TypeAdapter(EmbedJobConfig).validate_python(json.loads(settings_json))
        except (ValueError, ValidationError) as exc:
            raise click.UsageError(f"--settings-json is not an EmbedJobConfig: {exc}") from exc
    else:
        config = build_config(EmbedJobConfig, options)
    manifest, conditions = run_job(model_dir, events_path, as_of, out_dir, config, for_rows, ray_actors=ray_actors, ray_address=ray_address)
    totals = manifest["totals"]
    click.echo(
        f"wrote {totals['rows']:,} user embeddings ({totals['users']:,} users, {len(conditions)} conditions) to {out_dir}; "
        f"{totals['queries_without_history']:,} (user, as-of) pairs had no history and were skipped"
    )
    if config.engine == "vllm":
        leave_without_vllm_teardown()


@click.command("retrieve")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False), help="A model folder written by `lum pretrain`.")
@click.option("--events", "events_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Events Parquet: each query sees the user's behaviours strictly before its as-of time.")
@click.option("--as-of", "as_of", required=True, help="Snapshot time(s) TS[,TS...], or rows:PATH for candidates per (user, time) row.")
@click.option("--catalogue", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A Parquet with an item_id column: only these items may be retrieved (default: every item the model can write).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (resumed when it exists).")
@config_options(RetrieveJobConfig)
@_friendly_errors
def retrieve_command(model_dir: str, events_path: str, as_of: str, catalogue: str | None, out_dir: str, **options: Any) -> None:
    """Generate top-N candidate items per (user, condition) with the behaviour LM (constrained beam search)."""
    from lum.embed_job import AsOf
    from lum.embed_process import leave_without_vllm_teardown
    from lum.retrieve_job import RetrievalJob

    config = build_config(RetrieveJobConfig, options)
    job = RetrievalJob(model_dir, events_path, AsOf.parse(as_of), out_dir, config, catalogue=catalogue)
    if job.trie.unreachable:
        click.echo(f"{job.trie.unreachable:,} catalogue items have no token sequence of their own and cannot be retrieved "
                   "(an id model's rare and new items; a semantic-id model reaches every item with content)")
    try:
        manifest = job.run()
    finally:
        job.close()
    totals = manifest["totals"]
    click.echo(
        f"wrote {totals['rows']:,} candidates ({totals['queries']:,} queries of {totals['users']:,} users, top {config.top}, "
        f"from {job.trie.n_items:,} items) to {out_dir}; {totals['queries_without_history']:,} (user, as-of) pairs had no history and were skipped"
    )
    if config.engine == "vllm":
        leave_without_vllm_teardown()
