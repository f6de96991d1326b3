"""Backend selection: TRITONDET_BACKEND and the interpreter requirement."""

import os
import subprocess
import sys

import pytest
import torch

from tritondet import _backend, ops


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("TRITONDET_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="TRITONDET_BACKEND"):
        ops.box_iou(torch.zeros(1, 4), torch.zeros(1, 4))


def test_auto_runs_the_fast_cpu_path_on_cpu_tensors(monkeypatch):
    monkeypatch.setenv("TRITONDET_BACKEND", "auto")
    assert _backend.backend_name(torch.device("cpu")) == "cpu"


def test_triton_on_cpu_without_interpreter_says_how_to_enable_it():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITONDET_BACKEND"] = "triton"
    code = "import torch; from tritondet import ops; ops.box_iou(torch.zeros(1, 4), torch.zeros(1, 4))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "TRITON_INTERPRET=1" in result.stderr
