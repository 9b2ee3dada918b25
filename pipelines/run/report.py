"""The report of a run folder: reads what the run's steps wrote and hands it to `build_report`.

It lives in run/, not report/: it reads the run config (pipelines/run/config.py), and report/ sits below run/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from contracts.embeddings import MODEL_MANIFEST_FILE
from pipelines.paths import RunPaths
from pipelines.run.config import ProtocolConfig, RunConfig, config_dict

REPORT_STEP = "report"  # the run's step that calls report_run: still running while the report is written
SLICE_COLUMNS = ("surface", "device", "daypart", "feedback")  # condition columns the report slices by, when present


def run_inputs(
    config: RunConfig, paths: RunPaths, scored: list[tuple[ProtocolConfig, Path]], durations: dict[str, float]
) -> tuple[list[pd.DataFrame], dict[str, Any], Any]:
    """(scored tables, meta, ReportConfig) of a finished run: what report_run passes to build_report."""
    import pyarrow.parquet as pq

    from pipelines.data.sources.base import read_dataset_info

    frames, protocols = [], []
    for protocol, path in scored:
        frame = pq.read_table(path).to_pandas()
        frames.append(frame)
        summary = json.loads(paths.split_summary(protocol.split).read_text())
        protocols.append({"name": protocol.name, "split": protocol.split, "feature_mode": protocol.features,
                          "cold_share": float(frame["user_no_history"].mean()), "split_summary": summary.get("windows", {})})
    info = read_dataset_info(paths)
    meta = {
        "run": paths.root.name, "protocols": protocols, "data": {k: v for k, v in info.items() if k not in ("contract",)},
        "model_versions": {p.name: json.loads((paths.model_dir(p.split, config.lm.pretrain.preset) / MODEL_MANIFEST_FILE).read_text())["model_version"]
                           for p, _ in scored},
        "config": config_dict(config),
        # the report step's own entry is a placeholder (0 s) while it runs: leave it out rather than print 0.0 s
        "durations": {step: seconds for step, seconds in durations.items() if step != REPORT_STEP},
        "targets": dict(config.targets),
        "slice_columns": [c for c in SLICE_COLUMNS if c in frames[0].columns],
    }
    retrieval = {p.split: json.loads(paths.retrieval_ab(p.split).read_text()) for p, _ in scored if paths.retrieval_ab(p.split).exists()}
    if retrieval:  # simulator runs: the retrieval A/B of each split (pipelines/steps/retrieval.py)
        meta["retrieval"] = retrieval
    # position_decay stays None: build_report takes the one the simulator generated the data with from meta["data"]
    return frames, meta, config.report


def report_run(config: RunConfig, paths: RunPaths, scored: list[tuple[ProtocolConfig, Path]], durations: dict[str, float],
               out_dir: Path | None = None, seed_reports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The report of a finished run: each protocol's scored test window, the run's facts and settings -> report/.

    out_dir: where to write it (default: the run folder's report/), e.g. to rebuild a run's report elsewhere.
    seed_reports: the reports of the run's other seeds ([{seed, run, report}], pipelines.run.subruns), for the
    report's section across seeds.
    """
    from pipelines.report import build_report

    frames, meta, report_config = run_inputs(config, paths, scored, durations)
    if seed_reports:
        meta["seed_runs"] = seed_reports
    out = Path(out_dir) if out_dir is not None else paths.root / "report"
    return build_report(frames if len(frames) > 1 else frames[0], meta, out, report_config)
