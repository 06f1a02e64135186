from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


def missing_real_data(reason: str) -> None:
    """Skip a test whose real data is absent, unless ``KDSCALE_REQUIRE_DATA=1`` (CI), where a
    missing ``../shared/data`` (or a folder of it) is a failure: a silently skipped real-data
    test would let CI pass without ever reading real data."""
    if os.environ.get("KDSCALE_REQUIRE_DATA") == "1":
        pytest.fail(f"{reason} (KDSCALE_REQUIRE_DATA=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        missing_real_data(f"real data folder {SHARED_DATA} is absent (expected ../shared/data beside the repo)")
    return SHARED_DATA
