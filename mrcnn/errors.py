"""The one base class of every error that is the caller's mistake, not a bug.

A :class:`UserError` carries a one-line message that names what is wrong and where (a file, a
config key, a folder) in words a library caller understands: it never names a command-line flag.
``lesions.py`` prints such an error as ``lesions: error: <message>`` with exit status 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the caller: a file, a folder, a config value, a weights file (one line)."""


class TrainingDivergedError(RuntimeError):
    """A training loss became NaN or Inf; the message names the step and the losses (exit status 1)."""
