"""Shared test helpers. Real-data tests skip when the datasets are absent, but fail on CI (CI=true)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bdjax.data import default_data_root
from bdjax.errors import DataError


def require_data_root(name: str | None = None) -> Path:
    """The local data root (and <root>/<name> exists); skip if missing, or fail when CI=true."""
    try:
        root = default_data_root()
        why = "no data root (set BDJAX_DATA_ROOT or provide ../shared/datasets)"
    except DataError as e:
        root, why = None, str(e)
    if root is not None and name is not None and not any((root / n).exists() for n in (name, f"{name}.npz")):
        root, why = None, f"dataset {name!r} not found under {root}"
    if root is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real data required on CI: {why}")
        pytest.skip(f"real data unavailable: {why}")
    return root


@pytest.fixture
def data_root() -> Path:
    return require_data_root()
