"""Shared test fixtures: where ../shared is, and quiet TensorFlow logging."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

#: ``../shared`` next to the checkout (CI has it, users do not); LESIONS_SHARED overrides.
SHARED_DIR = Path(os.environ.get("LESIONS_SHARED", REPO_ROOT.parent / "shared"))
REFERENCE_DIR = SHARED_DIR / "reference"
DATA_DIR = SHARED_DIR / "data"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``../shared/reference``; the test is skipped when it is absent."""
    if not (REFERENCE_DIR / "matterport_reference_outputs.npz").exists():
        pytest.skip("../shared/reference not present")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``../shared/data``; the test is skipped when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip("../shared/data not present")
    return DATA_DIR
