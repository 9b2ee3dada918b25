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

The retrieval step (pipelines/steps/retrieval.py) computes these tables and writes them into the run folder, where
the report reads them: this module sits with the steps, below report/.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipelines.data.sources.simulator import RequestTruth, SimulatorConfig
from pipelines.data.sources.simulator import examination as simulator_examination
from ranker.metrics import interval95, user_resamples

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
    sets = candidate_sets(truth, index, slates, retrieved)
    per_set = {name: _set_metrics(truth, index, found, best, config) for name, found in sets.items()}
    boot = _UserBootstrap(requests["user_id"].to_numpy(), config)
    rows = []
    for name, (recall, ctr, size) in per_set.items():
        row = {"candidates": name, "requests": len(requests), "mean_size": float(size.mean())}
        row.update(boot.summary("recall", recall, per_set[LOGGED][0], with_lift=name != LOGGED))
        row.update(boot.summary(f"oracle_ctr@{config.ctr_k}", ctr, per_set[LOGGED][1], with_lift=name != LOGGED))
        rows.append(row)
    return pd.DataFrame(rows)


def candidate_sets(truth: RequestTruth, index: np.ndarray, slates: list[np.ndarray], retrieved: dict[str, list[np.ndarray]]
                   ) -> dict[str, list[np.ndarray]]:
    """{`logged`: the slates, `logged + NAME`: each slate with the retriever's released candidates merged in}, item
    indices per request (sorted, no duplicates). index: the requests' positions in `truth`."""
    sets = {LOGGED: [np.unique(s) for s in slates]}
    for name, found in retrieved.items():
        merged = []
        for request, slate, extra in zip(index, slates, found):
            extra = np.asarray(extra, dtype=np.int64)
            extra = extra[truth.release_us[extra] <= truth.ts_us[request]]  # nothing a request could not have shown
            merged.append(np.union1d(slate, extra))
        sets[f"{LOGGED} + {name}"] = merged
    return sets


def ranked_ctr(truth: RequestTruth, requests: pd.DataFrame, sets: dict[str, list[np.ndarray]], scores: dict[str, dict[str, list[np.ndarray]]],
               config: RetrievalABConfig = RetrievalABConfig()) -> pd.DataFrame:
    """CTR@k when a ranker orders each candidate set: one row per (ranker, set), the lift over the logged slates under
    the same ranker. scores: {ranker: {set name: [R] the ranker's score of each of the set's items]}}."""
    index = truth.index_of(requests["request_id"].to_numpy())
    weights = simulator_examination(np.arange(config.ctr_k), config.position_decay)
    boot = _UserBootstrap(requests["user_id"].to_numpy(), config)
    rows = []
    for ranker, by_set in scores.items():
        ctr = {}
        for name, items in sets.items():
            values = np.zeros(len(items))
            for i, (request, found, score) in enumerate(zip(index, items, by_set[name])):
                top = found[np.lexsort((np.arange(len(found)), -np.asarray(score)))[: config.ctr_k]]  # ties: set order
                values[i] = float((truth.relevance(np.array([request]), top[None, :])[0] * weights[: len(top)]).sum()) / config.ctr_k
            ctr[name] = values
        for name, values in ctr.items():
            rows.append({"ranker": ranker, "candidates": name, **boot.summary(f"ctr@{config.ctr_k}", values, ctr[LOGGED], name != LOGGED)})
    return pd.DataFrame(rows)


class _UserBootstrap:
    """Means over requests with 95% intervals, and lifts over a baseline, from a paired bootstrap over users."""

    def __init__(self, users: np.ndarray, config: RetrievalABConfig):
        self.codes, unique = pd.factorize(users, sort=True)
        self.n_users = len(unique)
        self.n_requests = np.bincount(self.codes, minlength=self.n_users).astype(np.float64)
        self.draws = np.stack(list(user_resamples(self.n_users, config.n_bootstrap, config.seed)))  # [B, U]

    def summary(self, metric: str, values: np.ndarray, base: np.ndarray, with_lift: bool) -> dict[str, float]:
        """{metric, metric_low, metric_high[, metric_lift, _lift_low, _lift_high]} of per-request `values`."""
        # per-user sums: a resample draws users, so a user's requests move together
        mine = np.bincount(self.codes, weights=values, minlength=self.n_users)
        theirs = np.bincount(self.codes, weights=base, minlength=self.n_users)
        means = (self.draws * mine).sum(1) / (self.draws * self.n_requests).sum(1)
        low, high = interval95(means)
        out = {metric: float(mine.sum() / self.n_requests.sum()), f"{metric}_low": low, f"{metric}_high": high}
        if with_lift:
            lifts = (self.draws * mine).sum(1) / (self.draws * theirs).sum(1) - 1.0
            lift_low, lift_high = interval95(lifts)
            out |= {f"{metric}_lift": float(mine.sum() / theirs.sum() - 1.0), f"{metric}_lift_low": lift_low, f"{metric}_lift_high": lift_high}
        return out
