"""The report of a run folder: reads what the run's steps wrote and hands it to `build_report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.paths import RunPaths
from pipelines.run.config import ProtocolConfig, RunConfig, config_dict


def report_run(config: RunConfig, paths: RunPaths, scored: list[tuple[ProtocolConfig, Path]], durations: dict[str, float]) -> dict[str, Any]:
    """The report of a finished run: each protocol's scored test window, the run's facts and settings -> report/."""
    import pyarrow.parquet as pq

    from pipelines.report import ReportConfig, build_report
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
        "model_versions": {p.name: json.loads((paths.model_dir(p.split, config.lm.preset) / "lum_manifest.json").read_text())["model_version"]
                           for p, _ in scored},
        "config": config_dict(config), "durations": durations, "targets": dict(config.targets),
        "slice_columns": [c for c in ("surface", "device", "daypart", "feedback") if c in frames[0].columns],
    }
    if info["source"].get("name") == "simulator":
        meta["position_decay"] = info["source"]["config"].get("position_decay", 0.6)
    out = paths.root / "report"
    return build_report(frames if len(frames) > 1 else frames[0], meta, out, ReportConfig(n_bootstrap=config.report.bootstrap, seed=config.report.seed))
