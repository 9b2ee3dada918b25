"""`lum ranker ...`: train, evaluate and score the rankers of a run folder.

    lum ranker train     --protocol global --model dlrm|lightgbm --variant base|lum|pooled-history|lum+pooled
    lum ranker evaluate  --protocol global [--model ... --variant ...]   (default: every trained ranker)
    lum ranker score     --ranker runs/x/rankers/global-dlrm-lum --requests requests.parquet --source offline|online
    lum ranker export    --ranker runs/x/rankers/global-lightgbm-lum --out exported/   (model file + JSON input spec)

Several processes (DLRM tables sharded over them, gloo on CPU):
    torchrun --nproc_per_node=2 -m ranker.train_dist --train runs/x/training_sets/global-train-....parquet --out DIR
"""

from __future__ import annotations

import json

import click

from contracts.names import VARIANTS
from pipelines.cli.common import _friendly_errors, force_option, run_option
from pipelines.cli.options import build_config, config_options
from pipelines.paths import RunPaths
from pipelines.run.lock import writer_lock
from ranker.config import DLRMConfig, FeatureConfig, LightGBMConfig, RankerConfig

MODEL_CHOICE = click.Choice(["dlrm", "lightgbm"])
VARIANT_CHOICE = click.Choice(list(VARIANTS))
PROTOCOL_OPTION = click.option("--protocol", type=click.Choice(["global", "per-user"]), default="global", help="Which split's windows.")


@click.group()
def ranker() -> None:
    """Rankers on Feast training sets: train, evaluate, score."""


@ranker.command("train")
@PROTOCOL_OPTION
@click.option("--model", type=MODEL_CHOICE, default="dlrm")
@click.option("--variant", type=VARIANT_CHOICE, default="lum")
@config_options(FeatureConfig)
@config_options(DLRMConfig, exclude=("seed", "threads"))
@config_options(LightGBMConfig, prefix="lightgbm-")
@click.option("--seed", type=int, default=DLRMConfig().seed, show_default=True, help="Random seed of the DLRM (LightGBM: --lightgbm-seed).")
@click.option("--threads", type=int, default=None, help="Torch threads of the DLRM (LightGBM: --lightgbm-threads).")
@run_option
@force_option
@_friendly_errors
def ranker_train(protocol: str, model: str, variant: str, seed: int, threads: int | None, run_dir: str, force: bool, **options) -> None:
    """Train a ranker on the protocol's training window (its training set is built through Feast when missing)."""
    from pipelines.steps.rankers import train_step

    config = RankerConfig(
        model=model, variant=variant, features=build_config(FeatureConfig, options),
        dlrm=build_config(DLRMConfig, options, seed=seed, threads=threads), lightgbm=build_config(LightGBMConfig, options, prefix="lightgbm-"),
    )
    with writer_lock(run_dir, "lum ranker train"):  # one writer per run folder (pipelines/run/lock.py)
        out, trained = train_step(RunPaths(run_dir), protocol, config, force=force)
    facts = json.loads((out / "ranker.json").read_text()).get("training", {})
    click.echo(f"{'trained' if trained else 'up to date, skipped:'} {out}" + (f" ({json.dumps(facts)[:300]})" if trained else ""))


@ranker.command("evaluate")
@PROTOCOL_OPTION
@click.option("--model", type=MODEL_CHOICE, default=None, help="Only this model [default: every trained one].")
@click.option("--variant", type=VARIANT_CHOICE, default=None, help="Only this variant [default: every trained one].")
@run_option
@_friendly_errors
def ranker_evaluate(protocol, model, variant, run_dir) -> None:
    """Test-window AUC, GAUC, logloss, NE and calibration of the trained rankers, overall and per condition."""
    from tabulate import tabulate

    from pipelines.steps.rankers import evaluate_step, evaluation_file
    from ranker.metrics import rela_impr

    paths = RunPaths(run_dir)
    trained = sorted(p.name[len(protocol) + 1 :].split("-", 1) for p in (paths.root / "rankers").glob(f"{protocol}-*") if (p / "ranker.json").exists())
    chosen = [(m, v) for m, v in trained if (model in (None, m)) and (variant in (None, v))]
    if not chosen:
        raise click.ClickException(f"no trained ranker matches in {paths.root / 'rankers'}: run `lum ranker train --protocol {protocol}` first")
    rows = []
    with writer_lock(run_dir, "lum ranker evaluate"):
        results = {(m, v): evaluate_step(paths, protocol, m, v)["overall"] for m, v in chosen}
    for (m, v), result in results.items():
        rows.append({"model": m, "variant": v, **{k: round(result[k], 4) for k in ("auc", "gauc", "logloss", "ne", "calibration")},
                     "rows": result["rows"], "gauc_skipped_users": result["gauc_skipped_users"]})
    base = {r["model"]: r["auc"] for r in rows if r["variant"] == "base"}
    for r in rows:
        r["rela_impr"] = round(rela_impr(r["auc"], base[r["model"]]), 4) if r["model"] in base else None
    click.echo(tabulate(rows, headers="keys", tablefmt="github"))
    click.echo(f"per-condition tables: {evaluation_file(paths, protocol, '*', '*').parent}")


@ranker.command("score")
@click.option("--ranker", "ranker_folder", required=True, type=click.Path(exists=True, file_okay=False), help="A saved ranker folder.")
@click.option("--requests", "requests_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Parquet of requests: user_id, item_id, ts and the ranker's request-time context columns.")
@click.option("--source", type=click.Choice(["offline", "online"]), default="offline",
              help="offline: point-in-time features as of each row's ts; online: the online store's newest values.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Output Parquet (the requests plus `score`).")
@run_option
@_friendly_errors
def ranker_score(ranker_folder, requests_path, source, out_path, run_dir) -> None:
    """Batch-score a Parquet of requests with a saved ranker, features read from Feast."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.data.contract import write_parquet_atomic
    from pipelines.steps.rankers import score_requests

    requests = pq.read_table(requests_path).to_pandas()
    scored = score_requests(RunPaths(run_dir), Path(ranker_folder), requests, source=source)
    write_parquet_atomic(pa.Table.from_pandas(scored, preserve_index=False), out_path)
    click.echo(f"scored {len(scored):,} requests with {ranker_folder} ({source} features): {out_path}")


@ranker.command("export")
@click.option("--ranker", "ranker_folder", required=True, type=click.Path(exists=True, file_okay=False), help="A saved ranker folder.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: new, empty, or an earlier export (replaced whole); any other folder is refused.")
@_friendly_errors
def ranker_export(ranker_folder: str, out_dir: str) -> None:
    """Export a ranker for a non-Python stack: LightGBM's text model or the DLRM as a torch.export program, with a JSON
    spec of its inputs (names, order, transforms, missing values, vocabularies, standardisation)."""
    from ranker.export import SPEC_FILE, export_ranker
    from ranker.train import TrainedRanker

    out = export_ranker(TrainedRanker.load(ranker_folder), out_dir)
    spec = json.loads((out / SPEC_FILE).read_text())
    click.echo(f"exported {ranker_folder} to {out}: {spec['file']} and {SPEC_FILE}")
