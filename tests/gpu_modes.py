"""GPU-like modes for the Triton interpreter: behaviour a GPU has and the exact, sequential interpreter hides.

``pytest --gpu-mode=MODE[,MODE...]`` (or ``TRITONDET_GPU_MODE=MODE``; the option exports the variable so
that child pytest processes inherit it) patches the interpreter for the whole session:

- ``reverse``: the programs of every launch run in reversed order (last program first).
- ``shuffle``: the programs of every launch run in a shuffled order, drawn from the session seed
  (``--gpu-mode-seed`` / ``TRITONDET_GPU_MODE_SEED``, random and printed when not given), the test's id
  and the launch's index within the test, so one test reruns alone with the same orders.
- ``poison``: masked-off lanes of loads without ``other`` read NaN (floats) or garbage (integers), and
  every ``torch.empty`` / ``torch.empty_like`` / ``Tensor.new_empty`` result is filled with the same, as
  uninitialized GPU memory would hold.
- ``math``: fp32 ``/`` is ``a * rcp(b)`` (each rounded to fp32, as ``div.full.f32``) unless the kernel
  calls ``tl.div_rn``; fp32 ``tl.sqrt`` is ``x * rsqrt(x)`` (rounded to fp32) unless ``tl.sqrt_rn``;
  float-to-int casts saturate (NaN -> 0, out of range -> the target's min/max); fp32 -> bf16 rounds to
  nearest even.
- ``limits``: a launch whose grid exceeds CUDA's (x <= 2**31 - 1, y and z <= 65535) raises.

:func:`gpu_mode` applies modes to a block of code (the plugin's own tests). The patched interpreter
functions are checked against the Triton version and signatures this module was written for; anything
else fails loudly. The terminal summary gives the launches and programs each session ran in its modes
(with pytest-xdist, the workers send their counts to the controller).
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import os
import random
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

MODE_VARIABLE = "TRITONDET_GPU_MODE"
SEED_VARIABLE = "TRITONDET_GPU_MODE_SEED"
MODES = ("reverse", "shuffle", "poison", "math", "limits")

# The interpreter internals below are those of this Triton release; another one must be re-read first.
TRITON_VERSION = "3.8.0"
# CUDA's largest grid: gridDim.x < 2**31, gridDim.y and gridDim.z <= 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)
# Byte every garbage integer is made of (0xA5: odd, sign bit set, far from 0, -1 and any index).
GARBAGE_BYTE = 0xA5
# The quiet NaN of bfloat16, which the interpreter stores as uint16 bits.
BF16_NAN_BITS = 0x7FC0

# name on InterpreterBuilder -> the parameters it must have (self first).
_BUILDER_SIGNATURES = {
    "set_grid_dim": ("self", "nx", "ny", "nz"),
    "set_grid_idx": ("self", "x", "y", "z"),
    "create_masked_load": ("self", "ptrs", "mask", "other", "cache_modifier", "eviction_policy", "is_volatile"),
    "create_fdiv": ("self", "lhs", "rhs"),
    "create_sqrt": ("self", "arg"),
    "create_fp_to_si": ("self", "src", "dst_type"),
    "create_fp_to_ui": ("self", "src", "dst_type"),
    "create_fp_trunc": ("self", "src", "dst_type"),
}


class _State:
    """What the installed patches read at each call, and what they counted."""

    def __init__(self) -> None:
        self.active: frozenset[str] = frozenset()
        self.seed = 0
        self.counts: collections.Counter[str] = collections.Counter()
        # The program order of the launch under way: linear index in the grid loop -> program run instead.
        self.grid: tuple[int, int, int] = (1, 1, 1)
        self.program_order: np.ndarray | None = None
        # Launches made so far by the test under way (the shuffle's reproducible stream).
        self.test_id = ""
        self.test_launches = 0


_state = _State()
_originals: dict[tuple[object, str], object] = {}
# On the xdist controller: the counts its workers sent.
_worker_counts_key = pytest.StashKey[collections.Counter]()


def parse_modes(text: str | None) -> frozenset[str]:
    """``"reverse,math"`` -> ``{"reverse", "math"}``; an unknown name raises ``pytest.UsageError``."""
    modes = frozenset(name.strip() for name in (text or "").split(",") if name.strip())
    unknown = modes - set(MODES)
    if unknown:
        raise pytest.UsageError(f"--gpu-mode: unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    return modes


def check_interpreter() -> None:
    """Fail loudly unless the interpreter is the Triton release and code the patches were written for."""
    import triton
    from triton.language import math as tl_math
    from triton.runtime import interpreter

    problems = []
    if triton.__version__ != TRITON_VERSION:
        problems.append(f"triton {triton.__version__} is installed, the modes were written for {TRITON_VERSION}")
    for name, parameters in _BUILDER_SIGNATURES.items():
        function = getattr(interpreter.InterpreterBuilder, name, None)
        found = tuple(inspect.signature(function).parameters) if callable(function) else None
        if found != parameters:
            problems.append(f"InterpreterBuilder.{name} has parameters {found}, expected {parameters}")
    # Source the patches rely on: the grid loop sets the grid size once, then every index in order;
    # tl.div_rn and tl.sqrt_rn reach the IEEE builder functions, which stay unpatched.
    required_source = [
        (interpreter.GridExecutor.__call__, "interpreter_builder.set_grid_dim(*grid)"),
        (interpreter.GridExecutor.__call__, "interpreter_builder.set_grid_idx(x, y, z)"),
        (tl_math.div_rn, "create_precise_divf"),
        (tl_math.sqrt_rn, "create_precise_sqrt"),
        (tl_math.sqrt, "create_sqrt"),
    ]
    for function, fragment in required_source:
        if fragment not in inspect.getsource(inspect.unwrap(function)):
            problems.append(f"{function.__qualname__} no longer contains {fragment!r}")
    if problems:
        raise RuntimeError("tritondet GPU modes cannot patch this Triton interpreter:\n  " + "\n  ".join(problems))


def _patch(owner: object, name: str, make_replacement: Callable[[Callable], Callable]) -> None:
    original = getattr(owner, name)
    _originals[(owner, name)] = original
    setattr(owner, name, make_replacement(original))


def install() -> bool:
    """Put the mode-aware wrappers in place (they do nothing while no mode is active).

    Returns whether this call installed them (False when they already were).
    """
    if _originals:
        return False
    check_interpreter()
    from triton.runtime.interpreter import InterpreterBuilder

    for name, wrapper in _BUILDER_WRAPPERS.items():
        _patch(InterpreterBuilder, name, wrapper)
    _patch(torch, "empty", _poisoning_factory)
    _patch(torch, "empty_like", _poisoning_factory)
    _patch(torch.Tensor, "new_empty", _poisoning_factory)
    return True


def uninstall() -> None:
    """Restore every patched function."""
    for (owner, name), original in _originals.items():
        setattr(owner, name, original)
    _originals.clear()


@contextlib.contextmanager
def gpu_mode(*modes: str, seed: int = 0) -> Iterator[collections.Counter[str]]:
    """Run the block with exactly ``modes`` active (whatever the session's); yields the block's counts."""
    installed = install()
    saved = (_state.active, _state.seed, _state.counts)
    _state.active, _state.seed, _state.counts = parse_modes(",".join(modes)), seed, collections.Counter()
    _state.test_id = ""  # the block's launches count from the first, as a test's do
    try:
        yield _state.counts
    finally:
        _state.active, _state.seed, _state.counts = saved
        if installed:
            uninstall()


# --- the patched interpreter functions ------------------------------------------------------------------


def _set_grid_dim(original):
    def set_grid_dim(self, nx, ny, nz):
        if "limits" in _state.active and any(
            size > limit for size, limit in zip((nx, ny, nz), GRID_LIMITS, strict=True)
        ):
            raise RuntimeError(
                f"CUDA error: invalid configuration argument: grid ({nx}, {ny}, {nz}) exceeds the limits "
                f"{GRID_LIMITS} (x, y, z)"
            )
        original(self, nx, ny, nz)
        _state.grid = (nx, ny, nz)
        _state.program_order = None
        if not _state.active:
            return
        programs = nx * ny * nz
        _state.counts["launches"] += 1
        _state.counts["programs"] += programs
        if "shuffle" in _state.active:
            _state.program_order = np.random.default_rng(_launch_seed()).permutation(programs)
        elif "reverse" in _state.active:
            _state.program_order = np.arange(programs - 1, -1, -1)

    return set_grid_dim


def _launch_seed() -> list[int]:
    """The shuffle's seed for this launch: session seed, test id, launch index within the test."""
    test_id = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    if test_id != _state.test_id:
        _state.test_id, _state.test_launches = test_id, 0
    _state.test_launches += 1
    return [_state.seed, zlib.crc32(test_id.encode()), _state.test_launches]


def _set_grid_idx(original):
    def set_grid_idx(self, x, y, z):
        if _state.program_order is not None:
            _, ny, nz = _state.grid
            program = int(_state.program_order[(x * ny + y) * nz + z])
            x, y, z = program // (ny * nz), program // nz % ny, program % nz
        original(self, x, y, z)

    return set_grid_idx


def _masked_load(original):
    def create_masked_load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        if other is None and "poison" in _state.active:
            from triton.runtime.interpreter import TensorHandle, _get_np_dtype

            element_type = ptrs.get_element_ty()
            np_dtype = _get_np_dtype(element_type)
            if element_type.is_bf16():
                value = BF16_NAN_BITS
            else:
                value = _poison_value(
                    np_dtype.kind == "f", np_dtype.kind == "b", np_dtype.itemsize, np_dtype.kind == "i"
                )
            other = TensorHandle(np.full(ptrs.data.shape, value, dtype=np_dtype), element_type)
            _state.counts["poisoned masked-off lanes"] += int(np.size(mask.data) - np.count_nonzero(mask.data))
        return original(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)

    return create_masked_load


def _approximate_fdiv(original):
    def create_fdiv(self, lhs, rhs):
        if "math" not in _state.active or lhs.data.dtype != np.float32:
            return original(self, lhs, rhs)
        from triton.runtime.interpreter import TensorHandle

        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            quotient = np.multiply(lhs.data, np.reciprocal(rhs.data, dtype=np.float32), dtype=np.float32)
        _state.counts["approximate fp32 divisions"] += quotient.size
        return TensorHandle(quotient, lhs.dtype.scalar)

    return create_fdiv


def _approximate_sqrt(original):
    def create_sqrt(self, arg):
        if "math" not in _state.active or arg.data.dtype != np.float32:
            return original(self, arg)
        from triton.runtime.interpreter import TensorHandle

        with np.errstate(divide="ignore", invalid="ignore"):
            exact = np.sqrt(arg.data)
            reciprocal_root = (1.0 / np.sqrt(arg.data.astype(np.float64))).astype(np.float32)
            approximate = np.multiply(arg.data, reciprocal_root, dtype=np.float32)
        # 0 * rsqrt(0) and inf * rsqrt(inf) are NaN; the hardware gives 0 and inf.
        root = np.where((arg.data == 0) | np.isinf(arg.data), exact, approximate)
        _state.counts["approximate fp32 square roots"] += root.size
        return TensorHandle(root, arg.dtype.scalar)

    return create_sqrt


def _saturating_cast(original):
    def create_fp_to_int(self, src, dst_type):
        if "math" not in _state.active:
            return original(self, src, dst_type)
        from triton.runtime.interpreter import TensorHandle, _get_np_dtype

        np_dtype = _get_np_dtype(dst_type)
        _state.counts["saturating float-to-int casts"] += np.size(src.data)
        return TensorHandle(saturate_to_int(src.data, np_dtype), dst_type.scalar)

    return create_fp_to_int


def saturate_to_int(values: np.ndarray, np_dtype: np.dtype) -> np.ndarray:
    """``values`` (float array) truncated to ``np_dtype`` as NVIDIA's ``cvt.rzi``: NaN -> 0, out of range -> min/max."""
    info = np.iinfo(np_dtype)
    wide = values.astype(np.float64)
    # info.max + 1 and info.min are powers of two, exact in float64 (info.max itself may not be).
    too_high = wide >= float(info.max) + 1
    too_low = wide <= float(info.min) - 1
    in_range = np.where(too_high | too_low | np.isnan(wide), 0.0, wide)
    result = np.trunc(in_range).astype(np_dtype)
    result[too_high] = info.max
    result[too_low] = info.min
    return result


def _nearest_even_bf16(original):
    def create_fp_trunc(self, src, dst_type):
        if "math" not in _state.active or not dst_type.scalar.is_bf16():
            return original(self, src, dst_type)
        from triton.runtime.interpreter import TensorHandle

        # torch rounds float -> bfloat16 to nearest even; the interpreter truncates.
        rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
        _state.counts["bf16 roundings to nearest even"] += rounded.numel()
        return TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)

    return create_fp_trunc


_BUILDER_WRAPPERS = {
    "set_grid_dim": _set_grid_dim,
    "set_grid_idx": _set_grid_idx,
    "create_masked_load": _masked_load,
    "create_fdiv": _approximate_fdiv,
    "create_sqrt": _approximate_sqrt,
    "create_fp_to_si": _saturating_cast,
    "create_fp_to_ui": _saturating_cast,
    "create_fp_trunc": _nearest_even_bf16,
}


# --- uninitialized memory ---------------------------------------------------------------------------------


def _poison_value(is_floating: bool, is_bool: bool, itemsize: int, is_signed: bool) -> float | int | bool:
    """What uninitialized memory holds in poison mode: NaN (floats), True (bools), else GARBAGE_BYTE repeated."""
    if is_floating:
        return float("nan")
    if is_bool:
        return True
    return int.from_bytes(bytes([GARBAGE_BYTE]) * itemsize, "little", signed=is_signed)


def _poisoning_factory(original):
    def make_uninitialized(*args, **kwargs):
        tensor = original(*args, **kwargs)
        # Compiled graphs and fake or meta tensors own no memory to poison.
        if "poison" not in _state.active or torch.compiler.is_compiling() or type(tensor) is not torch.Tensor:
            return tensor
        if tensor.device.type != "meta" and tensor.numel() > 0:
            # Out of sight of dispatch counters: a GPU makes no op to leave memory uninitialized.
            from torch.utils._python_dispatch import _disable_current_modes

            dtype = tensor.dtype
            value = _poison_value(
                dtype.is_floating_point or dtype.is_complex, dtype == torch.bool, tensor.element_size(), dtype.is_signed
            )
            with _disable_current_modes(), torch.no_grad():
                tensor.fill_(value)
            _state.counts["poisoned fresh tensors"] += 1
        return tensor

    return make_uninitialized


# --- the pytest plugin ------------------------------------------------------------------------------------


def pytest_addoption(parser):
    group = parser.getgroup("tritondet GPU modes")
    group.addoption(
        "--gpu-mode",
        default=os.environ.get(MODE_VARIABLE, ""),
        help=f"GPU-like Triton interpreter modes, comma-separated: {', '.join(MODES)} (default: ${MODE_VARIABLE})",
    )
    group.addoption(
        "--gpu-mode-seed",
        type=int,
        default=int(os.environ[SEED_VARIABLE]) if os.environ.get(SEED_VARIABLE) else None,
        help=f"seed of the shuffle mode (default: ${SEED_VARIABLE}, else random and printed)",
    )


def pytest_configure(config):
    modes = parse_modes(config.getoption("gpu_mode"))
    if not modes:
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise pytest.UsageError("--gpu-mode patches the Triton interpreter: it needs TRITON_INTERPRET=1")
    seed = config.getoption("gpu_mode_seed")
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    # Exported so that xdist workers draw the same shuffles and child pytest processes run the same modes.
    os.environ[MODE_VARIABLE] = ",".join(sorted(modes))
    os.environ[SEED_VARIABLE] = str(seed)
    install()
    _state.active, _state.seed = modes, seed
    config.stash[_worker_counts_key] = collections.Counter()


def pytest_report_header(config):
    if _state.active:
        return f"tritondet GPU modes: {', '.join(sorted(_state.active))} (seed {_state.seed})"
    return None


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None and _state.active:
        workeroutput["tritondet_gpu_mode_counts"] = dict(_state.counts)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """On the xdist controller: add up what each worker counted."""
    counts = getattr(node, "workeroutput", {}).get("tritondet_gpu_mode_counts")
    if counts:
        node.config.stash[_worker_counts_key].update(counts)


def pytest_terminal_summary(terminalreporter, config):
    if not _state.active:
        return
    counts = collections.Counter(_state.counts)
    counts.update(config.stash.get(_worker_counts_key, {}))
    terminalreporter.section("tritondet GPU modes")
    terminalreporter.write_line(
        f"modes {', '.join(sorted(_state.active))}, seed {_state.seed} (rerun: --gpu-mode={','.join(sorted(_state.active))}"
        f" --gpu-mode-seed={_state.seed}): {counts.pop('launches', 0)} launches, {counts.pop('programs', 0)} programs"
    )
    for what, count in sorted(counts.items()):
        terminalreporter.write_line(f"  {what}: {count}")


def pytest_unconfigure(config):
    if _state.active:
        _state.active = frozenset()
        uninstall()
