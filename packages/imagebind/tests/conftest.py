"""Fixtures shared by the ImageBind tests.

``one_thread`` is opt-in per module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the modules of
tiny models use it, the parity and export tests at the named sizes keep every thread.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread per test: the tensors are tiny, and more threads only spin-wait on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
