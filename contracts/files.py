"""Atomic file writes: a reader sees the old file or the new one, never half a file.

Every write goes to a temporary file beside the target (`.<name>.<host>.<pid>.<random>.tmp` in the same folder,
so the rename never crosses a file system) and is renamed onto the target when it is complete. The name is the
writer's own: two writers of the same target (two threads, two processes) never write into each other's file, and
the target is then one of their complete contents, the last renamed. A write that fails removes its temporary
file and leaves an existing target as it was. A process killed mid-write leaves only its hidden temporary file,
which the next write of the same target on the same host removes (its pid is dead).

    write_json_atomic({"complete": True}, out / "manifest.json")
    with atomic_path(out / "model.pt") as tmp:   # any writer that takes a path (torch.save, np.savez, ...)
        torch.save(state, tmp)

No fsync: this protects readers from partial files and crashed writers, not a file system from a power cut.
`file_sha256` says whether an input file is the same one (by content, not by name or time).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "atomic_path",
    "copy_file_atomic",
    "remove_abandoned",
    "temporary_name",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_parquet_atomic",
    "write_text_atomic",
]


# the host in a temporary name: the pid in it means something only there (a run folder may be on a shared disk)
_HOST = re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname().split(".")[0])[:24] or "host"


def temporary_name(path: str | Path, suffix: str = "") -> Path:
    """A temporary file of this writer for a write of `path`: `.<name>.<host>.<pid>.<random>.tmp<suffix>` in the
    same folder (unique per call, so concurrent writers of one target never share it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_abandoned(path: str | Path, suffix: str = "") -> list[Path]:
    """Remove the temporary files of writes of `path` whose writer (a process of this host) is dead: what a
    process killed mid-write left. Those of live writers, and of other hosts, stay. Returns what was removed."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.{re.escape(_HOST)}\.(\d+)\.[0-9a-f]{{8}}\.tmp{re.escape(suffix)}$")
    removed = []
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.{_HOST}.*.tmp{glob.escape(suffix)}"):
        found = pattern.match(leftover.name)
        if found and not _pid_alive(int(found.group(1))):
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; renamed onto `path` on a clean exit, removed on an error.

    `suffix` is for writers that insist on an extension (`np.savez` appends `.npz` to a name without one).
    The target's folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(path, suffix)
    tmp = temporary_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None and exc.errno:
            # pyarrow's and numpy's write errors (a full disk) name no file: name the target, same errno and class
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave half a file behind, even on Ctrl-C
        raise


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(text: str, path: str | Path) -> None:
    """UTF-8 text."""
    write_bytes_atomic(text.encode("utf-8"), path)


def write_json_atomic(payload: Any, path: str | Path, *, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> str:
    """`json.dumps(payload, indent=indent, default=default)` written atomically; returns the text written."""
    text = json.dumps(payload, indent=indent, default=default)
    write_text_atomic(text, path)
    return text


def write_parquet_atomic(table: pa.Table, path: str | Path, **options: Any) -> None:
    """`pq.write_table(table, ..., **options)` (default: pyarrow's options), written atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **options)


def copy_file_atomic(source: str | Path, path: str | Path) -> None:
    """Copy the bytes of `source` to `path` (no metadata), atomically."""
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 8 MiB blocks (what makes two inputs the same input, whatever their names)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
