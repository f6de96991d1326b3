"""The GPU-like interpreter modes of tests/gpu_modes.py, each seen changing a small kernel's result.

Every launch here runs inside ``gpu_mode(...)``, which sets exactly the modes given (none: the plain
interpreter), so the file passes whatever ``--gpu-mode`` the session runs with.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from tests import gpu_modes
from tests.gpu_modes import gpu_mode

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@triton.jit
def _ticket_kernel(counter_ptr, tickets_ptr, GRID_Y: tl.constexpr):
    """tickets[pid_x * GRID_Y + pid_y] = how many programs ran before this one."""
    ticket = tl.atomic_add(counter_ptr, 1)
    tl.store(tickets_ptr + tl.program_id(0) * GRID_Y + tl.program_id(1), ticket)


def run_order(grid_x: int, grid_y: int = 1) -> list[int]:
    """The position in the run order of each program of a (grid_x, grid_y) launch, row-major."""
    counter = torch.zeros(1, dtype=torch.int32)
    tickets = torch.full((grid_x * grid_y,), -1, dtype=torch.int32)
    _ticket_kernel[(grid_x, grid_y)](counter, tickets, GRID_Y=grid_y)
    return tickets.tolist()


def test_programs_run_in_grid_order_without_a_mode():
    with gpu_mode():
        assert run_order(12) == list(range(12))


def test_reverse_runs_the_last_program_first():
    with gpu_mode("reverse") as counts:
        assert run_order(12) == list(range(11, -1, -1))
        assert run_order(3, 4) == list(range(11, -1, -1))
    assert counts["launches"] == 2
    assert counts["programs"] == 24


def test_shuffle_is_a_seeded_permutation():
    with gpu_mode("shuffle", seed=1):
        first = run_order(3, 5)
        second_launch = run_order(3, 5)
    with gpu_mode("shuffle", seed=1):
        again = run_order(3, 5)
    with gpu_mode("shuffle", seed=2):
        other_seed = run_order(3, 5)
    assert sorted(first) == list(range(15))
    assert first not in (list(range(15)), list(range(14, -1, -1)))
    assert again == first, "the same seed, test and launch index give the same order"
    assert second_launch != first and other_seed != first


@triton.jit
def _masked_copy_kernel(source_ptr, out_ptr, n, BLOCK: tl.constexpr, OTHER_ZERO: tl.constexpr):
    """out[:BLOCK] = source[:n] followed by what masked-off lanes read."""
    offsets = tl.arange(0, BLOCK)
    if OTHER_ZERO:
        values = tl.load(source_ptr + offsets, mask=offsets < n, other=0)
    else:
        values = tl.load(source_ptr + offsets, mask=offsets < n)
    tl.store(out_ptr + offsets, values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
def test_poison_fills_masked_off_lanes_without_other(dtype):
    source = torch.arange(1, 9).to(dtype)

    def masked_copy(other_zero):
        out = torch.zeros(16, dtype=dtype)
        _masked_copy_kernel[(1,)](source, out, 8, BLOCK=16, OTHER_ZERO=other_zero)
        return out

    with gpu_mode():
        assert masked_copy(other_zero=False)[8:].eq(0).all(), "the interpreter reads zeros"
    with gpu_mode("poison") as counts:
        poisoned = masked_copy(other_zero=False)
        with_other = masked_copy(other_zero=True)
    assert torch.equal(poisoned[:8], source)
    if dtype.is_floating_point:
        assert poisoned[8:].isnan().all()
    else:
        assert poisoned[8:].eq(-0x5A5A5A5B).all(), "0xA5A5A5A5"
    assert torch.equal(with_other, torch.cat([source, torch.zeros(8, dtype=dtype)]))
    assert counts["poisoned masked-off lanes"] == 8


def test_poison_fills_fresh_tensors():
    with gpu_mode("poison") as counts:
        floats = torch.empty(3, 4)
        like = torch.empty_like(torch.zeros(2, dtype=torch.float16))
        ints = torch.zeros(1, dtype=torch.int64).new_empty(5)
        flags = torch.empty(2, dtype=torch.bool)
    assert floats.isnan().all() and like.isnan().all()
    assert ints.eq(int.from_bytes(b"\xa5" * 8, "little", signed=True)).all()
    assert flags.all()
    assert counts["poisoned fresh tensors"] == 4


@triton.jit
def _divide_kernel(x_ptr, y_ptr, fast_ptr, ieee_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=1.0)
    y = tl.load(y_ptr + offsets, mask=mask, other=1.0)
    tl.store(fast_ptr + offsets, x / y, mask=mask)
    tl.store(ieee_ptr + offsets, tl.div_rn(x, y), mask=mask)


@triton.jit
def _sqrt_kernel(x_ptr, fast_ptr, ieee_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=1.0)
    tl.store(fast_ptr + offsets, tl.sqrt(x), mask=mask)
    tl.store(ieee_ptr + offsets, tl.sqrt_rn(x), mask=mask)


def assert_fast_differs_from_ieee(fast, ieee, exact):
    """``fast`` differs from IEEE for some elements, by at most 2 ulp; ``ieee`` equals ``exact`` bit for bit."""
    assert torch.equal(ieee, exact)
    assert not torch.equal(fast, exact)
    ulp = torch.finfo(torch.float32).eps * exact.abs()
    assert ((fast - exact).abs() <= 2 * ulp).all()


def test_math_divides_by_multiplying_with_the_reciprocal():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1000, generator=generator) * 100
    y = torch.rand(1000, generator=generator) * 100 + 0.1
    fast, ieee = torch.empty_like(x), torch.empty_like(x)
    with gpu_mode():
        _divide_kernel[(8,)](x, y, fast, ieee, 1000, BLOCK=128)
    assert torch.equal(fast, x / y), "the interpreter divides exactly"
    with gpu_mode("math") as counts:
        _divide_kernel[(8,)](x, y, fast, ieee, 1000, BLOCK=128)
    assert_fast_differs_from_ieee(fast, ieee, x / y)
    assert torch.equal(fast, x * (1 / y))
    assert counts["approximate fp32 divisions"] == 8 * 128


def test_math_approximates_sqrt_unless_sqrt_rn():
    x = torch.cat([torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 1000, torch.tensor([0.0, -0.0])])
    fast, ieee = torch.empty_like(x), torch.empty_like(x)
    with gpu_mode("math"):
        _sqrt_kernel[(8,)](x, fast, ieee, x.numel(), BLOCK=128)
    # Through float64: torch's vectorized fp32 sqrt on the CPU is not always correctly rounded.
    assert_fast_differs_from_ieee(fast, ieee, x.double().sqrt().float())
    assert torch.equal(fast[-2:].sign(), torch.tensor([0.0, -0.0]).sign())


@triton.jit
def _to_int32_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets).to(tl.int32))


def test_math_saturates_float_to_int_casts():
    x = torch.tensor([float("nan"), 3e9, -3e9, float("inf"), float("-inf"), 2.7, -2.7, 2147483520.0])
    out = torch.zeros(8, dtype=torch.int32)
    with gpu_mode(), np.errstate(invalid="ignore"):
        _to_int32_kernel[(1,)](x, out, BLOCK=8)
    assert out[0] == INT32_MIN, "numpy gives INT_MIN for NaN"
    with gpu_mode("math") as counts:
        _to_int32_kernel[(1,)](x, out, BLOCK=8)
    assert out.tolist() == [0, INT32_MAX, INT32_MIN, INT32_MAX, INT32_MIN, 2, -2, 2147483520]
    assert counts["saturating float-to-int casts"] == 8


@pytest.mark.parametrize("np_dtype", [np.int8, np.uint8, np.int32, np.uint32, np.int64])
def test_saturate_to_int_covers_every_integer_type(np_dtype):
    info = np.iinfo(np_dtype)
    values = np.array([np.nan, 1e30, -1e30, info.max + 0.5, info.min - 0.5, -0.9, 7.9])
    expected = [0, info.max, info.min, info.max, info.min, 0, 7]
    assert gpu_modes.saturate_to_int(values, np.dtype(np_dtype)).tolist() == expected


@triton.jit
def _store_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets))


def test_math_rounds_bf16_stores_to_nearest_even():
    # 1 + 0.75 ulp(bf16) rounds up, 1 + 1.5 ulp rounds to the even 1 + 2 ulp; truncation gives 1 and 1 + ulp.
    ulp = 2.0**-7
    x = torch.cat([torch.tensor([1 + 0.75 * ulp, 1 + 1.5 * ulp]), torch.randn(254, generator=torch.Generator())])
    out = torch.zeros(256, dtype=torch.bfloat16)
    with gpu_mode():
        _store_kernel[(1,)](x, out, BLOCK=256)
    assert out[:2].tolist() == [1.0, 1 + ulp], "the interpreter truncates"
    with gpu_mode("math"):
        _store_kernel[(1,)](x, out, BLOCK=256)
    assert torch.equal(out, x.to(torch.bfloat16))
    assert out[:2].tolist() == [1 + ulp, 1 + 2 * ulp]


@triton.jit
def _nothing_kernel(out_ptr):
    tl.store(out_ptr, 1)


@pytest.mark.parametrize("grid", [(2**31,), (1, 65536), (1, 1, 65536)])
def test_limits_reject_grids_cuda_cannot_launch(grid):
    with gpu_mode("limits"), pytest.raises(RuntimeError, match="invalid configuration argument"):
        _nothing_kernel[grid](torch.zeros(1))


def test_limits_let_a_valid_grid_run():
    out = torch.zeros(1)
    with gpu_mode("limits") as counts:
        _nothing_kernel[(2, 3, 4)](out)
    assert out.item() == 1
    assert (counts["launches"], counts["programs"]) == (1, 24)


def test_unknown_mode_is_a_usage_error():
    with pytest.raises(pytest.UsageError, match="unknown mode"):
        gpu_modes.parse_modes("math,fast")


def test_another_interpreter_version_fails_loudly(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "9.9.9")
    with pytest.raises(RuntimeError, match=r"triton 9\.9\.9 is installed"):
        gpu_modes.check_interpreter()


def test_a_changed_signature_fails_loudly(monkeypatch):
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fdiv", lambda self, lhs, rhs, rounding: None)
    with pytest.raises(RuntimeError, match=r"InterpreterBuilder.create_fdiv has parameters"):
        gpu_modes.check_interpreter()


def test_session_mode_from_the_environment_under_xdist(tmp_path):
    """TRITONDET_GPU_MODE turns a mode on in every xdist worker; the controller sums their counts."""
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "test_launches.py").write_text(
        textwrap.dedent(
            """
            import pytest
            import torch
            import triton
            import triton.language as tl

            @triton.jit
            def ticket_kernel(counter_ptr, tickets_ptr):
                tl.store(tickets_ptr + tl.program_id(0), tl.atomic_add(counter_ptr, 1))

            @pytest.mark.parametrize("case", range(4))
            def test_reversed(case):
                counter, tickets = torch.zeros(1, dtype=torch.int32), torch.zeros(5, dtype=torch.int32)
                ticket_kernel[(5,)](counter, tickets)
                assert tickets.tolist() == [4, 3, 2, 1, 0]
            """
        )
    )
    # The child is a session of its own: none of this session's pytest or xdist variables.
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_")}
    env.update({"PYTHONPATH": repository, "TRITON_INTERPRET": "1", gpu_modes.MODE_VARIABLE: "reverse"})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.gpu_modes", "-n", "2", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tritondet GPU modes: reverse" in result.stdout
    assert ": 4 launches, 20 programs" in result.stdout
