"""Shared test fixtures."""
import pytest

from featcal.utils import torch_threads


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a 2-core box: thread hand-offs cost more than the work. Restored after the module."""
    with torch_threads(1):
        yield
