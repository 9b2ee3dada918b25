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


class SettingsChangedError(ValueError):
    """A step finished before with other settings than the config's now (`lum run --force` redoes it)."""


def flat_settings(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings as {"dotted.key": value} (lists stay values), for naming what changed."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, part in value.items():
            out.update(flat_settings(part, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def changed_settings(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: <recorded> before, <now> now` for every setting that differs (added and removed keys included)."""
    before, after = flat_settings(recorded), flat_settings(now)
    missing = object()

    def line(key: str) -> str:
        if key == "after":  # the settings hash of the step whose output this one reads
            return f"the step it reads from ran with other settings ({before.get(key) or '(none)'} before, {after.get(key) or '(none)'} now)"
        return f"{key}: {before.get(key, '(not set)')!r} before, {after.get(key, '(not set)')!r} now"

    return [line(key) for key in sorted(set(before) | set(after)) if before.get(key, missing) != after.get(key, missing)]


class RunState:
    """The run's config and, per step: status (running | done | failed), seconds, the settings it ran with (and their
    hash), reused.

    A step that ran once is checked against the settings it ran with: the same settings skip to the step's own
    up-to-date check, other settings are a `SettingsChangedError` naming each changed setting, unless the run is
    `force`d, when the step is redone (its function gets `redo=True` and replaces its output). A step's settings hold
    what it reads from the steps before it (the dataset's fingerprint, the model version, ...), so redoing one step
    makes the steps that depend on it differ in turn and be redone too, and only those.
    """

    def __init__(self, paths: RunPaths, config: RunConfig, force: bool = False):
        self.path = paths.root / STATE_FILE
        self.force = force
        previous = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.state = {"config": config_dict(config), "steps": previous.get("steps", {})}

    def step(self, name: str, fn: Callable[[bool], Any], echo: Callable[[str], None], settings: dict[str, Any] | None = None) -> Any:
        """Runs `fn(redo)` as the step `name` and records its status, seconds and settings; returns what `fn` returns.

        `settings`: {section: config or value}; `redo` is True when the step finished before with other settings and
        the run is forced. A step that returns UP_TO_DATE did nothing: it keeps the seconds of the run that made its
        output (and is marked `reused`), so the report's step durations stay those of the work.
        """
        echo(f"--- {name}")
        previous = self.state["steps"].get(name, {})
        values = {key: config_dict(value) for key, value in (settings or {}).items()}
        redo = False
        # done, failed or interrupted alike: what the folder holds was made (or half made) with the recorded settings;
        # steps recorded before the values were kept have none to compare
        if "values" in previous:
            changed = changed_settings(previous["values"], values)
            if changed and not self.force:
                raise SettingsChangedError(
                    f"{self.path.parent}: the step {name!r} ran with other settings ({'; '.join(changed)}); pass `lum run --force` to "
                    "redo it and the steps that depend on it, or use another run_dir")
            if changed:
                echo(f"{name}: settings changed ({'; '.join(changed)}): redone (--force)")
                redo = True
        digest = settings_hash(values)
        record = {"settings": digest, "values": values}
        started = time.perf_counter()
        self.state["steps"][name] = {"status": "running", **record, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._write()
        try:
            result = fn(redo)
        except BaseException:
            self.state["steps"][name] = {"status": "failed", **record, "seconds": round(time.perf_counter() - started, 1)}
            self._write()
            raise
        seconds = round(time.perf_counter() - started, 1)
        reused = isinstance(result, str) and result == UP_TO_DATE
        if reused and previous.get("status") == "done" and "seconds" in previous:
            # nothing was redone: the duration stays that of the run which made the output
            self.state["steps"][name] = {"status": "done", **record, "seconds": previous["seconds"], "reused": True}
        else:
            self.state["steps"][name] = {"status": "done", **record, "seconds": seconds, **({"reused": True} if reused else {})}
        self._write()
        return result

    def forget_failed(self, name: str) -> None:
        """Drop the record of step `name` if it failed: for a step that writes nothing (it only checks what another
        command put there), a failed attempt left nothing made with its settings."""
        if self.state["steps"].get(name, {}).get("status") == "failed":
            del self.state["steps"][name]

    def settings_of(self, name: str) -> str:
        """The settings hash step `name` last ran with ("" when it never ran): what a step reading its output records."""
        return self.state["steps"].get(name, {}).get("settings", "")

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
