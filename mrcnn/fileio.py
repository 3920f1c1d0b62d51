"""Atomic file writes and JSON-safe values: the one implementation every writer uses.

A file is written to a temporary file in the same folder, then renamed over its final name
(``os.replace``, atomic on POSIX and Windows): a reader, or a run killed at any moment, sees the
old file or the new one, never a torn one. The temporary name is short and independent of the
target's name (``.tmp-<pid>-<8 hex><suffix>``), so a legal target name of up to 255 bytes never
makes an over-long temporary name. ``durable=True`` also syncs the file before the rename and the
folder after it (power loss, OS crash), as checkpoints and ``training.csv`` need.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

#: Every temporary file starts with this (stale ones left by a killed process can be globbed).
TEMP_PREFIX = ".tmp-"


def temp_path_for(path: str | os.PathLike, suffix: str | None = None) -> Path:
    """A fresh temporary path next to ``path``: ``.tmp-<pid>-<8 hex>`` plus ``suffix`` (default:
    ``path``'s own suffix, for writers that choose the format by it)."""
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    return path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries, to disk; quietly nothing where the OS cannot
    (e.g. folders on Windows). Used before and after renaming a finished temporary file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder (same suffix) for a writer that needs a path
    (matplotlib ``savefig``, h5py, ``np.savez``); renamed over ``path`` when the block ends without
    an exception, removed otherwise. Creates the folder. ``durable``: fsync file, rename, fsync folder.
    ``suffix`` replaces the temporary file's suffix, e.g. ``".tmp"`` so that a file left by a killed
    process never looks like a checkpoint (``*.h5``) or a cache entry (``*.npz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path, suffix)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)  # the data is on disk before the new name points at it
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)  # ... and the rename itself
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()  # only still there when the block or the rename failed


def write_bytes_atomic(path: str | os.PathLike, data: bytes, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path`` as a Path."""
    with atomic_path(path, durable=durable) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, durable: bool = False) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (newlines written as given)."""
    return write_bytes_atomic(path, text.encode("utf-8"), durable=durable)


def write_json_atomic(path: str | os.PathLike, payload: Any, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write ``json_safe(payload)`` as indented JSON plus a newline to ``path`` atomically."""
    text = json.dumps(json_safe(payload), indent=indent, sort_keys=sort_keys, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def json_safe(value: Any) -> Any:
    """``value`` with only JSON types, recursively: numpy arrays and tuples -> lists, numpy scalars ->
    numbers, NaN / Inf -> None, Path -> str, callables -> their ``__name__`` (numpy dict keys too)."""
    if isinstance(value, dict):
        return {(k.item() if isinstance(k, np.generic) else k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if callable(value):
        return getattr(value, "__name__", repr(value))
    return value
