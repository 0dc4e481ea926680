"""Shared fixtures: a CPU generator per test; one torch thread per test process; the disk given back.

The suite runs in parallel (pytest-xdist, one worker per core), and most tensors here are tiny: several
threads per process would only fight over the cores. Subprocesses (train.py, DDP ranks) inherit the setting.

Disk: the runs the tests make write checkpoints, and the whole suite writes about 12 GB. pytest keeps every
temporary folder of a session by default, so a small CI disk filled up and every later test failed in its
setup. pyproject.toml sets `tmp_path_retention_policy = "failed"` (a passing test's tmp_path goes at its
teardown); the module-scoped runs made with tmp_path_factory go when their module is done, unless one of its
tests failed (kept to look at, as pytest keeps a failed test's tmp_path).
"""

import os
import shutil

os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


_FAILED_MODULES: set[str] = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        _FAILED_MODULES.add(item.nodeid.split("::")[0])
    return report


@pytest.fixture(scope="module", autouse=True)
def _module_folders_removed(request, tmp_path_factory):
    """Remove the folders a module's tests and fixtures made under this worker's basetemp, once it is done.

    Autouse and module-scoped, so it is set up before the module's own module fixtures and torn down after
    them. There are no session-scoped folders (a module's folders are its own).
    """
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if request.node.nodeid in _FAILED_MODULES:
        return
    for path in set(base.iterdir()) - before:
        shutil.rmtree(path, ignore_errors=True)


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
