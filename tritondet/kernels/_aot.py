"""Ahead-of-time compilation of every kernel specialization the ops launch, for real GPU targets.

No GPU is needed: :func:`compile_spec` runs Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX ->
cubin via ptxas) for ``GPUTarget("cuda", arch, 32)``, counts the PTX instructions that round
otherwise than PyTorch (:data:`INEXACT_OPCODES`) and reads the cubin back with the
``cuobjdump``/``ptxas`` binaries that ship inside triton's NVIDIA backend.

Each kernel module lists its :class:`KernelSpec` objects in ``AOT_SPECS``, built with
:meth:`KernelSpec.from_example` from example arguments (tensors of the launch's dtypes, Python
ints and floats) and the meta-parameters the launchers take from the same helpers: every
argument's Triton type comes from Triton's own rule (:func:`triton_type`), never from a table
written by hand. A launch under ``TRITONDET_CHECK_SPECS=1`` computes the full signature of what it
launches by the same rule (:func:`specialization_key`) and requires it to be declared.
"""

from __future__ import annotations

import collections
import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHS = (80, 90)
# Triton's NVIDIA backend targets 32-thread warps on every CUDA architecture.
WARP_SIZE = 32


# Launch options that are not kernel arguments, and Triton's defaults for them on CUDA.
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 3
DEFAULT_FP_FUSION = True

# PTX instructions that round otherwise than PyTorch: Triton's fp32 ``/`` (div.full.f32, up to two
# ulps off), approximate division, reciprocal and square root (``tl.sqrt``), and the FMA that a
# contracted ``a * b + c`` becomes (one rounding where torch rounds twice). A family's
# ``EXACT_KERNELS`` contain none of them (the compile gate's PTX lint).
INEXACT_OPCODES = ("div.full.f32", "div.approx.f32", "rcp.approx.f32", "sqrt.approx.f32", "fma.rn.f32")
# One of them in PTX text, with the optional flush-to-zero and saturation modifiers: ``rcp.approx.ftz.f32``.
_INEXACT_INSTRUCTION = re.compile(
    r"\b(div\.full|div\.approx|rcp\.approx|sqrt\.approx|fma\.rn)(?:\.ftz)?(?:\.sat)?\.f32\b"
)


def triton_type(value) -> str:
    """Triton's type of one kernel argument, by Triton's own rule (``triton.runtime.jit.mangle_type``):
    ``"*fp16"`` for an fp16 tensor, ``"*u1"`` for a bool tensor, ``"i32"`` or ``"i64"`` for an int
    by its value, ``"fp32"`` for a float, ``"u1"`` for a bool.

    Without Triton's value specializations (an int equal to 1 made a constant, ints and pointers
    divisible by 16 marked so): those are attributes a GPU launch adds to a declared type, and the
    ahead-of-time compile covers the variant without them.
    """
    from triton.runtime.jit import mangle_type

    return mangle_type(value, specialize=False)


def kernel_name(kernel) -> str:
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


def _constexpr_names(kernel) -> set[str]:
    """The ``tl.constexpr`` parameters of ``kernel`` (a ``JITFunction`` or, under the interpreter,
    an ``InterpretedFunction``: both keep the Python function as ``fn``)."""
    parameters = inspect.signature(kernel.fn).parameters
    return {name for name, parameter in parameters.items() if "constexpr" in str(parameter.annotation)}


def launch_signature(kernel, args: tuple, meta: dict) -> tuple[dict[str, str], dict[str, Any]]:
    """``(signature, constexprs)`` of launching ``kernel`` with positional ``args`` and keyword
    ``meta``: every argument's Triton type (``"constexpr"`` for meta-parameters) and every
    meta-parameter's value."""
    values = dict(zip(kernel.arg_names, args, strict=False))
    values.update((name, value) for name, value in meta.items() if name not in LAUNCH_OPTIONS)
    missing = [name for name in kernel.arg_names if name not in values]
    if missing or len(values) != len(kernel.arg_names):
        raise TypeError(f"{kernel_name(kernel)}: arguments do not match the kernel's parameters (missing {missing})")
    constexpr = _constexpr_names(kernel)
    signature = {name: "constexpr" if name in constexpr else triton_type(values[name]) for name in kernel.arg_names}
    return signature, {name: values[name] for name in kernel.arg_names if name in constexpr}


def specialization_key(kernel, args: tuple, meta: dict) -> tuple:
    """What identifies a compiled specialization: the kernel, the Triton type of every argument,
    the constexpr values, warps, pipeline stages and FMA contraction."""
    signature, constexprs = launch_signature(kernel, args, meta)
    return (
        kernel_name(kernel),
        tuple(signature.items()),
        tuple(sorted(constexprs.items())),
        meta.get("num_warps", DEFAULT_NUM_WARPS),
        meta.get("num_stages", DEFAULT_NUM_STAGES),
        meta.get("enable_fp_fusion", DEFAULT_FP_FUSION),
    )


@dataclass(frozen=True)
class KernelSpec:
    """One compiled specialization of a ``@triton.jit`` kernel; build it with :meth:`from_example`.

    signature: argument name -> Triton type (``"*fp32"``, ``"i32"``, ``"fp32"``, ``"constexpr"``).
    constexprs: value of every ``"constexpr"`` argument.
    label: what distinguishes this specialization from the kernel's others (dtype, mode).
    key: :func:`specialization_key` of the launches it covers.
    """

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    key: tuple
    label: str = ""
    num_warps: int = DEFAULT_NUM_WARPS
    num_stages: int = DEFAULT_NUM_STAGES
    enable_fp_fusion: bool = DEFAULT_FP_FUSION
    pointer_alignment: int = field(default=16)

    @classmethod
    def from_example(cls, kernel, args: tuple, meta: dict, label: str = "") -> KernelSpec:
        """The specialization of launching ``kernel`` with ``args`` (tensors of the launch's dtypes,
        Python ints and floats as the launcher passes them) and ``meta`` (constexprs and launch
        options, as the launcher passes them to :func:`tritondet.kernels._launch.launch`)."""
        signature, constexprs = launch_signature(kernel, args, meta)
        return cls(
            kernel,
            signature,
            constexprs,
            specialization_key(kernel, args, meta),
            label,
            meta.get("num_warps", DEFAULT_NUM_WARPS),
            meta.get("num_stages", DEFAULT_NUM_STAGES),
            meta.get("enable_fp_fusion", DEFAULT_FP_FUSION),
        )

    @property
    def kernel_name(self) -> str:
        return kernel_name(self.kernel)

    @property
    def name(self) -> str:
        return f"{self.kernel_name}[{self.label}]" if self.label else self.kernel_name


@dataclass
class CompileResult:
    kernel: str
    arch: int
    registers: int | None = None
    spill_bytes: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    sass_instructions: int | None = None
    # INEXACT_OPCODES found in the PTX -> count (absent when none).
    inexact_opcodes: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.spill_bytes == 0


def triton_nvidia_bin() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _jit_function(kernel):
    import triton

    if isinstance(kernel, triton.runtime.JITFunction):
        return kernel
    raise RuntimeError(
        "ahead-of-time compilation needs real @triton.jit kernels; this process runs the Triton "
        "interpreter (TRITON_INTERPRET=1). Run the compile report in a process without it."
    )


def compile_spec(spec: KernelSpec, arch: int) -> CompileResult:
    """Compile ``spec`` for ``sm_<arch>`` and read registers, spills, shared memory and SASS size."""
    import triton
    from triton.backends.compiler import GPUTarget

    result = CompileResult(kernel=spec.name, arch=arch)
    fn = _jit_function(spec.kernel)
    pointer_args = [i for i, name in enumerate(fn.arg_names) if spec.signature[name].startswith("*")]
    attrs = {(i,): [["tt.divisibility", spec.pointer_alignment]] for i in pointer_args}
    source = triton.compiler.ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    try:
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", arch, WARP_SIZE),
            options={
                "num_warps": spec.num_warps,
                "num_stages": spec.num_stages,
                "enable_fp_fusion": spec.enable_fp_fusion,
            },
        )
    except Exception as error:  # the report lists every failure instead of stopping at the first
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
        return result
    result.shared_bytes = int(compiled.metadata.shared)
    result.inexact_opcodes = inexact_opcodes(compiled.asm["ptx"])
    _read_cubin(compiled.asm["cubin"], result)
    _read_ptxas_spills(compiled.asm["ptx"], arch, result)
    return result


def inexact_opcodes(ptx: str) -> dict[str, int]:
    """:data:`INEXACT_OPCODES` in ``ptx`` -> how often each occurs (modifiers dropped: ``rcp.approx.ftz.f32``
    counts as ``rcp.approx.f32``); the ones absent are left out."""
    found = collections.Counter(f"{name}.f32" for name in _INEXACT_INSTRUCTION.findall(ptx))
    return {opcode: found[opcode] for opcode in INEXACT_OPCODES if found[opcode]}


def _read_cubin(cubin: bytes, result: CompileResult) -> None:
    bin_dir = triton_nvidia_bin()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(cubin)
        usage = subprocess.run(
            [str(bin_dir / "cuobjdump"), "--dump-resource-usage", path],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [str(bin_dir / "cuobjdump"), "--dump-sass", path], capture_output=True, text=True, check=True
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if match is None:
        result.error = "cuobjdump printed no resource usage"
        return
    result.registers = int(match.group(1))
    result.stack_bytes = int(match.group(2))
    # One SASS instruction per line tagged with its address, e.g. "/*0040*/  IMAD ... ;".
    result.sass_instructions = len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+[^ ]", sass))


def _read_ptxas_spills(ptx: str, arch: int, result: CompileResult) -> None:
    """ptxas -v states spill stores and loads exactly; cuobjdump only shows the stack frame."""
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "kernel.ptx")
        Path(ptx_path).write_text(ptx)
        log = subprocess.run(
            [
                str(triton_nvidia_bin() / "ptxas"),
                "-v",
                f"--gpu-name={gpu_name}",
                ptx_path,
                "-o",
                os.path.join(tmp, "kernel.o"),
            ],
            capture_output=True,
            text=True,
        )
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.stdout + log.stderr)
    if log.returncode != 0 or not spills:
        result.error = f"ptxas -v failed: {(log.stderr or log.stdout).strip()[:200]}"
        return
    result.spill_bytes = sum(int(stores) + int(loads) for stores, loads in spills)
