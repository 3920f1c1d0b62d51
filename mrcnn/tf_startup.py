"""Import TensorFlow without its C++ start-up lines on stderr.

Loading TensorFlow's shared libraries prints, before any log level applies and twice (one
pass per library), ``WARNING: All log messages before absl::InitializeLog() ...`` and
``I... port.cc] oneDNN custom operations are on ...`` (plus CPU-feature notes). They are not
ours and they bury our own output, so the first ``import tensorflow`` after ``import mrcnn``
runs with file descriptor 2 captured; afterwards every captured line that is not one of those
known notices is written back to stderr (real errors stay visible). Nothing changes when
TensorFlow was imported before ``mrcnn``, or when ``MRCNN_TF_STARTUP_LINES=1`` is set.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import tempfile
from types import ModuleType

#: Start-up notices of TensorFlow's C++ runtime that are dropped.
NOTICE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)"
                    r"|[IW]\d{4} [\d:. ]+\d+ (port|cpu_feature_guard)\.cc:\d+\]"
                    r"|To enable the following instructions:)")


def drop_notices(text: str) -> str:
    """``text`` without TensorFlow's start-up notices (line by line)."""
    return "".join(line for line in text.splitlines(keepends=True) if not NOTICE.match(line))


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of ``tensorflow`` with stderr (fd 2) captured and filtered."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                self.loader.exec_module(module)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                rest = drop_notices(captured.read().decode("utf-8", "replace"))
                if rest:
                    os.write(2, rest.encode("utf-8"))


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once (through the other finders) and wraps its loader."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != "tensorflow":
            return None
        uninstall()
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


_FINDER = _QuietTensorFlowFinder()


def install() -> None:
    """Filter the start-up lines of the next ``import tensorflow`` (no-op if already imported)."""
    if "tensorflow" in sys.modules or os.environ.get("MRCNN_TF_STARTUP_LINES") == "1":
        return
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Remove the import hook (done by itself at the first ``import tensorflow``)."""
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
