"""build_report: evaluate every protocol, draw the plots, write report.{html,md,json} and the PNGs atomically."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union

import pandas as pd

from contracts.files import write_bytes_atomic
from pipelines.report.compute import evaluate_protocol
from pipelines.report.document import report_blocks
from pipelines.report.environment import collect_environment
from pipelines.report.formatting import jsonable
from pipelines.report.plots import plot_ab, plot_calibration, plot_lm_scaling, plot_roc, plot_slice_lifts
from pipelines.report.render import render_html, render_markdown
from pipelines.report.seeds import across_seeds
from pipelines.report.spec import ReportConfig, resolve_config, score_columns, simulator_position_decay

Scored = Union[pd.DataFrame, list[pd.DataFrame]]
META_KEYS = ("protocols", "data", "model_versions", "config", "durations", "slice_columns", "targets", "position_decay", "retrieval")


def write_atomic(path: Path, data: bytes) -> None:
    """A reader sees the old file or the new one, never a partial one (contracts.files)."""
    write_bytes_atomic(data, path)


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").lower() or "protocol"


def build_report(scored: Scored, meta: dict[str, Any], out_dir: Path | str, config: ReportConfig = ReportConfig()) -> dict[str, Any]:
    """Evaluate every protocol's scored table, draw the plots, write report.{html,md,json} + PNGs; return the JSON.

    `meta` (all optional but `run`): run, protocols (one {name, split, feature_mode, cold_share} per table), data
    (the run's dataset.json), model_versions, config, durations ({step: seconds} of the steps done), slice_columns,
    targets ({key: threshold}, see spec.TARGETS), retrieval ({split: its retrieval A/B, pipelines/steps/retrieval.py}),
    lm_scaling ([{preset, params, gauc_lift, low, high}]), seed_runs (the
    reports of the run's other seeds, [{seed, run, report}]: the section across seeds),
    position_decay, environment (collect_environment() of this process when absent).
    """
    frames = [scored] if isinstance(scored, pd.DataFrame) else list(scored)
    if not frames:
        raise ValueError("build_report needs at least one scored table")
    protocols_meta = list(meta.get("protocols") or [])
    if protocols_meta and len(protocols_meta) != len(frames):
        raise ValueError(f"meta['protocols'] describes {len(protocols_meta)} protocols but {len(frames)} scored tables were given")
    if not protocols_meta:
        protocols_meta = [{"name": "default"} if len(frames) == 1 else {"name": f"protocol {i + 1}"} for i in range(len(frames))]
    names = [str(p.get("name", f"protocol {i + 1}")) for i, p in enumerate(protocols_meta)]
    if len(set(names)) != len(names):
        raise ValueError(f"protocol names must be unique, got {names}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the settings actually used: what the report shows in its configuration block is what the A/B and slices ran with
    config, decay_origin = resolve_config(config, meta)

    plots: dict[str, bytes] = {}
    protocols = []
    for frame, protocol in zip(frames, protocols_meta):
        result = evaluate_protocol(frame, protocol | {"name": str(protocol.get("name", "default"))}, meta, config, decay_origin, simulator_position_decay(meta))
        columns = score_columns(frame)
        name = slug(result["name"])
        drawn = {
            "roc": (f"roc_{name}.png", plot_roc(frame, columns, result["variants"])),
            "calibration": (f"calibration_{name}.png", plot_calibration(frame, columns, config.calibration_bins)),
            "slice_lift": (f"slice_lift_{name}.png", plot_slice_lifts(result["slices"])),
            "ab": (f"ab_ctr_{name}.png", plot_ab(result["ab"]) if result["ab"] else None),
        }
        result["plots"] = {}
        for key, (file_name, image) in drawn.items():
            if image is not None:
                plots[file_name] = image
                result["plots"][key] = file_name
        protocols.append(result)

    report: dict[str, Any] = {
        "title": config.title,
        "run": str(meta.get("run", "run")),
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "meta": {k: meta.get(k) for k in META_KEYS if k in meta},
        "report_config": asdict(config),
        "environment": meta.get("environment") or collect_environment(),
        "protocols": protocols,
        "lm_scaling": list(meta.get("lm_scaling") or []),
        "plots": {},
    }
    if meta.get("seed_runs"):
        report["seeds"] = across_seeds(protocols, list(meta["seed_runs"]))
    if len(report["lm_scaling"]) >= 2:
        plots["lm_scaling.png"] = plot_lm_scaling(report["lm_scaling"])
        report["plots"]["lm_scaling"] = "lm_scaling.png"
    report["files"] = ["report.html", "report.md", "report.json", *plots]
    report = jsonable(report)

    blocks = report_blocks(report, plots)
    for file_name, image in plots.items():
        write_atomic(out_dir / file_name, image)
    write_atomic(out_dir / "report.json", (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    write_atomic(out_dir / "report.md", render_markdown(blocks).encode("utf-8"))
    write_atomic(out_dir / "report.html", render_html(blocks, f"{report['title']}: {report['run']}").encode("utf-8"))
    return report
