"""The LightGBM ranker: a binary classifier on the same table (features.py builds its matrix).

LightGBM cannot learn embeddings, so ids and the request context enter as categorical features (integer codes
from the same vocabularies as the DLRM), the LUM vectors as flattened columns beside their similarities, and the
history as derived numbers. Early stopping watches the validation rows (the last part of the training window in
time) and keeps the best iteration. `deterministic` + `force_row_wise` + a seed make two runs identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightgbm as lgb
import numpy as np

from ranker.config import METRICS, LightGBMConfig  # noqa: F401  (re-exported)


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
    booster = lgb.train(
        config.params(), fit_set, num_boost_round=config.n_estimators, valid_sets=valid_sets, valid_names=["valid"][: len(valid_sets)], callbacks=callbacks
    )
    best = booster.best_iteration or booster.current_iteration()
    return LightGBMResult(booster, int(best), {k: [float(x) for x in v] for k, v in history.get("valid", {}).items()})


def predict_lightgbm(booster: lgb.Booster, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """[N] click probabilities at the booster's best iteration (`threads`: LightGBM's num_threads, default all cores)."""
    extra = {"num_threads": threads} if threads else {}
    return booster.predict(x, num_iteration=booster.best_iteration or None, **extra).astype(np.float64)
