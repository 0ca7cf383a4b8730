"""Fixtures of the evaluation tests (helpers in colour_model.py)."""

from __future__ import annotations

import pytest

from colour_model import make_colour_dataset


@pytest.fixture
def colour_dataset(tmp_path):
    return make_colour_dataset(tmp_path)
