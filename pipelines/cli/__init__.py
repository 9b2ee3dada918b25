"""The `lum` command line.

    lum [--config run.yaml] data make --preset tiny|default|large
    lum data import movielens PATH
    lum data import files EVENTS [--items ITEMS] [--map user_id=userId ...] [--condition surface ...]
    lum data validate PATH
    lum data split --protocol global|per-user
    lum data describe [RUN_OR_FILE]
    lum pretrain | evaluate | embed                 the behaviour LM and its embeddings
    lum features apply | ingest | materialize | get | serve | training-set    the Feast feature store
    lum ranker train | evaluate | score             DLRM and LightGBM rankers
    lum run --config run.yaml                       every step, data to report, resumable
    lum demo                                        `lum run` on the embedded simulator

A YAML config file gives defaults for any option, nested by command name, e.g.

    data:
      make: {preset: default, seed: 7}
      split: {protocol: per-user, fractions: [0.6, 0.2, 0.2]}

Flags given on the command line win over the file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click
import yaml

from pipelines.data.contract import METADATA_KEY, EventContract, ValidationOptions, read_table, utc_timestamp, validate_events
from pipelines.cli.common import DEFAULT_RUN, UP_TO_DATE, _friendly_errors, force_option, run_option
from pipelines.paths import RunPaths

def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read config {path}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise click.BadParameter(f"config {path} must be a mapping of command names to options")
    ctx.default_map = loaded
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    callback=_load_config,
    is_eager=True,
    expose_value=False,
    help="YAML file with option defaults, nested by command name (see `lum --help`).",
)
def main() -> None:
    """LUM-style user-model features for an existing ranker."""


@main.group()
def data() -> None:
    """Event logs: make, import, validate, split and describe."""




def _check_replace(paths: RunPaths, source: dict[str, Any], force: bool) -> bool:
    """True when the run folder already holds exactly this source's data (skip); error on different data."""
    if not paths.dataset_info.exists() or force:
        return False
    existing = json.loads(paths.dataset_info.read_text())["source"]
    if json.loads(json.dumps(source)) == existing:
        return True
    raise click.ClickException(
        f"{paths.root} already holds data from {existing.get('name')} with other parameters; pass --force to "
        "replace it or choose another --run folder (nothing is overwritten silently)"
    )


def _report_written(info: dict[str, Any], paths: RunPaths) -> None:
    click.echo(f"wrote {info['n_events']:,} events to {paths.events}")
    if info.get("n_items_table") is not None:
        click.echo(f"wrote {info['n_items_table']:,} items to {paths.items}")
    if info["n_rejected"]:
        click.echo(f"set aside {info['n_rejected']:,} rejected rows with their reasons in {paths.quarantine}", err=True)


@data.command("make")
@click.option("--preset", type=click.Choice(["tiny", "default", "large"]), default="default", help="Simulator size.")
@click.option("--seed", type=int, default=0, help="Random seed: the same seed gives the same data.")
@click.option("--users", "n_users", type=int, default=None, help="Override the preset's number of users.")
@run_option
@force_option
@_friendly_errors
def data_make(preset: str, seed: int, n_users: int | None, run_dir: str, force: bool) -> None:
    """Simulate a marketplace event log (the embedded default data) into the run folder."""
    from dataclasses import asdict

    from pipelines.data.sources import simulator

    overrides: dict[str, Any] = {"seed": seed}
    if n_users is not None:
        overrides["n_users"] = n_users
    config = simulator.preset(preset, **overrides)
    paths = RunPaths(run_dir)
    if _check_replace(paths, {"name": "simulator", "config": asdict(config)}, force):
        click.echo(f"{paths.events} is up to date (simulator preset {preset}, seed {seed}): skipped")
        return UP_TO_DATE
    started = time.perf_counter()
    info = simulator.simulate_to_run(config, paths)
    _report_written(info, paths)
    click.echo(f"simulated in {time.perf_counter() - started:.1f} s")


@data.group("import")
def data_import() -> None:
    """Import an event log from MovieLens or from your own files."""


def _validation_options(ts_unit: str, min_ts: str | None, max_ts: str | None, on_bad: str) -> ValidationOptions:
    options = ValidationOptions(ts_unit=ts_unit, on_bad=on_bad)  # type: ignore[arg-type]
    if min_ts:
        options.min_ts = utc_timestamp(min_ts)
    if max_ts:
        options.max_ts = utc_timestamp(max_ts)
    return options


def _validation_flags(fn: Callable) -> Callable:
    for decorator in reversed(
        [
            click.option("--ts-unit", type=click.Choice(["auto", "s", "ms", "us", "ns"]), default="auto", help="Unit of numeric epoch timestamps."),
            click.option("--min-ts", default=None, help="Earliest allowed event time [default: 1990-01-01]."),
            click.option("--max-ts", default=None, help="Latest allowed event time [default: now + 1 day]."),
            click.option(
                "--on-bad",
                type=click.Choice(["fail", "quarantine"]),
                default="fail",
                help="fail: stop at the first bad rows; quarantine: set bad rows aside with their reasons.",
            ),
        ]
    ):
        fn = decorator(fn)
    return fn


def _contract_flags(fn: Callable) -> Callable:
    for decorator in reversed(
        [
            click.option("--condition", "conditions", multiple=True, help="Condition column NAME[:known_at] (repeatable)."),
            click.option("--extra", "extras", multiple=True, help="Extra column NAME[:known_at[:type]] (repeatable)."),
            click.option("--map", "mappings", multiple=True, help="Column mapping contract_name=source_name (repeatable)."),
            click.option("--ignore", "ignored", multiple=True, help="Source column to leave out on purpose (repeatable)."),
        ]
    ):
        fn = decorator(fn)
    return fn


def _parse_mappings(mappings: tuple[str, ...]) -> dict[str, str]:
    """`contract=source` pairs -> {source: contract}."""
    out: dict[str, str] = {}
    for text in mappings:
        if "=" not in text:
            raise click.BadParameter(f"'{text}': expected contract_name=source_name", param_hint="--map")
        contract_name, source_name = text.split("=", 1)
        out[source_name] = contract_name
    return out


@data_import.command("movielens")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--like-threshold", type=float, default=4.0, help="label = 1 when rating >= this.")
@click.option("--on-bad", type=click.Choice(["fail", "quarantine"]), default="fail", help="What to do with bad rows.")
@run_option
@force_option
@_friendly_errors
def data_import_movielens(path: str, like_threshold: float, on_bad: str, run_dir: str, force: bool) -> None:
    """Import a MovieLens folder (100K, 1M, or latest/25M layout, detected)."""
    from pipelines.data.sources.base import write_source_output
    from pipelines.data.sources.movielens import load_movielens

    paths = RunPaths(run_dir)
    output = load_movielens(path, like_threshold=like_threshold, on_bad=on_bad)
    if _check_replace(paths, output.source, force):
        click.echo(f"{paths.events} is up to date ({path}): skipped")
        return UP_TO_DATE
    _report_written(write_source_output(output, paths), paths)


@data_import.command("files")
@click.argument("events", type=click.Path(exists=True, dir_okay=False))
@click.option("--items", type=click.Path(exists=True, dir_okay=False), default=None, help="Items table (item_id + content).")
@_contract_flags
@_validation_flags
@run_option
@force_option
@_friendly_errors
def data_import_files(events, items, conditions, extras, mappings, ignored, ts_unit, min_ts, max_ts, on_bad, run_dir, force) -> None:
    """Import your own event log (Parquet or CSV following the contract)."""
    from pipelines.data.sources.base import write_source_output
    from pipelines.data.sources.files import load_files

    paths = RunPaths(run_dir)
    output = load_files(
        events,
        EventContract.from_specs(conditions, extras),
        items_path=items,
        column_map=_parse_mappings(mappings),
        ignore=tuple(ignored),
        options=_validation_options(ts_unit, min_ts, max_ts, on_bad),
    )
    if _check_replace(paths, output.source, force) and not len(output.rejected):
        click.echo(f"{paths.events} is up to date ({events}): skipped")
        return UP_TO_DATE
    _report_written(write_source_output(output, paths), paths)


@data.command("validate")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@_contract_flags
@_validation_flags
@_friendly_errors
def data_validate(path, conditions, extras, mappings, ignored, ts_unit, min_ts, max_ts, on_bad) -> None:
    """Check an event file against the contract; exit non-zero naming the first problem.

    A Parquet file written by `lum` carries its contract; for other files declare the condition and extra
    columns with --condition / --extra.
    """
    table = read_table(path, _parse_mappings(mappings)).drop_columns(list(ignored))
    meta = table.schema.metadata or {}
    if not conditions and not extras and METADATA_KEY in meta:
        contract = EventContract.from_json(meta[METADATA_KEY])
    else:
        contract = EventContract.from_specs(conditions, extras)
    result = validate_events(table, contract, source=str(path), options=_validation_options(ts_unit, min_ts, max_ts, on_bad))
    click.echo(f"{path}: {result.events.num_rows:,} valid events")
    for note in result.coercions:
        click.echo(f"  coerced {note}")
    if result.n_rejected:
        click.echo(f"{path}: {result.n_rejected:,} rows would be set aside:", err=True)
        for reason, count in result.rejected["reason"].value_counts().items():
            click.echo(f"  {count:,} x {reason}", err=True)
        sys.exit(1)


@data.command("split")
@click.option("--protocol", type=click.Choice(["global", "per-user"]), default="global", help="How to split.")
@click.option("--fractions", type=float, nargs=3, default=(0.6, 0.2, 0.2), help="pretrain, train, test shares.")
@click.option("--at", type=str, nargs=2, default=None, help="global: explicit train start and test start times.")
@click.option("--last-k", type=int, nargs=2, default=None, help="per-user: last k events for train and for test.")
@run_option
@force_option
@_friendly_errors
def data_split(protocol: str, fractions: tuple, at: tuple | None, last_k: tuple | None, run_dir: str, force: bool) -> None:
    """Split the run's events into pretraining, ranker-training and test windows."""
    from dataclasses import asdict

    from pipelines.data.sources.base import read_dataset_info
    from pipelines.data.split import SplitConfig, dataset_fingerprint, format_summary, split_run

    paths = RunPaths(run_dir)
    read_dataset_info(paths)  # a clear error when there is no data yet
    config = SplitConfig(protocol=protocol, fractions=tuple(fractions), at=tuple(at) if at else None, last_k=tuple(last_k) if last_k else None)  # type: ignore[arg-type]
    fingerprint = dataset_fingerprint(paths)
    summary_file = paths.split_summary(protocol)
    if summary_file.exists() and not force:
        existing = json.loads(summary_file.read_text())
        if existing.get("dataset_fingerprint") == fingerprint:
            if existing["config"] == json.loads(json.dumps(asdict(config))):
                click.echo(f"{paths.split_dir(protocol)} is up to date: skipped")
                click.echo(format_summary(existing))
                return UP_TO_DATE
            raise click.ClickException(
                f"{paths.split_dir(protocol)} already holds a {protocol} split with other settings "
                f"({existing['config']}); pass --force to replace it"
            )
        click.echo(f"{paths.split_dir(protocol)} was made from older data: rebuilding it")
    summary = split_run(paths, config)
    click.echo(f"wrote {paths.split_dir(protocol)}")
    click.echo(format_summary(summary))


@data.command("describe")
@click.argument("path", type=click.Path(exists=True), default=None, required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@_friendly_errors
def data_describe(path: str | None, as_json: bool) -> None:
    """Describe a run folder (default: runs/main) or a validated events file."""
    from pipelines.data.describe import describe_path

    info, text = describe_path(path or DEFAULT_RUN)
    click.echo(json.dumps(info, indent=2, default=str) if as_json else text)


@main.command("pretrain")
@click.option("--protocol", type=click.Choice(["global", "per-user"]), default="global", help="Which split's pretraining window.")
@click.option("--preset", type=click.Choice(["tiny", "small", "base", "1b", "7b"]), default="small", help="Model size.")
@click.option("--epochs", type=int, default=1)
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps.")
@click.option("--row-tokens", type=int, default=1024, help="Tokens per (packed) training row.")
@click.option("--rows-per-batch", type=int, default=16, help="Rows per optimizer step (split across processes).")
@click.option("--packing/--no-packing", default=True, help="Pack several users per row (attention isolated per user).")
@click.option("--lr", type=float, default=3e-3)
@click.option("--bf16", is_flag=True, help="bf16 autocast.")
@click.option("--seed", type=int, default=0)
@click.option("--checkpoint-every", type=int, default=100, help="Steps between checkpoints (resume point).")
@click.option("--item-tokenization", type=click.Choice(["id", "semantic"]), default="id")
@click.option("--condition", "conditions", multiple=True, help="Condition columns [default: all of the contract's].")
@click.option("--history-events", type=click.Choice(["auto", "positive", "all"]), default="auto", help="Which events are behaviours (auto: all for MovieLens, clicks otherwise).")
@click.option("--max-history", type=int, default=200, help="Behaviours per training segment / query.")
@click.option("--min-item-count", type=int, default=2, help="Items seen fewer times share their category's token.")
@click.option("--min-condition-count", type=int, default=5, help="Rarer condition combinations back off to coarser ones.")
@click.option("--text-column", "text_columns", multiple=True, help="semantic: item text columns.")
@click.option("--categorical-column", "categorical_columns", multiple=True, help="semantic: item categorical columns.")
@click.option("--numeric-column", "numeric_columns", multiple=True, help="semantic: item numeric columns.")
@click.option("--vector-column", default=None, help="semantic: an item column holding a content vector.")
@click.option("--semantic-codebook-size", type=int, default=256, show_default=True, help="semantic: codes per level.")
@click.option("--semantic-levels", type=click.IntRange(1, 8), default=3, show_default=True, help="semantic: code levels per item (each is a token).")
@click.option("--share-category", is_flag=True, help="id: a category component shared by the item tokens of each category.")
@click.option("--content-column", default=None, help="id: add a learned map of this items-table vector column to every item token.")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None, help="Continue pretraining this model on the window.")
@run_option
@force_option
@_friendly_errors
def pretrain_command(protocol, preset, epochs, max_steps, row_tokens, rows_per_batch, packing, lr, bf16, seed, checkpoint_every,
                     item_tokenization, conditions, history_events, max_history, min_item_count, min_condition_count,
                     text_columns, categorical_columns, numeric_columns, vector_column, semantic_codebook_size, semantic_levels,
                     share_category,
                     content_column, init_from, run_dir, force) -> None:
    """Pretrain the behaviour LM on a split's pretraining window (resumes from its last checkpoint).

    Several processes: torchrun --nproc_per_node=2 -m pipelines.cli pretrain ...
    """
    from lum.pretrain import PretrainConfig
    from pipelines.steps.lm import run_pretrain

    config = PretrainConfig(
        preset=preset, epochs=epochs, max_steps=max_steps, row_tokens=row_tokens, rows_per_batch=rows_per_batch,
        packing=packing, lr=lr, bf16=bf16, seed=seed, checkpoint_every=checkpoint_every,
        share_category=share_category, content_column=content_column,
    )
    tokenizer_options = {
        "condition_columns": tuple(conditions), "item_tokenization": item_tokenization, "history_events": history_events,
        "max_history": max_history, "min_item_count": min_item_count, "min_condition_count": min_condition_count,
        "text_columns": tuple(text_columns), "categorical_columns": tuple(categorical_columns),
        "numeric_columns": tuple(numeric_columns), "vector_column": vector_column,
        "semantic_codebook_size": semantic_codebook_size, "semantic_levels": semantic_levels, "seed": seed,
    }
    paths = RunPaths(run_dir)
    out = paths.model_dir(protocol, preset)
    if out.exists() and not force:
        click.echo(f"{out} already holds a trained model: skipped (pass --force to train again)")
        return UP_TO_DATE
    manifest = run_pretrain(paths, protocol, config, tokenizer_options, init_from=init_from, force=force)
    if manifest:
        click.echo(f"wrote {out} ({manifest['model_version']}, {manifest['steps']} steps, final loss {manifest['final_loss']:.4f})")


@main.command("evaluate")
@click.option("--protocol", type=click.Choice(["global", "per-user"]), default="global")
@click.option("--preset", type=click.Choice(["tiny", "small", "base", "1b", "7b"]), default="small")
@click.option("--k", type=int, default=10, help="Cut-off of HR@k and NDCG@k.")
@click.option("--max-users", type=int, default=2000, help="A seeded sample of test users (0: all).")
@click.option("--seed", type=int, default=0)
@run_option
@_friendly_errors
def evaluate_command(protocol, preset, k, max_users, seed, run_dir) -> None:
    """Next-item HR@k / NDCG@k on the test window against popularity and recent-items baselines."""
    from lum.evaluate import EvalConfig, format_evaluation
    from pipelines.steps.lm import run_evaluate

    paths = RunPaths(run_dir)
    result = run_evaluate(paths, protocol, preset, EvalConfig(k=k, max_users=max_users or None, seed=seed))
    click.echo(format_evaluation(result))
    click.echo(f"wrote {paths.evaluation(protocol, preset)}")


@main.command("embed")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False), help="A model folder written by `lum pretrain`.")
@click.option("--events", "events_path", required=True, type=click.Path(exists=True, dir_okay=False), help="Events Parquet (the run's data/events.parquet or a split window).")
@click.option("--as-of", "as_of", required=True, help="Snapshot time(s) TS[,TS...], or rows:PATH for one embedding per (user, time) row (rolling).")
@click.option("--conditions", default="all", help="`all` or comma-separated condition names, e.g. surface=home|device=mobile|daypart=evening.")
@click.option("--engine", type=click.Choice(["vllm", "torch"]), default="vllm")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (resumed when it exists).")
@click.option("--dim", type=int, default=None, help="Reduce to this many dimensions (PCA fitted on a sample).")
@click.option("--dtype", "output_dtype", type=click.Choice(["float32", "float16"]), default="float32", help="Precision of the stored vectors.")
@click.option("--shards", type=int, default=8, help="Output shards by user hash (the unit of resume).")
@click.option("--max-history", type=int, default=None, help="Behaviours per prompt [default: the model's].")
@click.option("--window-stride", type=int, default=16, help="Rolling: the history window moves in steps of this many behaviours.")
@click.option("--vllm-dtype", default="auto", show_default=True,
              help="vLLM compute dtype: auto = bfloat16 on GPU or a CPU with native bf16 (AVX512-BF16/AMX), else float32.")
@click.option("--block-size", type=int, default=32, help="vLLM KV block size (prefix caching shares whole blocks).")
@click.option("--kv-cache-gib", type=int, default=1, help="vLLM CPU KV-cache space in GiB (reserved up front).")
@click.option("--max-batched-tokens", type=int, default=8192, help="vLLM max tokens per scheduler step.")
@click.option("--no-prefix-caching", is_flag=True, help="Turn vLLM's prefix caching off (for comparison).")
@click.option("--threads-bind", default="0-1", help="vLLM CPU thread binding ('' keeps vLLM's default).")
@click.option("--tensor-parallel", type=int, default=1, help="vLLM tensor parallelism (GPUs).")
@click.option("--ray", "ray_actors", type=int, default=None, help="Run the shards on Ray Data with this many engine actors.")
@click.option("--ray-address", default=None, help="Ray cluster address (default: start a local instance).")
@_friendly_errors
def embed_command(model_dir, events_path, as_of, conditions, engine, out_dir, dim, output_dtype, shards, max_history, window_stride,
                  vllm_dtype, block_size, kv_cache_gib, max_batched_tokens, no_prefix_caching, threads_bind, tensor_parallel,
                  ray_actors, ray_address) -> None:
    """Embed users per query condition with the behaviour LM (LUM's knowledge querying)."""
    import os

    from lum.embed import VllmSettings
    from lum.embed_job import AsOf, EmbeddingJob, EmbedJobConfig

    settings = VllmSettings(
        dtype=vllm_dtype, block_size=block_size, kv_cache_gib=kv_cache_gib, max_num_batched_tokens=max_batched_tokens,
        enable_prefix_caching=not no_prefix_caching, cpu_threads_bind=threads_bind or None, tensor_parallel_size=tensor_parallel,
    )
    config = EmbedJobConfig(
        conditions=conditions, engine=engine, max_history=max_history, window_stride=window_stride, shards=shards,
        output_dtype=output_dtype, dim=dim, vllm=settings,
    )
    job = EmbeddingJob(model_dir, events_path, AsOf.parse(as_of), out_dir, config)
    try:
        manifest = job.run(ray_actors=ray_actors, ray_address=ray_address)
    finally:
        job.close()
    totals = manifest["totals"]
    click.echo(
        f"wrote {totals['rows']:,} user embeddings ({totals['users']:,} users, {len(job.conditions)} conditions) to {out_dir}; "
        f"{totals['queries_without_history']:,} (user, as-of) pairs had no history and were skipped"
    )
    if engine == "vllm":
        # vLLM's worker processes occasionally crash at interpreter exit after all results are written
        # (measured: about 1 run in 20, exit 134); the job is finished and recorded, so leave without teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


from pipelines.cli.features import features  # noqa: E402  (command groups kept in their own modules)
from pipelines.cli.ranker import ranker  # noqa: E402
from pipelines.cli.run import demo, run_command  # noqa: E402

main.add_command(features)
main.add_command(ranker)
main.add_command(run_command)
main.add_command(demo)

if __name__ == "__main__":
    main()
