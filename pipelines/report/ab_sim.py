"""A simulated online A/B test: each ranker re-orders held-out slates, the simulator's ground truth scores them.

On the simulator every impression carries `relevance`, the true probability of a click if the item is examined,
and the rows of one `request_id` form the slate of candidates that request showed. So we can ask what a live
test would have seen had a ranker ordered those slates:

    expected_clicks@k(request) = sum over the ranker's top k of  relevance(item) * examination(position)
    examination(position)      = (1 + position) ** -position_decay          (the simulator's position bias)
    CTR@k                      = expected_clicks@k / k, averaged over requests

A ranker orders a slate by its score, descending, ties broken by row order. Two reference policies come for
free: `logged` (the order the logging policy showed, from the `position` column, when present) and `oracle`
(ordered by the true relevance: the best any ranker can do).

The lift of a variant over a baseline, `CTR_a / CTR_b - 1`, gets a 95% interval from a paired bootstrap over
USERS (the requests of one user are not independent): users are drawn with replacement (the draws of
ranker.metrics.user_resamples, as every bootstrap of the report) and both CTRs are recomputed on the same draw. Expected clicks are summed per user once, so a resample costs one weighted sum
over users, not a pass over the rows.

    sim = simulate_ab(scored, {"dlrm/base": "score__dlrm__base", "dlrm/lum": "score__dlrm__lum"},
                      ABConfig(position_decay=0.6))
    sim.ctr_table()                          # policies x CTR@k
    sim.lift("dlrm/lum", "dlrm/base", k=10)  # CTRLift(lift=+0.041, low=+0.030, high=+0.052, ...)
"""  # noqa: E501

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipelines.data.sources.simulator import SimulatorConfig
from pipelines.data.sources.simulator import examination as simulator_examination
from ranker.metrics import interval95, user_resamples

LOGGED = "logged"
ORACLE = "oracle"


@dataclass(frozen=True)
class ABConfig:
    ks: tuple[int, ...] = (1, 5, 10)
    position_decay: float = SimulatorConfig.position_decay  # pass the value the simulator generated the data with
    n_bootstrap: int = 1000  # user resamples for the lift intervals (cheap: one weighted sum per resample)
    seed: int = 0
    user: str = "user_id"
    request: str = "request_id"
    relevance: str = "relevance"
    position: str = "position"  # the logged order; the `logged` policy is left out when the column is absent

    def __post_init__(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be positive integers, got {self.ks}")
        if self.n_bootstrap < 1:
            raise ValueError("n_bootstrap must be >= 1")


@dataclass(frozen=True)
class CTRLift:
    """Relative CTR@k lift of `variant` over `baseline`: ctr_variant / ctr_baseline - 1."""

    variant: str
    baseline: str
    k: int
    ctr_variant: float
    ctr_baseline: float
    lift: float  # on all requests
    mean: float  # mean of the resampled lifts
    low: float  # 2.5th percentile
    high: float  # 97.5th percentile
    n: int  # resamples with a defined lift


def examination(position: np.ndarray | int, position_decay: float) -> np.ndarray:
    """Probability that a user looks at slot `position` (0 = top): the simulator's own position bias."""
    return simulator_examination(np.asarray(position, dtype=np.float64), position_decay)


@dataclass(frozen=True)
class ABSimulation:
    """Expected clicks of every policy, summed per user; CTRs and lifts are read from these sums."""

    config: ABConfig
    policies: tuple[str, ...]
    users: np.ndarray  # [U] user ids, sorted
    user_requests: np.ndarray  # [U] requests per user
    user_clicks: np.ndarray  # [U, P, K] expected clicks at the top k (config.ks), summed over the user's requests

    @property
    def n_requests(self) -> int:
        return int(self.user_requests.sum())

    def _index(self, policy: str, k: int) -> tuple[int, int]:
        if policy not in self.policies:
            raise KeyError(f"unknown policy '{policy}'; have {list(self.policies)}")
        if k not in self.config.ks:
            raise KeyError(f"k={k} was not simulated; have {list(self.config.ks)}")
        return self.policies.index(policy), self.config.ks.index(k)

    def ctr(self, policy: str, k: int) -> float:
        """CTR@k: expected clicks in the top k / k, averaged over all requests."""
        p, j = self._index(policy, k)
        return float(self.user_clicks[:, p, j].sum() / (k * self.n_requests))

    def ctr_table(self) -> pd.DataFrame:
        """One row per policy, one `ctr@k` column per k."""
        return pd.DataFrame(
            {f"ctr@{k}": [self.ctr(p, k) for p in self.policies] for k in self.config.ks},
            index=pd.Index(self.policies, name="policy"),
        )

    def lift(self, variant: str, baseline: str, k: int) -> CTRLift:
        return self.lifts([(variant, baseline)], [k])[0]

    def lifts(self, pairs: list[tuple[str, str]], ks: list[int] | tuple[int, ...] | None = None) -> list[CTRLift]:
        """Lifts for (variant, baseline) pairs at each k; all are evaluated on the same user resamples."""
        ks = tuple(ks or self.config.ks)
        index = [(self._index(a, k), self._index(b, k), k) for a, b in pairs for k in ks]
        n_users = len(self.users)
        samples = np.empty((self.config.n_bootstrap, len(index)))
        for r, counts in enumerate(user_resamples(n_users, self.config.n_bootstrap, self.config.seed)):
            # the k and the request count cancel in the ratio of two CTRs on the same resample
            # einsum, not tensordot/dot: multi-threaded BLAS is many times slower on a small machine for this shape
            clicks = np.einsum("u,upk->pk", counts, self.user_clicks)  # [P, K]
            with np.errstate(invalid="ignore", divide="ignore"):
                samples[r] = [clicks[pa, ja] / clicks[pb, jb] - 1.0 for (pa, ja), (pb, jb), _ in index]
        out = []
        for column, ((pa, _), (pb, _), k) in enumerate(index):
            ctr_a, ctr_b = self.ctr(self.policies[pa], k), self.ctr(self.policies[pb], k)
            values = samples[:, column]
            values = values[np.isfinite(values)]
            lift = ctr_a / ctr_b - 1.0 if ctr_b > 0 else float("nan")
            if len(values):
                mean, (low, high) = float(values.mean()), interval95(values)
            else:
                mean = low = high = float("nan")
            out.append(CTRLift(self.policies[pa], self.policies[pb], k, ctr_a, ctr_b, float(lift), mean, low, high, len(values)))
        return out


def request_clicks(request_codes: np.ndarray, sort_key: np.ndarray, relevance: np.ndarray, config: ABConfig) -> np.ndarray:
    """[R, K] expected clicks of each request at each k in config.ks when slates are ordered by `sort_key`.

    request_codes [N] are 0..R-1; rows with a higher sort_key go first, ties keep row order.
    """
    n = len(request_codes)
    n_requests = int(request_codes.max()) + 1 if n else 0
    # lexsort sorts by the last key first: request, then key descending, then row number
    order = np.lexsort((np.arange(n), -sort_key, request_codes))
    sorted_requests = request_codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_requests[1:] != sorted_requests[:-1]])
    sizes = np.diff(np.r_[starts, n])
    slot = np.arange(n) - np.repeat(starts, sizes)  # position in the re-ranked slate
    gain = relevance[order] * examination(slot, config.position_decay)
    return np.stack([np.bincount(sorted_requests, weights=gain * (slot < k), minlength=n_requests) for k in config.ks], axis=1)


def simulate_ab(frame: pd.DataFrame, rankers: dict[str, str], config: ABConfig = ABConfig()) -> ABSimulation:
    """Re-rank every request's slate with each ranker ({name: score column}) plus `logged` and `oracle`.

    A request is credited to the user of its first row. A missing score ranks last.
    """
    for column in (config.user, config.request, config.relevance, *rankers.values()):
        if column not in frame.columns:
            raise KeyError(f"A/B simulation needs column '{column}'")
    for reserved in (LOGGED, ORACLE):
        if reserved in rankers:
            raise ValueError(f"'{reserved}' is a reference policy's name; name the ranker differently")
    relevance = frame[config.relevance].to_numpy(dtype=np.float64)
    if np.isnan(relevance).any():
        raise ValueError("relevance has missing values: every candidate needs its true click probability")
    request_codes, _ = pd.factorize(frame[config.request])
    n_requests = int(request_codes.max()) + 1 if len(request_codes) else 0

    keys: dict[str, np.ndarray] = {}
    for name, column in rankers.items():
        score = frame[column].to_numpy(dtype=np.float64)
        keys[name] = np.where(np.isnan(score), -np.inf, score)
    if config.position in frame.columns:
        keys[LOGGED] = -frame[config.position].to_numpy(dtype=np.float64)  # slot 0 first
    keys[ORACLE] = relevance
    per_request = np.stack([request_clicks(request_codes, key, relevance, config) for key in keys.values()], axis=1)  # [R, P, K]

    _, first_row = np.unique(request_codes, return_index=True)  # each request's first row, in code order
    user_codes, users = pd.factorize(frame[config.user].to_numpy()[first_row], sort=True)
    n_users = len(users)
    flat = per_request.reshape(n_requests, -1)
    user_clicks = np.stack([np.bincount(user_codes, weights=flat[:, c], minlength=n_users) for c in range(flat.shape[1])], axis=1)
    user_clicks = user_clicks.reshape(n_users, *per_request.shape[1:])
    return ABSimulation(
        config=config,
        policies=tuple(keys),
        users=np.asarray(users),
        user_requests=np.bincount(user_codes, minlength=n_users),
        user_clicks=user_clicks,
    )
