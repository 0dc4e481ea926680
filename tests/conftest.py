"""Shared fixtures: a CPU generator per test; one torch thread per test process.

The suite runs in parallel (pytest-xdist, one worker per core), and most tensors here are tiny: several
threads per process would only fight over the cores. Subprocesses (train.py, DDP ranks) inherit the setting.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
