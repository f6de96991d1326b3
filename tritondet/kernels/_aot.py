"""Ahead-of-time compilation of every kernel specialization the ops launch, for real GPU targets.

No GPU is needed: :func:`compile_spec` runs Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX ->
cubin via ptxas) for ``GPUTarget("cuda", arch, 32)`` and reads the cubin back with the
``cuobjdump``/``ptxas`` binaries that ship inside triton's NVIDIA backend.

Each kernel module lists its :class:`KernelSpec` objects in ``AOT_SPECS``; the launchers take
their constexpr choices from the same helpers the specs are built from, so the report covers
exactly what runs.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class KernelSpec:
    """One compiled specialization of a ``@triton.jit`` kernel.

    signature: argument name -> Triton type (``"*fp32"``, ``"i32"``, ``"fp32"``, ``"constexpr"``).
    constexprs: value of every ``"constexpr"`` argument.
    label: what distinguishes this specialization from the kernel's others (dtype, mode).
    """

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    label: str = ""
    num_warps: int = 4
    num_stages: int = 3
    pointer_alignment: int = field(default=16)

    @property
    def kernel_name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__

    @property
    def name(self) -> str:
        return f"{self.kernel_name}[{self.label}]" if self.label else self.kernel_name

    @property
    def key(self) -> tuple:
        """Matches :func:`tritondet.kernels._launch.specialization_key` of the launches it covers."""
        from ._launch import specialization_key

        pointer_types = {name: kind for name, kind in self.signature.items() if kind.startswith("*")}
        return specialization_key(self.kernel_name, pointer_types, self.constexprs, self.num_warps)


@dataclass
class CompileResult:
    kernel: str
    arch: int
    registers: int | None = None
    spill_bytes: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    sass_instructions: int | None = None
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
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
    except Exception as error:  # the report lists every failure instead of stopping at the first
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
        return result
    result.shared_bytes = int(compiled.metadata.shared)
    _read_cubin(compiled.asm["cubin"], result)
    _read_ptxas_spills(compiled.asm["ptx"], arch, result)
    return result


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
