"""Repository-wide pytest setup: `gpu` tests skip without CUDA; quiet, deterministic defaults."""

from __future__ import annotations

import os

import pytest

# nox and scripts/test.sh already export these before Python starts (huggingface_hub reads them at
# import time); setting them here too covers a bare `pytest` call from the project environment.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MMR_NO_PROGRESS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
