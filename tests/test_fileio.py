"""mrcnn.fileio: atomic writes (no torn or left-over files, long names) and json_safe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mrcnn import fileio


def test_write_bytes_text_json_atomic(tmp_path):
    assert fileio.write_bytes_atomic(tmp_path / "a.bin", b"123") == tmp_path / "a.bin"
    assert (tmp_path / "a.bin").read_bytes() == b"123"
    fileio.write_text_atomic(tmp_path / "sub" / "b.txt", "é\r\n", durable=True)  # creates the folder
    assert (tmp_path / "sub" / "b.txt").read_bytes() == "é\r\n".encode()
    fileio.write_json_atomic(tmp_path / "c.json", {"x": np.float32(0.5), "y": (1, 2)})
    assert (tmp_path / "c.json").read_text() == '{\n  "x": 0.5,\n  "y": [\n    1,\n    2\n  ]\n}\n'
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "b.txt", "c.json", "sub"]


def test_a_250_character_name_is_written(tmp_path):
    """The temporary name does not grow with the target's: 250 + any prefix/suffix would pass 255 bytes."""
    name = "x" * 246 + ".png"
    fileio.write_bytes_atomic(tmp_path / name, b"png", durable=True)
    with fileio.atomic_path(tmp_path / ("y" * 245 + ".json")) as tmp:
        assert len(tmp.name) < 40 and tmp.suffix == ".json" and tmp.parent == tmp_path
        tmp.write_text("{}")
    assert sorted(len(p.name) for p in tmp_path.iterdir()) == [250, 250]


def test_failures_leave_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), fileio.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        fileio.write_bytes_atomic(target, b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"] and target.read_bytes() == b"old"


def test_atomic_path_keeps_or_replaces_the_suffix(tmp_path):
    with fileio.atomic_path(tmp_path / "entry.npz") as tmp:
        assert tmp.name.startswith(fileio.TEMP_PREFIX) and tmp.suffix == ".npz"
        np.savez(tmp, a=np.arange(3))  # np.savez would append .npz to a path without it
    np.testing.assert_array_equal(np.load(tmp_path / "entry.npz")["a"], [0, 1, 2])
    assert fileio.temp_path_for(tmp_path / "w.h5", suffix=".tmp").suffix == ".tmp"
    assert fileio.temp_path_for(tmp_path / "w.h5") != fileio.temp_path_for(tmp_path / "w.h5")


def test_json_safe():
    def scorer():
        pass

    value = {
        "array": np.array([[1, 2], [3, 4]], np.int64), "scalar": np.float64(0.25), "int": np.int32(3),
        "nan": math.nan, "inf": np.float32(np.inf), "nested": {"t": (1.5, np.nan), "p": Path("a/b")},
        "call": scorer, "cls": int, "bool": np.bool_(True), "none": None, np.int64(7): "numpy key",
    }
    assert fileio.json_safe(value) == {
        "array": [[1, 2], [3, 4]], "scalar": 0.25, "int": 3, "nan": None, "inf": None,
        "nested": {"t": [1.5, None], "p": "a/b"}, "call": "scorer", "cls": "int", "bool": True, "none": None,
        7: "numpy key",
    }
    json.dumps(fileio.json_safe(value), allow_nan=False)


def test_fsync_path_is_quiet_where_it_cannot(tmp_path):
    fileio.fsync_path(tmp_path)
    fileio.fsync_path(tmp_path / "missing")
