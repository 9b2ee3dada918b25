"""Atomic file writes: a reader sees the old file or the new one, never half a file.

Every write goes to a temporary file beside the target (`.<name>.tmp` in the same folder, so the rename never
crosses a file system) and is renamed onto the target when it is complete. A write that fails removes its
temporary file and leaves an existing target as it was. A process killed mid-write leaves only the hidden
temporary file, which the next write of the same target overwrites.

    write_json_atomic({"complete": True}, out / "manifest.json")
    with atomic_path(out / "model.pt") as tmp:   # any writer that takes a path (torch.save, np.savez, ...)
        torch.save(state, tmp)

No fsync: this protects readers from partial files and crashed writers, not a file system from a power cut.
`file_sha256` says whether an input file is the same one (by content, not by name or time).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "atomic_path",
    "copy_file_atomic",
    "temporary_name",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_parquet_atomic",
    "write_text_atomic",
]


def temporary_name(path: str | Path, suffix: str = "") -> Path:
    """The temporary file a write of `path` goes through: `.<name>.tmp<suffix>` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{suffix}")


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; renamed onto `path` on a clean exit, removed on an error.

    `suffix` is for writers that insist on an extension (`np.savez` appends `.npz` to a name without one).
    The target's folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
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
