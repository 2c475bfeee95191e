import os

import pytest
import torch

# Two cores on CI: one intra-op thread per test process keeps timings predictable.
torch.set_num_threads(int(os.environ.get("HARNESS_TEST_THREADS", "1")))


@pytest.fixture
def results_dir(tmp_path):
    return tmp_path / "results"
