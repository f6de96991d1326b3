"""Which implementation an op runs: the compiled Triton kernels, the fast CPU path or the
pure-PyTorch reference.

``TRITONDET_BACKEND`` (read at every call, so tests and users can switch it at run time):

- ``auto`` (default): Triton kernels on CUDA tensors, the fast CPU path elsewhere.
- ``triton``: Triton kernels even on CPU tensors. That needs the Triton interpreter, which only
  exists when ``TRITON_INTERPRET=1`` was set before :mod:`triton` was first imported.
- ``cpu``: the fast CPU path everywhere. Sync-freedom and fixed shapes are GPU properties: with no
  device to stall, this path runs the fastest exact algorithm (data-dependent shapes, early exits,
  torchvision's C++ kernels where they compute exactly what the op promises). Ops without a fast
  CPU version run the reference.
- ``reference``: the vectorized pure-PyTorch reference everywhere: the test oracle.
"""

from __future__ import annotations

import os

import torch
import triton

BACKEND_VARIABLE = "TRITONDET_BACKEND"
BACKENDS = ("auto", "triton", "cpu", "reference")


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
    if choice in ("cpu", "reference"):
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


# Set by :func:`tritondet.patch_torchvision` while torchvision's CPU kernels are ours: the fast CPU
# path calls those kernels, so it would call itself; the reference runs instead.
torchvision_cpu_patched = False


def use_fast_cpu(device: torch.device, calls_torchvision: bool = True) -> bool:
    """Whether an op whose tensors live on ``device`` runs the fast CPU path (when it has one;
    never together with :func:`use_triton`). A fast path that ``calls_torchvision``'s CPU kernels
    steps aside while they are patched to be ours (it would call itself)."""
    choice = requested_backend()
    if calls_torchvision and torchvision_cpu_patched:
        return False
    return choice == "cpu" or (choice == "auto" and device.type != "cuda")


def backend_name(device: torch.device) -> str:
    """``"triton"``, ``"triton-interpreter"``, ``"cpu"`` or ``"reference"``: what runs for tensors
    on ``device``."""
    try:
        if use_triton(device):
            return "triton" if device.type == "cuda" else "triton-interpreter"
    except RuntimeError:
        return "unavailable (set TRITON_INTERPRET=1)"
    return "cpu" if use_fast_cpu(device) else "reference"
