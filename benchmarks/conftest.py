"""Helpers for the benchmarks: device selection and peak-memory measurement."""
import contextlib
import os
import re
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels' tiny cases run on CPU tensors through the interpreter. Set
# before any kernel module is imported: @triton.jit reads it when the kernel is defined.
# (auto backends never pick the interpreter, so the other benchmarks are unaffected.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _read_status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


@contextlib.contextmanager
def peak_memory(device: torch.device, result: dict):
    """Measures the peak memory added while the block runs, in bytes, into result["peak"].

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the process's peak resident set
    (VmHWM), reset before the block through ``/proc/self/clear_refs``.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield
        torch.cuda.synchronize()
        result["peak"] = torch.cuda.max_memory_allocated() - base
        return
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    base = _read_status("VmRSS")
    yield
    result["peak"] = _read_status("VmHWM") - base


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
