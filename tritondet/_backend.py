"""Which implementation an op runs: the compiled Triton kernels or the pure-PyTorch reference.

``TRITONDET_BACKEND`` (read at every call, so tests and users can switch it at run time):

- ``auto`` (default): Triton kernels on CUDA tensors, the reference (the CPU path) elsewhere.
- ``triton``: Triton kernels even on CPU tensors. That needs the Triton interpreter, which only
  exists when ``TRITON_INTERPRET=1`` was set before :mod:`triton` was first imported.
- ``reference``: the pure-PyTorch reference everywhere.
"""

from __future__ import annotations

import os

import torch
import triton

BACKEND_VARIABLE = "TRITONDET_BACKEND"
BACKENDS = ("auto", "triton", "reference")


@triton.jit
def _probe_kernel():
    pass


def interpreter_active() -> bool:
    """True when ``@triton.jit`` kernels run in the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return not isinstance(_probe_kernel, triton.runtime.JITFunction)


def requested_backend() -> str:
    choice = os.environ.get(BACKEND_VARIABLE, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_VARIABLE}={choice!r} is not one of {BACKENDS}")
    return choice


def use_triton(device: torch.device) -> bool:
    """Whether an op whose tensors live on ``device`` runs the Triton kernels."""
    choice = requested_backend()
    if choice == "reference":
        return False
    if device.type == "cuda":
        return True
    if choice == "auto":
        return False
    if not interpreter_active():
        raise RuntimeError(
            f"{BACKEND_VARIABLE}=triton on {device.type} tensors needs the Triton interpreter: "
            "set TRITON_INTERPRET=1 in the environment before Python starts (it must be set before "
            "triton is imported), or use CUDA tensors."
        )
    return True


def backend_name(device: torch.device) -> str:
    """``"triton"``, ``"triton-interpreter"`` or ``"reference"``: what runs for tensors on ``device``."""
    try:
        if not use_triton(device):
            return "reference"
    except RuntimeError:
        return "unavailable (set TRITON_INTERPRET=1)"
    return "triton" if device.type == "cuda" else "triton-interpreter"
