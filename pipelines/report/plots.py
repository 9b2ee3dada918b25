"""The report's plots as PNG bytes (matplotlib's object API: no pyplot, no global backend state, nothing to close).

Each `*_figure` function returns the Figure (tests read its axes); `plot_*` renders it to PNG.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from pipelines.report.formatting import fixed
from pipelines.report.slices import UNKNOWN_VALUES
from pipelines.report.spec import MODEL_LABELS, VARIANT_LABELS, ScoreColumn, models_of

PLOT_DPI = 100
UNKNOWN_PANEL = "rows without a value"  # the panel that holds the "unknown" / "missing" slices


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    return buffer.getvalue()


def plot_roc(frame: pd.DataFrame, columns: list[ScoreColumn], variants: list[dict[str, Any]]) -> bytes:
    """One panel per model, one ROC curve per variant."""
    models = models_of(columns)
    fig = Figure(figsize=(5.2 * len(models), 4.6))
    axes = np.atleast_1d(fig.subplots(1, len(models), squeeze=False)[0])
    labels = frame["label"].to_numpy()
    aucs = {v["column"]: v["auc"]["value"] for v in variants}
    for ax, model in zip(axes, models):
        for c in (c for c in columns if c.model == model):
            if len(np.unique(labels)) == 2:
                fpr, tpr, _ = roc_curve(labels, frame[c.column].to_numpy(dtype=np.float64))
                ax.plot(fpr, tpr, lw=1.6, label=f"{VARIANT_LABELS.get(c.variant, c.variant)} (AUC {fixed(aucs[c.column])})")
        ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1, label="chance")
        ax.set(title=f"ROC: {MODEL_LABELS.get(model, model)}", xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    return png(fig)


def reliability_bins(labels: np.ndarray, probs: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean predicted, observed CTR) in equal-count bins of the prediction (ties can merge bins)."""
    edges = np.unique(np.quantile(probs, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, probs, side="right") - 1, 0, max(len(edges) - 2, 0))
    count = np.bincount(which)
    keep = count > 0
    return np.bincount(which, weights=probs)[keep] / count[keep], np.bincount(which, weights=labels)[keep] / count[keep]


def plot_calibration(frame: pd.DataFrame, columns: list[ScoreColumn], bins: int) -> bytes:
    """Reliability diagram: mean predicted vs observed CTR in equal-count bins of the prediction."""
    models = models_of(columns)
    fig = Figure(figsize=(5.2 * len(models), 4.6))
    axes = np.atleast_1d(fig.subplots(1, len(models), squeeze=False)[0])
    labels = frame["label"].to_numpy(dtype=np.float64)
    top = 0.0
    for ax, model in zip(axes, models):
        for c in (c for c in columns if c.model == model):
            predicted, observed = reliability_bins(labels, frame[c.column].to_numpy(dtype=np.float64), bins)
            ax.plot(predicted, observed, marker="o", ms=3.5, lw=1.4, label=VARIANT_LABELS.get(c.variant, c.variant))
            top = max(top, predicted.max(initial=0), observed.max(initial=0))
        ax.set(title=f"Calibration: {MODEL_LABELS.get(model, model)}", xlabel="mean predicted CTR (bin)", ylabel="observed CTR (bin)")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    limit = top * 1.05 if top > 0 else 1.0
    for ax in axes:
        ax.plot([0, limit], [0, limit], ls="--", color="#999999", lw=1)
        ax.set(xlim=(0, limit), ylim=(0, limit))
    return png(fig)


def slice_panels(slices: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(panel title, its slices): one panel per family, and last one for the slices of rows without a value.

    The families share one x scale (their lifts compare); the "unknown" / "missing" slices get their own, since a
    few hundred rows of items without history have intervals ten times wider that would squash every other bar
    into a sliver around 0.
    """
    panels: dict[str, list[dict[str, Any]]] = {}
    unknown = []
    for s in slices:
        if str(s["value"]) in UNKNOWN_VALUES:
            unknown.append(s)
        else:
            panels.setdefault(s["family"], []).append(s)
    out = list(panels.items())
    if unknown:
        out.append((UNKNOWN_PANEL, unknown))
    return out


def slice_lift_figure(slices: list[dict[str, Any]]) -> Figure | None:
    """Horizontal bars: GAUC lift of each comparison per slice, with its 95% interval, one panel per family."""
    series = list(dict.fromkeys((x["model"], x["comparison"]) for s in slices for x in s["lifts"]))
    if not series:
        return None
    panels = slice_panels(slices)
    row_height = 0.12 * len(series) + 0.12
    heights = [len(members) * row_height + 0.55 for _, members in panels]  # + room for the panel's axis
    legend_room = 0.45 + 0.22 * math.ceil(len(series) / 2)
    fig = Figure(figsize=(10, sum(heights) + legend_room), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0])
    known = [ax for ax, (title, _) in zip(axes, panels) if title != UNKNOWN_PANEL]
    for ax in known[1:]:
        ax.sharex(known[0])  # autoscaling then spans the bars of every family, and only theirs
    height = 0.8 / len(series)
    for ax, (title, members) in zip(axes, panels):
        y = np.arange(len(members))
        for i, (model, comparison) in enumerate(series):
            delta, low_err, high_err = [], [], []
            for s in members:
                lift = next((x for x in s["lifts"] if x["model"] == model and x["comparison"] == comparison and x.get("metric", "gauc") == "gauc"), None)
                d = lift["delta"] if lift else float("nan")
                delta.append(d)
                low_err.append(max(d - lift["low"], 0) if lift and np.isfinite(lift["low"]) else 0.0)
                high_err.append(max(lift["high"] - d, 0) if lift and np.isfinite(lift["high"]) else 0.0)
            offset = (i - (len(series) - 1) / 2) * height
            ax.barh(y + offset, delta, height=height, xerr=[low_err, high_err], capsize=2, error_kw={"lw": 0.8}, color=f"C{i}",
                    label=f"{MODEL_LABELS.get(model, model)}: {comparison}")
        ax.axvline(0, color="#333333", lw=0.8)
        names = [s["value"] if title != UNKNOWN_PANEL else f"{s['family']}: {s['value']}" for s in members]
        ax.set_yticks(y, names, fontsize=8)
        ax.set_ylim(len(members) - 0.5, -0.5)  # first slice on top
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    own_scale = "; the last panel has its own scale" if len(known) < len(axes) else ""
    axes[-1].set_xlabel(f"GAUC lift (95% CI){own_scale}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside upper center", ncol=2, frameon=False, title="GAUC lift by slice", title_fontsize=12)
    return fig


def plot_slice_lifts(slices: list[dict[str, Any]]) -> bytes | None:
    fig = slice_lift_figure(slices)
    return None if fig is None else png(fig)


def plot_ab(ab: dict[str, Any]) -> bytes:
    """Grouped bars: CTR@k of every policy, one group per k."""
    fig = Figure(figsize=(10, 4.2))
    ax = fig.subplots()
    ks = ab["ks"]
    width = 0.8 / len(ab["ctr"])
    for i, row in enumerate(ab["ctr"]):
        offset = (i - (len(ab["ctr"]) - 1) / 2) * width
        ax.bar(np.arange(len(ks)) + offset, [row[f"ctr@{k}"] for k in ks], width=width, label=row["label"])
    ax.set_xticks(np.arange(len(ks)), [f"CTR@{k}" for k in ks])
    ax.set(ylabel="expected CTR", title="Simulated online A/B: expected CTR@k")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return png(fig)


def plot_lm_scaling(scaling: list[dict[str, Any]]) -> bytes:
    """GAUC lift against the behaviour LM's parameter count, one point per preset."""
    points = sorted(scaling, key=lambda p: float(p["params"]))
    params = np.array([float(p["params"]) for p in points])
    lift = np.array([float(p["gauc_lift"]) for p in points])
    low = np.array([float(p.get("low", p["gauc_lift"])) for p in points])
    high = np.array([float(p.get("high", p["gauc_lift"])) for p in points])
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    ax.errorbar(params, lift, yerr=[np.clip(lift - low, 0, None), np.clip(high - lift, 0, None)], marker="o", capsize=3, lw=1.4)
    for p, x, y in zip(points, params, lift):
        ax.annotate(str(p["preset"]), (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.axhline(0, color="#333333", lw=0.8)
    ax.set_xscale("log")
    ax.set(xlabel="LM parameters", ylabel="GAUC lift of +LUM vs base (95% CI)", title="LM size vs lift")
    ax.grid(alpha=0.3)
    return png(fig)
