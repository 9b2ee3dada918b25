"""Training, saving, loading and scoring a ranker: `train_ranker(table, config) -> TrainedRanker`.

    ranker = train_ranker(training_set, RankerConfig(model="dlrm", variant="lum"))
    ranker.save("runs/x/ranker")
    scores = TrainedRanker.load("runs/x/ranker").score(requests)   # [N] click probabilities, input order

Honest validation: the last `valid_fraction` of the training window IN TIME (rows at or after the cut time)
decides early stopping and which epoch / iteration is kept. Random rows would share users and moments with the
fitting rows and reward memorising user ids, which does not carry over to later traffic. Vocabularies and
normalisers are fitted on the fitting rows only, so validation sees unseen ids the way the test window will.

A saved ranker folder:
    ranker.json      format, model kind, variant, RankerConfig, FeatureSchema, training facts (split, log)
    features.json    vocabularies and dense normalisation (FeaturePipeline)
    dlrm.pt          the DLRM's state dict, unsharded (scoring needs neither DMP nor a process group)
    lightgbm.txt     or LightGBM's model text
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ranker.config import RankerConfig  # noqa: F401  (re-exported)
from ranker.dlrm import predict, scoring_model, train_dlrm
from ranker.features import DLRMInputs, FeaturePipeline
from ranker.gbdt import predict_lightgbm, train_lightgbm
from ranker.schema import FeatureSchema, RankerInputError, as_arrow, check_table, validate_training_table

FORMAT = 1
RANKER_FILE = "ranker.json"
FEATURES_FILE = "features.json"
DLRM_FILE = "dlrm.pt"
LIGHTGBM_FILE = "lightgbm.txt"


# ---------------------------------------------------------------------------------------------------- the split


@dataclass(frozen=True)
class TimeSplit:
    fit: np.ndarray  # row indices used to fit, input order
    valid: np.ndarray  # row indices of the latest part of the window, input order
    cut: pd.Timestamp | None  # valid = rows with time >= cut


def time_split(table: pa.Table | pd.DataFrame, valid_fraction: float = 0.1, time_column: str = "ts") -> TimeSplit:
    """The last `valid_fraction` of rows by time becomes validation. Rows sharing the cut's timestamp all go to
    validation, so no moment is on both sides."""
    table = as_arrow(table, [time_column])
    n = table.num_rows
    if valid_fraction <= 0:
        return TimeSplit(np.arange(n), np.zeros(0, dtype=np.int64), None)
    times = pc.cast(table.column(time_column), pa.int64()).to_numpy(zero_copy_only=False)
    order = np.argsort(times, kind="stable")
    cut = times[order[min(n - 1, int(np.floor(n * (1 - valid_fraction))))]]
    valid = times >= cut
    if valid.all():
        raise RankerInputError(
            f"cannot hold out the last {valid_fraction:.0%} of the training window by time: every row has the same "
            f"'{time_column}'; use a longer window"
        )
    cut_ts = pd.Timestamp(int(cut), unit="us", tz="UTC") if pa.types.is_timestamp(table.schema.field(time_column).type) else pd.Timestamp(int(cut))
    return TimeSplit(np.flatnonzero(~valid), np.flatnonzero(valid), cut_ts)


# ---------------------------------------------------------------------------------------------------- the ranker


@dataclass
class TrainedRanker:
    config: RankerConfig
    schema: FeatureSchema
    pipeline: FeaturePipeline
    model: Any  # DLRM (eval mode, unsharded) or lightgbm.Booster
    training: dict[str, Any]

    @property
    def variant(self) -> str:
        return self.config.variant

    def featurize(self, table: pa.Table | pd.DataFrame) -> DLRMInputs | np.ndarray:
        """Model inputs for a table (checked against the saved schema): DLRMInputs or LightGBM's matrix."""
        columns = self.schema.feature_columns(self.variant)
        if self.config.features.request_features:  # the request time tells which rows are one request's candidates
            columns = [*columns, self.schema.time]
        table = as_arrow(table, columns)
        check_table(table, self.schema, self.variant)
        if self.config.model == "dlrm":
            return self.pipeline.dlrm_inputs(table, with_labels=False)
        return self.pipeline.lightgbm_inputs(table)[0]

    def score(self, data: pa.Table | pd.DataFrame | DLRMInputs | np.ndarray, threads: int | None = None) -> np.ndarray:
        """[N] click probabilities in input order, from a table or from `featurize`'s output. `threads`: LightGBM's
        prediction threads (default: all cores); a DLRM uses torch's process-wide setting."""
        inputs = data if isinstance(data, (DLRMInputs, np.ndarray)) else self.featurize(data)
        if self.config.model == "dlrm":
            return predict(self.model, inputs, self.config.dlrm.eval_batch_size)
        return predict_lightgbm(self.model, inputs, threads)

    def save(self, out_dir: str | Path) -> Path:
        """Writes the folder atomically (assembled beside it, then renamed)."""
        out_dir = Path(out_dir)
        staging = out_dir.with_name(out_dir.name + ".partial")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        facts = {
            "format": FORMAT,
            "model": self.config.model,
            "variant": self.variant,
            "config": self.config.to_json(),
            "schema": self.schema.to_json(),
            "training": self.training,
        }
        (staging / RANKER_FILE).write_text(json.dumps(facts, indent=2, default=str))
        (staging / FEATURES_FILE).write_text(json.dumps(self.pipeline.to_json()))
        if self.config.model == "dlrm":
            torch.save(self.model.state_dict(), staging / DLRM_FILE)
        else:
            self.model.save_model(str(staging / LIGHTGBM_FILE), num_iteration=self.model.best_iteration or None)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.replace(out_dir)
        return out_dir

    @classmethod
    def load(cls, folder: str | Path) -> TrainedRanker:
        folder = Path(folder)
        if not (folder / RANKER_FILE).exists():
            raise RankerInputError(f"{folder} is not a saved ranker (no {RANKER_FILE}); train one first")
        facts = json.loads((folder / RANKER_FILE).read_text())
        if facts.get("format") != FORMAT:
            raise RankerInputError(f"{folder} was saved in format {facts.get('format')}, this code reads format {FORMAT}")
        config = RankerConfig.from_json(facts["config"])
        schema = FeatureSchema.from_json(facts["schema"])
        pipeline = FeaturePipeline.from_json(json.loads((folder / FEATURES_FILE).read_text()), schema)
        if config.model == "dlrm":
            state = torch.load(folder / DLRM_FILE, weights_only=True)
            model = scoring_model(pipeline.embedding_tables(config.dlrm.embedding_dim), len(pipeline.dense_names), config.dlrm, state,
                                  pipeline.config.history_len)
        else:
            import lightgbm as lgb

            model = lgb.Booster(model_file=str(folder / LIGHTGBM_FILE))
        return cls(config, schema, pipeline, model, facts["training"])


# ---------------------------------------------------------------------------------------------------- training


def train_ranker(train_table: pa.Table | pd.DataFrame, config: RankerConfig = RankerConfig(), progress: bool = False) -> TrainedRanker:
    """Trains one ranker on a training-set table (see schema.py for the contract).

    Under `torchrun` (RANK / WORLD_SIZE set) a DLRM trains with its tables sharded over the processes; every
    rank returns the same TrainedRanker (the caller saves on rank 0).
    """
    started = time.perf_counter()
    table = as_arrow(train_table)
    schema = FeatureSchema.from_table(table)
    validate_training_table(table, schema, config.variant)
    split = time_split(table, config.valid_fraction, schema.time)
    fit_table, valid_table = table.take(pa.array(split.fit)), table.take(pa.array(split.valid))
    labels = pc.cast(fit_table.column(schema.label), pa.int64()).to_numpy()
    if labels.min() == labels.max():
        raise RankerInputError(
            f"the fitting part of the training window (before {split.cut}) holds only label {labels[0]}: "
            "a ranker needs both classes; use a longer training window"
        )
    if len(split.valid):
        valid_labels = pc.cast(valid_table.column(schema.label), pa.int64()).to_numpy()
        if valid_labels.min() == valid_labels.max():
            raise RankerInputError(
                f"the validation part (the last {config.valid_fraction:.0%} of the window, from {split.cut}) holds only "
                f"label {valid_labels[0]}, so AUC cannot select a model; use a longer window or another valid_fraction"
            )
    has_valid = len(split.valid) > 0
    training: dict[str, Any] = {
        "fit_rows": int(len(split.fit)),
        "valid_rows": int(len(split.valid)),
        "valid_from": None if split.cut is None else str(split.cut),
        "fit_positive_rate": float(labels.mean()),
    }
    if config.model == "dlrm":
        pipeline, fit_inputs = FeaturePipeline.fit_dlrm(
            fit_table, schema, config.variant, config.features, with_groups=config.dlrm.listwise_weight > 0
        )
        tables = pipeline.embedding_tables(config.dlrm.embedding_dim)
        valid_inputs = pipeline.dlrm_inputs(valid_table) if has_valid else None
        result = train_dlrm(fit_inputs, valid_inputs, tables, config.dlrm, progress)
        model = scoring_model(tables, len(pipeline.dense_names), config.dlrm, result.state, pipeline.config.history_len)
        best = next(e for e in result.log if e["epoch"] == result.best_epoch)
        training.update(
            best_epoch=result.best_epoch,
            valid_auc=best.get("valid_auc"),
            valid_logloss=best.get("valid_logloss"),
            log=result.log,
            world_size=result.world,
            sharding_plan=result.plan,
        )
    else:
        pipeline = FeaturePipeline.fit(fit_table, schema, config.variant, config.features)
        x_fit, names = pipeline.lightgbm_inputs(fit_table)
        x_valid = pipeline.lightgbm_inputs(valid_table)[0] if has_valid else None
        y_valid = pc.cast(valid_table.column(schema.label), pa.int64()).to_numpy() if has_valid else None
        result = train_lightgbm(x_fit, labels, x_valid, y_valid, names, pipeline.lightgbm_categorical, config.lightgbm)
        model = result.booster
        training.update(
            best_iteration=result.best_iteration,
            valid_auc=result.log["auc"][result.best_iteration - 1] if result.log else None,
            valid_logloss=result.log["binary_logloss"][result.best_iteration - 1] if result.log else None,
            feature_names=names,
        )
    training["seconds"] = round(time.perf_counter() - started, 2)
    return TrainedRanker(config, schema, pipeline, model, training)
