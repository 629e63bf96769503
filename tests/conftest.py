import os

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter (slow, exact). It must be set before any
# kernel module is imported: triton.jit reads it when it decorates.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_QAT_BACKEND", "auto")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
