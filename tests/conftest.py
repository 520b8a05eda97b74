"""Shared test fixtures."""
import os

import pytest
import torch

from featcal.utils import torch_threads


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped (not failed) where no CUDA device exists."""
    if torch.cuda.is_available() or os.environ.get("FEATCAL_TEST_GPU_DEVICE"):
        return  # FEATCAL_TEST_GPU_DEVICE=cpu: run the gpu checks on that device (checks the tests)
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a 2-core box: thread hand-offs cost more than the work. Restored after the module."""
    with torch_threads(1):
        yield
