"""Shared test settings: one thread per process (a rank stands for a device), CUDA-marked tests skipped
without CUDA."""

import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_addoption(parser):
    parser.addoption("--zoo", default="", help="comma-separated zoo families for tests/test_zoo.py (default: all)")


@pytest.fixture(autouse=True)
def _restore_diffusers_attention_backend():
    """diffusers' ``set_attention_backend`` also sets a process-wide default backend: each test starts from the one
    before it and leaves it as it found it."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry._active_backend = active
