"""Helpers for the CLI tests: run ``lesions.py`` in a subprocess and check its answers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LESIONS = REPO / "lesions.py"
TINY = REPO / "tests" / "data" / "tiny.toml"
#: Lines TensorFlow's C++ runtime prints at import before its log level applies (not ours).
TF_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} \d\d:\d\d:\d\d)")


def run_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python lesions.py ARGS`` in ``cwd``; text output captured."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(LESIONS), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def snapshot(folder: Path) -> set[str]:
    """Every path under ``folder`` (to check nothing was written)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def assert_user_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, exactly one stderr line starting ``lesions: error:``, no traceback; returns it."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not TF_NOISE.match(line)]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("lesions: error: "), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]
