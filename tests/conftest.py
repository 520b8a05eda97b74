"""Shared test fixtures.

The suite mirrors the package (tests/io, backbone, tasks, suites, merge, calibration, report,
run); builders shared by several test modules live in the ``tests.fixtures`` package, and the
pytest fixtures among them are made visible to every test module here. No test module imports
another (tests/test_layout.py checks it)."""
import os

import pytest
import torch

from featcal.utils import torch_threads
# module-scoped tiny worlds: a CLIP vision tower and a Llama decoder with fine-tuned experts
# (the FeatCal driver, device, TF32 and GPU tests), and the FLAN-T5/GLUE world with its adapter
# and models loaded (the T5 unit, end-to-end and GPU tests)
from tests.fixtures.featcal_worlds import clip_world, llama_world  # noqa: F401
from tests.fixtures.t5 import models, w  # noqa: F401


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


@pytest.fixture(scope="session")
def default_suite_cache(tmp_path_factory):
    """One FEATCAL_CACHE for the runs of the embedded default in this session: the first run
    (normally tests/run/test_default_run.py: cold, as a new user) builds the suite there,
    later ones (the wheel's default run) reuse that build."""
    return tmp_path_factory.mktemp("default_suite_cache")
