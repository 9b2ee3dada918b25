"""The A/B lift report: ranker variants side by side with 95% intervals, lifts of LUM features, slices, plots.

    report = build_report(scored, meta, Path("runs/demo/report"), ReportConfig(n_bootstrap=200))

`scored` is the test window with one score column per ranker variant, named `score__<model>__<variant>`
(model dlrm | lightgbm, variant base | lum | pooled-history | lum+pooled; any subset), or a list of such tables,
one per protocol (e.g. global split + snapshot features, per-user split + rolling features). Writes into out_dir:

    report.html   one self-contained page (CSS inline, plots embedded as data URIs, no scripts, no network)
    report.md     the same tables in Markdown, plots linked as the PNG files beside it
    report.json   every number shown (NaN written as null)
    *.png         ROC curves, calibration, lift by slice, simulated CTR@k, LM size vs lift

Every file is written to a temporary name and renamed, so a reader never sees half a report.

The package, one job per module:
    spec.py         ReportConfig; the variants, comparisons, metrics and targets; settings resolved from the run
    compute.py      metrics (ranker.metrics), intervals (ranker.metrics.UserBootstrap), lifts, verdicts, A/B, targets
    slices.py       the slices of a test table, each set of rows once
    ab_sim.py       the simulated online A/B test on the simulator's ground truth
    environment.py  git commit, library versions, hardware
    plots.py        matplotlib figures
    document.py     the report's content as blocks (what is said, in which order)
    render.py       blocks -> HTML and Markdown through templates/report.html.j2 and report.md.j2
    build.py        build_report: all of the above, written atomically

A run folder's facts reach build_report through pipelines/run/report.py (report_run); the retrieval A/B's table is
computed by its step (pipelines/steps/retrieval_ab.py) and read here from the run folder. This package imports
nothing from run/ or cli/, which sit above it (tests/test_layering.py: PIPELINES_LAYERS).
"""

from __future__ import annotations

import importlib
from typing import Any

# names -> the module defining them, imported on first use: the run config reads ReportConfig (spec.py) without
# paying for matplotlib and scikit-learn, which only building a report needs
_EXPORTS = {
    "build_report": "pipelines.report.build",
    "evaluate_protocol": "pipelines.report.compute", "interval": "pipelines.report.compute", "verdict": "pipelines.report.compute",
    "COMPARISONS": "pipelines.report.spec", "TARGETS": "pipelines.report.spec", "ReportConfig": "pipelines.report.spec",
    "ScoreColumn": "pipelines.report.spec", "resolve_config": "pipelines.report.spec", "score_columns": "pipelines.report.spec",
    "SortedAUC": "ranker.metrics", "UserBootstrap": "ranker.metrics",  # the report's bootstrap lives in ranker.metrics
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipelines.report' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
