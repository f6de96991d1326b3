"""Test-session set-up shared by tests/ and benchmarks/.

Without a CUDA device the Triton kernels run in the Triton interpreter, which must be switched on
before triton is first imported; hence this file, which pytest loads before any test module.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# Every kernel launch in the tests must be a specialization declared for the AOT compile gate.
os.environ["TRITONDET_CHECK_SPECS"] = "1"

import pytest

from tritondet import _backend

# --gpu-mode: GPU behaviour the interpreter hides (program order, uninitialized memory, fast math, grid limits).
pytest_plugins = ["tests.gpu_modes"]


@pytest.fixture(params=["reference", "triton", "cpu"])
def backend(request, monkeypatch):
    """Run the test on the pure-PyTorch reference, on the Triton kernels and on the fast CPU path."""
    monkeypatch.setenv(_backend.BACKEND_VARIABLE, request.param)
    return request.param


@pytest.fixture
def device():
    """The device kernel tests run on: CUDA when present, else the CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
