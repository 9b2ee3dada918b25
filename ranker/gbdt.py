"""The LightGBM ranker: a binary classifier on the same table (features.py builds its matrix).

LightGBM cannot learn embeddings, so ids and the request context enter as categorical features (integer codes
from the same vocabularies as the DLRM), the LUM vectors as flattened columns beside their similarities, and the
history as derived numbers. Early stopping watches the validation rows (the last part of the training window in
time) and keeps the best iteration. `deterministic` + `force_row_wise` + a seed make two runs identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import lightgbm as lgb
import numpy as np

from contracts.settings import Field, config_class


METRICS = ("auc", "binary_logloss")  # LightGBM's names; both are recorded on the validation rows


@config_class
class LightGBMConfig:
    """LightGBM's parameters for the binary ranker."""

    num_leaves: int = Field(63, ge=2, description="LightGBM num_leaves.")
    learning_rate: float = Field(0.05, gt=0, description="LightGBM learning rate.")
    n_estimators: int = Field(1000, ge=1, description="Most trees (early stopping picks the iteration).")
    early_stopping_rounds: int = Field(50, ge=1, description="Trees without a better validation metric before stopping.")
    min_data_in_leaf: int = Field(50, ge=1, description="LightGBM min_data_in_leaf.")
    feature_fraction: float = Field(0.8, gt=0, le=1, description="LightGBM feature_fraction.")
    bagging_fraction: float = Field(0.8, gt=0, le=1, description="LightGBM bagging_fraction.")
    bagging_freq: int = Field(1, ge=0, description="LightGBM bagging_freq.")
    lambda_l2: float = Field(1.0, ge=0, description="LightGBM lambda_l2.")
    cat_smooth: float = Field(10.0, ge=0, description="LightGBM cat_smooth.")
    max_cat_threshold: int = Field(64, ge=1, description="LightGBM max_cat_threshold.")
    seed: int = Field(0, description="Random seed.")
    threads: int | None = Field(None, ge=1, description="LightGBM threads (default: all cores).")
    # on a small validation window AUC can peak by chance in the first trees; the logloss moves smoothly
    early_stopping_metric: Literal["auc", "binary_logloss"] = Field(
        "auc", description="The validation metric whose best iteration is kept.")

    def params(self) -> dict:
        params = {
            "objective": "binary",
            # the first one decides the early stop (first_metric_only); the other is recorded
            "metric": [self.early_stopping_metric, *(m for m in METRICS if m != self.early_stopping_metric)],
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": self.bagging_freq,
            "lambda_l2": self.lambda_l2,
            "cat_smooth": self.cat_smooth,
            "max_cat_threshold": self.max_cat_threshold,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "verbosity": -1,
        }
        if self.threads:
            params["num_threads"] = self.threads
        return params


@dataclass
class LightGBMResult:
    booster: lgb.Booster
    best_iteration: int
    log: dict  # metric name -> values per iteration on the validation rows


def train_lightgbm(
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    x_valid: np.ndarray | None,
    y_valid: np.ndarray | None,
    names: list[str],
    categorical: list[str],
    config: LightGBMConfig,
) -> LightGBMResult:
    """x: [N, F] float32 (NaN = missing), y: [N] 0/1."""
    fit_set = lgb.Dataset(x_fit, label=y_fit, feature_name=names, categorical_feature=categorical, free_raw_data=False)
    valid_sets, callbacks, history = [], [], {}
    if x_valid is not None:
        valid_sets = [lgb.Dataset(x_valid, label=y_valid, reference=fit_set)]
        # the first metric (config.early_stopping_metric) decides
        callbacks = [lgb.early_stopping(config.early_stopping_rounds, first_metric_only=True, verbose=False), lgb.record_evaluation(history)]
    booster = lgb.train(config.params(), fit_set, num_boost_round=config.n_estimators, valid_sets=valid_sets, valid_names=["valid"][: len(valid_sets)], callbacks=callbacks)
    best = booster.best_iteration or booster.current_iteration()
    return LightGBMResult(booster, int(best), {k: [float(x) for x in v] for k, v in history.get("valid", {}).items()})


def predict_lightgbm(booster: lgb.Booster, x: np.ndarray) -> np.ndarray:
    """[N] click probabilities at the booster's best iteration."""
    return booster.predict(x, num_iteration=booster.best_iteration or None).astype(np.float64)
