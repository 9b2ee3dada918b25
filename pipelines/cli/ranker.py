"""`lum ranker ...`: train, evaluate and score the rankers of a run folder.

    lum ranker train     --protocol global --model dlrm|lightgbm --variant base|lum|pooled-history|lum+pooled
    lum ranker evaluate  --protocol global [--model ... --variant ...]   (default: every trained ranker)
    lum ranker score     --ranker runs/x/rankers/global-dlrm-lum --requests requests.parquet --source offline|online

Several processes (DLRM tables sharded over them, gloo on CPU):
    torchrun --nproc_per_node=2 -m ranker.train_dist --train runs/x/training_sets/global-train-....parquet --out DIR
"""

from __future__ import annotations

import json
from dataclasses import replace

import click

from pipelines.cli.common import _friendly_errors, force_option, run_option
from pipelines.paths import RunPaths

MODEL_CHOICE = click.Choice(["dlrm", "lightgbm"])
VARIANT_CHOICE = click.Choice(["base", "lum", "pooled-history", "lum+pooled"])
PROTOCOL_OPTION = click.option("--protocol", type=click.Choice(["global", "per-user"]), default="global", help="Which split's windows.")


@click.group()
def ranker() -> None:
    """Rankers on Feast training sets: train, evaluate, score."""


def ranker_config(
    model: str,
    variant: str,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    embedding_dim: int | None = None,
    embedding_lr: float | None = None,
    patience: int | None = None,
    evals_per_epoch: int | None = None,
    listwise_weight: float | None = None,
    threads: int | None = None,
    lum_inputs: str = "scores",
    lightgbm_ids: bool = False,
    dlrm_ids: bool = True,
    lightgbm_stopping_metric: str = "auc",
    request_features: bool = False,
    seed: int = 0,
):
    """The RankerConfig of one model and variant; a DLRM option left None keeps ranker.dlrm.DLRMConfig's default.
    The keywords are RankersConfig's fields (a run config's `rankers:`), so `**rankers.ranker_options()` fits."""
    from ranker.features import FeatureConfig
    from ranker.train import RankerConfig

    config = RankerConfig(model=model, variant=variant, features=FeatureConfig(lum_inputs=lum_inputs, lightgbm_ids=lightgbm_ids, dlrm_ids=dlrm_ids,
                                                                                  request_features=request_features))
    dlrm = config.dlrm
    overrides = {"epochs": epochs, "batch_size": batch_size, "embedding_dim": embedding_dim, "embedding_lr": embedding_lr, "threads": threads,
                 "patience": patience, "evals_per_epoch": evals_per_epoch, "listwise_weight": listwise_weight}
    dlrm = replace(dlrm, seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    lightgbm = replace(config.lightgbm, seed=seed, threads=threads, early_stopping_metric=lightgbm_stopping_metric)
    return replace(config, dlrm=dlrm, lightgbm=lightgbm)


@ranker.command("train")
@PROTOCOL_OPTION
@click.option("--model", type=MODEL_CHOICE, default="dlrm")
@click.option("--variant", type=VARIANT_CHOICE, default="lum")
@click.option("--epochs", type=int, default=None, help="DLRM: most epochs (early stopping on the latest part of the window).")
@click.option("--batch-size", type=int, default=None, help="DLRM batch size.")
@click.option("--embedding-dim", type=int, default=None, help="DLRM table dimension.")
@click.option("--embedding-lr", type=float, default=None, help="DLRM row-wise Adagrad learning rate.")
@click.option("--patience", type=int, default=None, help="DLRM: validations without a better AUC before stopping [default: 2].")
@click.option("--evals-per-epoch", type=int, default=None, help="DLRM: validations per epoch, the best one kept [default: 1].")
@click.option("--listwise-weight", type=float, default=None,
              help="DLRM: weight of a listwise loss over each request's candidates, added to the log loss [default: 0].")
@click.option("--threads", type=int, default=None, help="Torch / LightGBM threads.")
@click.option("--lum-inputs", type=click.Choice(["scores", "vectors"]), default="scores", show_default=True,
              help="LUM inputs: the similarities and cosines only, or also the user and item vectors themselves.")
@click.option("--lightgbm-ids/--no-lightgbm-ids", default=False, show_default=True,
              help="LightGBM: also use the raw user and item ids as categorical features.")
@click.option("--lightgbm-stopping-metric", type=click.Choice(["auc", "binary_logloss"]), default="auc", show_default=True,
              help="LightGBM: the validation metric whose best iteration is kept.")
@click.option("--dlrm-ids/--no-dlrm-ids", default=True, show_default=True,
              help="DLRM: embed the raw user and item ids (off: they reach it only through counters, context and history).")
@click.option("--request-features/--no-request-features", default=False, show_default=True,
              help="Also each candidate's scores relative to the other candidates of its request (same user and time).")
@click.option("--seed", type=int, default=0)
@run_option
@force_option
@_friendly_errors
def ranker_train(protocol, model, variant, epochs, batch_size, embedding_dim, embedding_lr, patience, evals_per_epoch, listwise_weight, threads,
                 lum_inputs, lightgbm_ids, lightgbm_stopping_metric, dlrm_ids, request_features, seed, run_dir, force) -> None:
    """Train a ranker on the protocol's training window (its training set is built through Feast when missing)."""
    from pipelines.steps.rankers import train_step

    config = ranker_config(
        model, variant, epochs=epochs, batch_size=batch_size, embedding_dim=embedding_dim, embedding_lr=embedding_lr, patience=patience,
        evals_per_epoch=evals_per_epoch, listwise_weight=listwise_weight, threads=threads, lum_inputs=lum_inputs,
        lightgbm_ids=lightgbm_ids, lightgbm_stopping_metric=lightgbm_stopping_metric, dlrm_ids=dlrm_ids,
        request_features=request_features, seed=seed,
    )
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
    for m, v in chosen:
        result = evaluate_step(paths, protocol, m, v)["overall"]
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
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pathlib import Path

    from pipelines.data.contract import write_parquet_atomic
    from pipelines.steps.rankers import score_requests

    requests = pq.read_table(requests_path).to_pandas()
    scored = score_requests(RunPaths(run_dir), Path(ranker_folder), requests, source=source)
    write_parquet_atomic(pa.Table.from_pandas(scored, preserve_index=False), out_path)
    click.echo(f"scored {len(scored):,} requests with {ranker_folder} ({source} features): {out_path}")
