import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Bitwise comparisons between runs need the same reduction order.
    torch.set_num_threads(1)
    yield
