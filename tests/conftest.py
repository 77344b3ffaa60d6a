"""Shared test settings: one torch thread per test process (the CI machine has 2 shared cores)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # On 2 shared cores, torch's default thread pool made conv/VGG tests 5-10x slower than one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
