"""One writer per run folder: `run_lock(run_dir, "lum run")` around anything that writes into it.

A second `lum run`, `lum data import` (or any command that takes the lock) on the same folder is refused at once
with a `RunLockedError` naming the holder's pid, host and command, instead of two writers interleaving their steps
and their `run_state.json`.

The lock is `fcntl.flock` on `<run_dir>/.lum.lock`, not a pid file: the kernel releases it when the holding process
dies, however it dies (SIGKILL included), so a stale lock never blocks. The file itself stays (deleting a lock file
races with a process opening it); what it holds (pid, host, command, start time) is only there to name the holder.
flock is advisory and, on NFS, only as good as the server's lock support: it guards against our own commands, not
against arbitrary writers.

Re-entrant: a process that holds a folder's lock may take it again (the run's steps call what the single-step
commands call), and so may the processes it starts (the embedding job runs `lum embed` as a child): the held
locks are listed in the environment variable LUM_HELD_RUN_LOCKS, which children inherit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK_FILE = ".lum.lock"
HELD_ENV = "LUM_HELD_RUN_LOCKS"

_held: set[str] = set()  # the lock files this process holds (for re-entry)


class RunLockedError(FileExistsError):
    """Another process writes into the run folder. (A FileExistsError so that every command shows it as a one-line
    error, as it does a step's output that exists.)"""


def lock_file(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / LOCK_FILE


def _inherited() -> set[str]:
    return set(filter(None, os.environ.get(HELD_ENV, "").split(os.pathsep)))


def read_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """What the holder of a run folder's lock wrote about itself (pid, host, command, started), or None when the
    lock file is missing, empty (being taken, or released) or unreadable. Says nothing about whether it is held."""
    try:
        text = lock_file(run_dir).read_text()
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def is_locked(run_dir: str | Path) -> bool:
    """Whether some process holds the run folder's lock now (taken and released at once when it is free)."""
    path = lock_file(run_dir)
    if str(path) in _held:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (it has not written its pid yet)"
    return (f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')}: {holder.get('argv')}), "
            f"since {holder.get('started')}")


@contextmanager
def run_lock(run_dir: str | Path, command: str) -> Iterator[None]:
    """Hold `run_dir`'s lock (the folder is created if needed) while the block runs; `command` names this writer in
    the message another writer gets (`lum run`, `lum data import files`). Refused at once, never waits: a
    `RunLockedError` naming the holder."""
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = lock_file(root)
    key = str(path)
    if key in _held or key in _inherited():  # this process, or the one that started it, holds it
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(root)
            for _ in range(10):  # just taken: the holder writes its pid right after
                if holder:
                    break
                time.sleep(0.05)
                holder = read_holder(root)
            raise RunLockedError(f"{root} is in use by {describe_holder(holder)}: wait until it finishes (or stop it), "
                                 "or use another run folder") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "argv": shlex.join(sys.argv)[:300],
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        before = os.environ.get(HELD_ENV)
        _held.add(key)
        os.environ[HELD_ENV] = os.pathsep.join(sorted(_inherited() | {key}))
        try:
            yield
        finally:
            _held.discard(key)
            if before is None:
                os.environ.pop(HELD_ENV, None)
            else:
                os.environ[HELD_ENV] = before
            os.ftruncate(fd, 0)  # no holder to name any more (while still locked: nobody reads a half-cleared file)
    finally:
        os.close(fd)  # releases the lock


def writer_lock(run_dir: str | Path, command: str) -> contextlib.AbstractContextManager:
    """`run_lock` for a command that may run under torchrun: only rank 0 (or a plain process) takes the lock; the
    other ranks are its workers, started beside it by torchrun rather than by it."""
    if os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return run_lock(run_dir, command)
