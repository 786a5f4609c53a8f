"""Triton kernels of genjo_fast, installed as ``genjo_fast.kernels``.

One op per file: ``<op>.py`` holds the ``@triton.jit`` kernel and its launcher; the plain-torch
oracle lives in ``genjo_fast`` and the tests in ``tests/test_<op>.py``.
"""
