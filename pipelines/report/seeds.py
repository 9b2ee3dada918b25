"""The report's section across seeds: each lift's value under every seed, its mean with a t-interval over seeds, and
which targets hold on every seed.

The bootstrap interval of one run resamples users with the models fixed: it says how much the lift would move on
other users, not on another training run. The interval across seeds (Student's t on the per-seed lifts) is the
second: with 3 seeds it is wide by construction (t = 4.30), and a target that holds on every seed is the claim a
reader can rely on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from pipelines.report.compute import verdict
from pipelines.report.spec import METRIC_LABELS


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the mean of `values` by Student's t; NaN bounds for fewer than 2 finite values."""
    finite = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if len(finite) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(finite.mean())
    if len(finite) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(finite) - 1) * finite.std(ddof=1) / np.sqrt(len(finite)))
    return mean, mean - half, mean + half


def across_seeds(protocols: list[dict[str, Any]], seed_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per protocol: every lift (model, comparison, metric) across the run (seed 0) and `seed_runs` ([{seed, run,
    report}]), and every target's outcome per seed. A protocol or lift missing from a seed's report is a gap (None)."""
    runs = [{"seed": 0, "protocols": protocols}] + [{"seed": int(s["seed"]), "protocols": s["report"]["protocols"]} for s in seed_runs]
    seeds = [r["seed"] for r in runs]
    out = []
    for protocol in protocols:
        per_seed = [next((p for p in r["protocols"] if p["name"] == protocol["name"]), None) for r in runs]
        lifts = []
        for lift in protocol["lifts"]:
            key = (lift["model"], lift["comparison"], lift["metric"])
            found = [next((x for x in (p or {}).get("lifts", []) if (x["model"], x["comparison"], x["metric"]) == key), None) for p in per_seed]
            values = [None if x is None else float(x["delta"]) for x in found]
            mean, low, high = t_interval(values)
            sentence, outcome = verdict(mean, low, high, f"{METRIC_LABELS[lift['metric']]} (mean over seeds)", "LUM features")
            known = [v for v in values if v is not None and np.isfinite(v)]
            lifts.append({
                "model": lift["model"], "comparison": lift["comparison"], "metric": lift["metric"], "values": values,
                "bootstrap": [None if x is None else {"low": x["low"], "high": x["high"]} for x in found],
                "mean": mean, "low": low, "high": high, "outcome": outcome, "verdict": sentence,
                "min": min(known) if known else None, "max": max(known) if known else None,
                "positive_on_every_seed": bool(len(known) == len(runs) and min(known) > 0),
            })
        targets = []
        for target in protocol.get("targets", []):
            key = (target["target"], target["model"])
            met = [next((t["met"] for t in (p or {}).get("targets", []) if (t["target"], t["model"]) == key), None) for p in per_seed]
            targets.append({"target": target["target"], "model": target["model"], "description": target["description"], "met": met,
                            "held_on_every_seed": all(m is True for m in met)})
        out.append({"protocol": protocol["name"], "seeds": seeds, "lifts": lifts, "targets": targets})
    return out
