"Shared pytest fixtures."
import pytest


@pytest.fixture(scope="module")
def one_thread():
    "Tiny models run fastest on one thread, and are not slowed by thread contention on a busy machine (restored afterwards)."
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
