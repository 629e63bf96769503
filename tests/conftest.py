import os

import pytest
import torch

# Tests run on CPU, deterministically; the Triton tests set TRITON_INTERPRET themselves.
os.environ.setdefault("HF_QAT_BACKEND", "auto")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
