"""`run_state.json`: each step's state, settings hash and duration, updated as steps finish (`lum status` reads it)."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable

from contracts.files import write_json_atomic
from pipelines.paths import RunPaths
from pipelines.run.config import RunConfig, config_dict, settings_hash
from pipelines.steps import UP_TO_DATE

STATE_FILE = "run_state.json"
UPSTREAM_CHANGED = "the step it reads from"  # how a changed `after` (the hash of the step read from) is named


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


RUN_RELATIVE_KEYS = {"embeddings"}  # settings recorded relative to the run folder (pipelines/run/execute.py run_relative)


def changed_settings(recorded: dict[str, Any], now: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """`key: <recorded> before, <now> now` for every setting that differs (added and removed keys included).

    `defaults` ({section: its default config}, as `now`): a setting the recorded step does not name (it did not exist
    when the step ran) is no change while its value is its default, which is what the step did without it; so a run
    made by an earlier version resumes."""
    before, after = flat_settings(recorded), flat_settings(now)
    missing = object()
    default = flat_settings(defaults or {})
    new_at_default = {key for key in set(after) - set(before) if key in default and default[key] == after[key]}
    for key in RUN_RELATIVE_KEYS & set(before) & set(after):  # recorded absolute by an earlier version: the same
        old, new = before[key], after[key]  # folder of the run when it ends with the run-relative path recorded now
        if isinstance(old, str) and isinstance(new, str) and Path(old).is_absolute() and not Path(new).is_absolute() and old.endswith("/" + new):
            before[key] = new

    def line(key: str) -> str:
        if key == "after":  # the settings hash of the step whose output this one reads
            return f"{UPSTREAM_CHANGED} ran with other settings ({before.get(key) or '(none)'} before, {after.get(key) or '(none)'} now)"
        if key == "rankers":  # the retrieval A/B: the settings hashes of the rankers that order its candidates
            return f"{UPSTREAM_CHANGED}: a ranker ran with other settings"
        return f"{key}: {before.get(key, '(not set)')!r} before, {after.get(key, '(not set)')!r} now"

    return [line(key) for key in sorted(set(before) | set(after) - new_at_default) if before.get(key, missing) != after.get(key, missing)]


def default_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """{section: the default of its config class} for the sections of a step's settings that are configs whose every
    field has a default (what `changed_settings` compares a setting the recorded step lacks with)."""
    out = {}
    for key, value in settings.items():
        if is_dataclass(value) and not isinstance(value, type):
            try:
                out[key] = config_dict(type(value)())
            except (TypeError, ValueError):  # a config without a default for some field, or one its defaults fail
                continue
    return out


@dataclass(frozen=True)
class StepChange:
    """A step of the run folder `run_dir` whose settings differ from those it ran with: `changed` names each setting."""

    run_dir: str
    step: str
    changed: list[str]

    @property
    def only_upstream(self) -> bool:
        """Only what it reads changed (a step before it is redone), none of its own settings."""
        return all(line.startswith(UPSTREAM_CHANGED) for line in self.changed)


def describe_changes(changes: list[StepChange]) -> str:
    """The up-front refusal of `lum run` without --force: every step whose own settings changed, with each setting,
    then the steps that are redone only because they read the output of one of those."""
    lines = []
    for run_dir in dict.fromkeys(c.run_dir for c in changes):
        here = [c for c in changes if c.run_dir == run_dir]
        lines.append(f"{run_dir}:")
        lines += [f"  the step {c.step!r} ran with other settings ({'; '.join(c.changed)})" for c in here if not c.only_upstream]
        downstream = [repr(c.step) for c in here if c.only_upstream]
        if downstream:
            lines.append(f"  and, reading their output, {', '.join(downstream)}")
    return ("settings changed since these steps ran; nothing was run:\n" + "\n".join(lines) +
            "\npass `lum run --force` to redo these steps (only these), or use another run_dir")


class RunState:
    """The run's config and, per step: status (running | done | failed), seconds, the settings it ran with (and their
    hash), reused.

    A step that ran once is checked against the settings it ran with: the same settings skip to the step's own
    up-to-date check, other settings are a `SettingsChangedError` naming each changed setting, unless the run is
    `force`d, when the step is redone (its function gets `redo=True` and replaces its output). A step's settings hold
    what it reads from the steps before it (the dataset's fingerprint, the model version, ...), so redoing one step
    makes the steps that depend on it differ in turn and be redone too, and only those.
    """

    def __init__(self, paths: RunPaths, config: RunConfig, force: bool = False, check: list[StepChange] | None = None):
        """`check`: a list to collect the steps whose settings changed into, instead of running anything (`step`
        then only compares and records in memory, so that `settings_of` gives the hashes the steps would have)."""
        self.path = paths.root / STATE_FILE
        self.force = force
        self.check = check
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
        defaults = default_settings(settings or {})
        redo = False
        # done, failed or interrupted alike: what the folder holds was made (or half made) with the recorded settings;
        # steps recorded before the values were kept have none to compare
        if "values" in previous:
            changed = changed_settings(previous["values"], values, defaults)
            if not changed:  # the same settings (a new one at its default included): the recorded hash stands, so the
                values = previous["values"]  # steps reading this one's output see no change either
            if self.check is not None:
                if changed:
                    self.check.append(StepChange(str(self.path.parent), name, changed))
                self.state["steps"][name] = {**previous, "settings": settings_hash(values), "values": values}
                return None
            if changed and not self.force:
                raise SettingsChangedError(
                    f"{self.path.parent}: the step {name!r} ran with other settings ({'; '.join(changed)}); pass `lum run --force` to "
                    "redo it and the steps that depend on it, or use another run_dir")
            if changed:
                echo(f"{name}: settings changed ({'; '.join(changed)}): redone (--force)")
                redo = True
        digest = settings_hash(values)
        if self.check is not None:  # a step that never ran (or ran before settings were recorded): nothing to compare
            self.state["steps"][name] = {**previous, "settings": digest, "values": values}
            return None
        record = {"settings": digest, "values": values}
        started = time.perf_counter()
        # who runs it: `lum status` tells a step still running from one whose process was killed (no code of its own
        # runs then, so the record stays "running")
        self.state["steps"][name] = {"status": "running", **record, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     "pid": os.getpid(), "host": socket.gethostname()}
        self._write()
        try:
            result = fn(redo)
        except BaseException as exc:
            # Ctrl-C (or a SIGTERM turned into SystemExit) stopped it: nothing is wrong with the step itself
            status = "interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "failed"
            self.state["steps"][name] = {"status": status, **record, "seconds": round(time.perf_counter() - started, 1)}
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
        write_json_atomic(self.state, self.path, default=float)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has this pid (a zombie counts as alive until its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def step_state(record: dict[str, Any]) -> str:
    """A step's state for `lum status`: its recorded status, except that a step recorded as running whose process
    is gone (killed: it could not record anything) is `interrupted`. Only a process of this host can be checked: a
    step running on another host (a shared disk) stays `running`, as does one recorded before pids were."""
    status = str(record.get("status", "?"))
    pid = record.get("pid")
    if status == "running" and isinstance(pid, int) and record.get("host") == socket.gethostname() and not pid_alive(pid):
        return "interrupted"
    return status


# `lum status`'s exit code (docs/run.md): a scheduler or script can wait on a run without parsing the table
STATUS_EXIT = {"done": 0, "failed": 1, "running": 3}


def status_exit_code(rows: list[dict[str, Any]]) -> int:
    """0 every recorded step done; 1 a step failed or was interrupted; 3 a step is running (and none failed)."""
    states = {r["state"] for r in rows}
    if states & {"failed", "interrupted"}:
        return STATUS_EXIT["failed"]
    if states - {"done"}:
        return STATUS_EXIT["running"]
    return STATUS_EXIT["done"]


def read_status(paths: RunPaths) -> list[dict[str, Any]]:
    """One row per recorded step of a run folder: step, state (done, running, failed, interrupted), seconds,
    settings hash, reused, and for a step running (or killed while running) its pid and host."""
    path = paths.root / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{paths.root} has no {STATE_FILE}: no `lum run` has started there")
    try:
        steps = json.loads(path.read_text())["steps"]
        rows = []
        for name, s in steps.items():
            row = {"step": name, "state": step_state(s), "seconds": s.get("seconds"), "settings": s.get("settings", ""),
                   "reused": bool(s.get("reused", False))}
            if s.get("status") == "running":
                row.update(pid=s.get("pid"), host=s.get("host"), started=s.get("started"))
            rows.append(row)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a run state file: {exc}") from exc
    return rows
