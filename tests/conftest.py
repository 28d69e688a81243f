"""Shared pytest fixtures. Keep each fixture small; add only what a test file needs."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted default model (SmolLM2-135M-Instruct); converted once, then read from cache."""
    from model.default import default_model_dir as get

    return get()
