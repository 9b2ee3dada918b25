"""`run_state.json`: each step's state, settings hash and duration, updated as steps finish (`lum status` reads it)."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from pipelines.data.contract import write_json_atomic
from pipelines.paths import RunPaths
from pipelines.run.config import RunConfig, config_dict, settings_hash
from pipelines.steps import UP_TO_DATE

STATE_FILE = "run_state.json"


class RunState:
    """The run's config and, per step: status (running | done | failed), seconds, settings hash, reused."""

    def __init__(self, paths: RunPaths, config: RunConfig):
        self.path = paths.root / STATE_FILE
        previous = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.state = {"config": config_dict(config), "steps": previous.get("steps", {})}

    def step(self, name: str, fn: Callable[[], Any], echo: Callable[[str], None], settings: Any = None) -> Any:
        """Runs `fn` as the step `name` and records its status, seconds and settings hash; returns what `fn` returns.

        A step that returns UP_TO_DATE did nothing: it keeps the seconds of the run that made its output (and is
        marked `reused`), so the report's step durations stay those of the work.
        """
        echo(f"--- {name}")
        started = time.perf_counter()
        previous = self.state["steps"].get(name, {})
        digest = settings_hash(settings)
        self.state["steps"][name] = {"status": "running", "settings": digest, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._write()
        try:
            result = fn()
        except BaseException:
            self.state["steps"][name] = {"status": "failed", "settings": digest, "seconds": round(time.perf_counter() - started, 1)}
            self._write()
            raise
        seconds = round(time.perf_counter() - started, 1)
        reused = isinstance(result, str) and result == UP_TO_DATE
        if reused and previous.get("status") == "done" and "seconds" in previous:
            # nothing was redone: the duration stays that of the run which made the output
            self.state["steps"][name] = {"status": "done", "settings": digest, "seconds": previous["seconds"], "reused": True}
        else:
            self.state["steps"][name] = {"status": "done", "settings": digest, "seconds": seconds, **({"reused": True} if reused else {})}
        self._write()
        return result

    def durations(self) -> dict[str, float]:
        return {k: v.get("seconds", 0.0) for k, v in self.state["steps"].items()}

    def _write(self) -> None:
        write_json_atomic(self.state, self.path)


def read_status(paths: RunPaths) -> list[dict[str, Any]]:
    """One row per recorded step of a run folder: step, state, seconds, settings hash, reused."""
    path = paths.root / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{paths.root} has no {STATE_FILE}: no `lum run` has started there")
    try:
        steps = json.loads(path.read_text())["steps"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a run state file: {exc}") from exc
    return [{"step": name, "state": s.get("status", "?"), "seconds": s.get("seconds"), "settings": s.get("settings", ""),
             "reused": bool(s.get("reused", False))} for name, s in steps.items()]
