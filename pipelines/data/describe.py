"""`lum data describe`: what is in an events file or a run folder, in numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.data.contract import EventContract, read_events
from pipelines.data.sources.base import check_lines
from pipelines.data.split import WINDOWS, cold_rows, format_summary, summarize
from pipelines.paths import RunPaths


def describe_events(table: pa.Table, contract: EventContract) -> dict[str, Any]:
    """Counts, positive rate, time range, events per user, and the value counts of each condition column."""
    per_user = pc.value_counts(table.column("user_id")).field("counts").to_numpy() if table.num_rows else np.array([0])
    out = summarize(table, cold_rows(table))
    out["events_per_user"] = {q: float(np.quantile(per_user, p)) for q, p in (("p10", 0.1), ("median", 0.5), ("p90", 0.9), ("max", 1.0))}
    out["columns"] = {c.name: {"role": c.role, "known_at": c.known_at, "type": c.dtype} for c in contract.columns}
    out["conditions"] = {}
    for name in contract.condition_names:
        counts = table.group_by(name).aggregate([("label", "count"), ("label", "mean")]).to_pandas()
        counts = counts.sort_values("label_count", ascending=False).head(20)
        out["conditions"][name] = {
            str(v): {"events": int(n), "positive_rate": float(m)} for v, n, m in zip(counts[name], counts.label_count, counts.label_mean)
        }
    return out


def format_description(info: dict[str, Any]) -> str:
    lines = [
        f"events {info['events']:,}   users {info['users']:,}   items {info['items']:,}   "
        f"positive rate {info['positive_rate']:.3f}   cold rows {info['cold_row_share']:.1%}",
        f"time range {info['ts_min']} .. {info['ts_max']}",
        "events per user: " + ", ".join(f"{k} {v:,.0f}" for k, v in info["events_per_user"].items()),
        "columns: " + ", ".join(f"{k} ({v['role']}, known at {v['known_at']})" for k, v in info["columns"].items()),
    ]
    for name, values in info["conditions"].items():
        frame = pd.DataFrame.from_dict(values, orient="index")
        frame["positive_rate"] = frame["positive_rate"].map("{:.3f}".format)
        lines += [f"condition '{name}':", frame.to_string()]
    return "\n".join(lines)


def describe_path(path: str | Path) -> tuple[dict[str, Any], str]:
    """Describe a validated events Parquet file or a run folder (its data and every split in it)."""
    path = Path(path)
    if path.is_dir():
        paths = RunPaths(path)
        table, contract = read_events(paths.events)
        info: dict[str, Any] = {"events": describe_events(table, contract)}
        text = [f"run folder {path}", format_description(info["events"])]
        if paths.dataset_info.exists():
            info["dataset"] = json.loads(paths.dataset_info.read_text())
            text.insert(1, f"source: {info['dataset']['source'].get('name')}, rejected rows: {info['dataset']['n_rejected']}")
            for n, line in enumerate(check_lines(info["dataset"].get("checks"), info["dataset"]["n_events"])):
                text.insert(2 + n, line)
        info["splits"] = {}
        splits_root = path / "splits"
        for protocol_dir in sorted(splits_root.glob("*")) if splits_root.exists() else []:
            summary_file = protocol_dir / "summary.json"
            if summary_file.exists():
                summary = json.loads(summary_file.read_text())
                info["splits"][protocol_dir.name] = summary
                text += [f"split '{protocol_dir.name}' ({', '.join(WINDOWS)}):", format_summary(summary)]
        return info, "\n".join(text)
    table, contract = read_events(path)
    info = describe_events(table, contract)
    return info, format_description(info)
