"""How numbers are written in the report (digits, signs, percentages, durations) and how values become JSON."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

MISSING = "–"  # an en dash where a value is undefined or absent


def finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(float(x))


def fixed(x: Any, digits: int = 4) -> str:
    return f"{float(x):.{digits}f}" if finite(x) else MISSING


def signed(x: Any, digits: int = 4) -> str:
    return f"{float(x):+.{digits}f}" if finite(x) else MISSING


def pct(x: Any, digits: int = 1) -> str:
    return f"{100 * float(x):+.{digits}f}%" if finite(x) else MISSING


def ci(d: dict[str, Any] | None, fmt=fixed) -> str:
    """'low to high' of a dict with an interval, or '' when it has none."""
    return f"{fmt(d['low'])} to {fmt(d['high'])}" if d and finite(d.get("low")) and finite(d.get("high")) else ""


def seconds(s: Any) -> str:
    if not finite(s):
        return MISSING if s is None else str(s)
    s = float(s)
    if round(s, 1) < 60:
        return f"{s:.1f} s"
    whole = int(round(s))  # rounded before splitting: 119.5 s is 2 min 00 s, not 1 min 60 s
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    minutes = int(round(s / 60))
    return f"{minutes // 60} h {minutes % 60:02d} min"


def plain(value: Any) -> str:
    """A meta value as text: scalars as they are, containers as compact JSON."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(jsonable(value), default=str)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def jsonable(value: Any) -> Any:
    """Plain JSON values: NaN and infinities become null, numpy scalars Python numbers, paths and times strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)
