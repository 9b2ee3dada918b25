"""Retrieval in the simulated A/B: what LUM-retrieved candidates add to the logging policy's slates.

The simulator knows the true click probability of ANY item at any request (`RequestTruth`), not only of the items
its logging policy showed, so a candidate set can be judged without a live test:

    would-click items(request) = the `would_click` most relevant items released by the request's time
    recall(set)                = |set ∩ would-click items| / would_click
    oracle CTR@k(set)          = sum over the set's k most relevant items of relevance * examination(position) / k

Oracle CTR@k is what the best possible ranker makes of a set (the rankers' own order needs their features for
items the log never showed, which is not built: docs/retrieval.md). Compared sets: `logged` (the slate as shown),
and `logged + NAME` for each retriever (its candidates merged into the slate, duplicates and items not yet released
dropped). Means are over requests; intervals and lifts over `logged` come from a paired bootstrap over users (the
draws of ranker.metrics.user_resamples, as the report's other intervals).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipelines.data.sources.simulator import RequestTruth, SimulatorConfig
from pipelines.data.sources.simulator import examination as simulator_examination
from ranker.metrics import user_resamples

LOGGED = "logged"


@dataclass(frozen=True)
class RetrievalABConfig:
    would_click: int = 10  # the request's most relevant released items: what the user would click
    ctr_k: int = 10
    position_decay: float = SimulatorConfig.position_decay  # pass the value the simulator generated the data with
    n_bootstrap: int = 1000
    seed: int = 0


def _set_metrics(truth: RequestTruth, requests: np.ndarray, sets: list[np.ndarray], best: np.ndarray, config: RetrievalABConfig
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per request: recall of the would-click items, oracle CTR@k, set size."""
    recall, ctr, size = np.zeros(len(sets)), np.zeros(len(sets)), np.zeros(len(sets))
    weights = simulator_examination(np.arange(config.ctr_k), config.position_decay)
    for i, (request, items) in enumerate(zip(requests, sets)):
        relevance = truth.relevance(np.array([request]), items[None, :])[0]
        top = np.sort(relevance)[::-1][: config.ctr_k]
        recall[i] = np.isin(best[i], items).mean()
        ctr[i] = float((top * weights[: len(top)]).sum()) / config.ctr_k
        size[i] = len(items)
    return recall, ctr, size


def retrieval_ab(
    truth: RequestTruth,
    requests: pd.DataFrame,
    slates: list[np.ndarray],
    retrieved: dict[str, list[np.ndarray]],
    config: RetrievalABConfig = RetrievalABConfig(),
) -> pd.DataFrame:
    """One row per candidate set: size, recall of the would-click items and oracle CTR@k, each with a 95% interval,
    and the lift over `logged` with its interval.

    requests: one row per request (request_id, user_id); slates [R] the logged items (item indices) of each;
    retrieved: {retriever: [R] its candidates per request (item indices, best first)}.
    """
    if len(slates) != len(requests) or any(len(v) != len(requests) for v in retrieved.values()):
        raise ValueError("slates and every retriever's candidates need one entry per request")
    index = truth.index_of(requests["request_id"].to_numpy())
    best = truth.best_items(index, config.would_click)
    sets = {LOGGED: [np.unique(s) for s in slates]}
    for name, found in retrieved.items():
        merged = []
        for request, slate, extra in zip(index, slates, found):
            extra = np.asarray(extra, dtype=np.int64)
            extra = extra[truth.release_us[extra] <= truth.ts_us[request]]  # nothing a request could not have shown
            merged.append(np.union1d(slate, extra))
        sets[f"{LOGGED} + {name}"] = merged
    user_codes, users = pd.factorize(requests["user_id"].to_numpy(), sort=True)
    per_set = {name: _set_metrics(truth, index, found, best, config) for name, found in sets.items()}
    # per-user sums: a resample draws users, so a user's requests move together
    sums = {name: [np.bincount(user_codes, weights=m, minlength=len(users)) for m in metrics] for name, metrics in per_set.items()}
    n_requests = np.bincount(user_codes, minlength=len(users)).astype(np.float64)
    draws = list(user_resamples(len(users), config.n_bootstrap, config.seed))
    rows = []
    for name, (recall_sum, ctr_sum, size_sum) in sums.items():
        row = {"candidates": name, "requests": len(requests), "mean_size": float(size_sum.sum() / n_requests.sum())}
        for metric, values, base in (("recall", recall_sum, sums[LOGGED][0]), (f"oracle_ctr@{config.ctr_k}", ctr_sum, sums[LOGGED][1])):
            means = np.array([(w * values).sum() / (w * n_requests).sum() for w in draws])
            lifts = np.array([(w * values).sum() / (w * base).sum() - 1.0 for w in draws])
            row[metric] = float(values.sum() / n_requests.sum())
            row[f"{metric}_low"], row[f"{metric}_high"] = (float(np.percentile(means, q)) for q in (2.5, 97.5))
            if name != LOGGED:
                row[f"{metric}_lift"] = float(values.sum() / base.sum() - 1.0)
                row[f"{metric}_lift_low"], row[f"{metric}_lift_high"] = (float(np.percentile(lifts, q)) for q in (2.5, 97.5))
        rows.append(row)
    return pd.DataFrame(rows)
