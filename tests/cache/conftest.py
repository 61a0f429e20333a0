"""Fixtures of the cache tests."""

import pytest


@pytest.fixture
def url(tmp_path) -> str:
    return str(tmp_path / "teacher.zarr")
