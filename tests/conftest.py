import os
import sys

import pytest

# Make `distributed_helper` and the repository root importable from every test (and from the
# processes it spawns, which inherit sys.path).
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

# Asked once, with the environment the run started with: CUDA reads CUDA_VISIBLE_DEVICES when it
# first initialises, so the fixture below hiding the GPUs from the CPU tier cannot hide them
# from the gpu tier later in the same run.
CUDA_AVAILABLE = torch.cuda.is_available()
GPU_TIER_SKIP = "gpu tier: needs a CUDA device (none visible); run `python -m pytest -m gpu` on a GPU machine"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with one reason, where there is no CUDA device."""
    if CUDA_AVAILABLE:
        return
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason=GPU_TIER_SKIP))


@pytest.fixture(autouse=True)
def _cpu_tier_runs_on_the_cpu(request, monkeypatch):
    """Every test not marked ``gpu`` runs on the CPU, also on a machine with GPUs: its numbers are
    CPU numbers (gloo, fp32 references, megatron-core's CPU shims), and its multi-process
    commands start more processes than a machine has GPUs. So CUDA is hidden from the test
    (``torch.cuda.is_available()`` is False) and from every process it starts
    (``CUDA_VISIBLE_DEVICES=``)."""
    if not CUDA_AVAILABLE or request.node.get_closest_marker("gpu"):
        return
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
