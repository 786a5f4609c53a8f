"""Shared fixtures: tiny random models built in-process (no downloads)."""
import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter. Set before any
# kernel module is imported: @triton.jit reads it when the kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The models here are tiny: one thread is as fast, and immune to OpenMP threads spinning
# against other processes on a small shared machine (a 100x slowdown seen otherwise).
torch.set_num_threads(1)

from genjo_fast.testing import TinyBidirectionalLM  # noqa: E402

VOCAB = 130
MASK_ID = VOCAB - 1
EOS_ID, EOT_ID, PAD_ID = 48, 117, 48  # stand-ins for LLaDA's 126081 / 126348: the ids
# the tiny model predicts most often, so that the EOS options change outcomes


@pytest.fixture(scope="session")
def tiny_model():
    return TinyBidirectionalLM(VOCAB, d_model=32, n_heads=2, n_layers=2, seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
