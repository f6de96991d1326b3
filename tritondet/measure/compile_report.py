"""``tritondet compile-report``: every kernel specialization compiled for sm_80 and sm_90.

The PTX lint: a kernel in its family's ``EXACT_KERNELS`` (results compared exactly with
torchvision, or rounded to pixels and levels) must contain none of ``_aot.INEXACT_OPCODES``.

Compilation runs in worker processes started without ``TRITON_INTERPRET`` (the interpreter
replaces ``@triton.jit`` kernels, which then cannot be compiled), one per CPU core. Results are
cached per Triton version and kernel source, so ``tritondet ops`` is quick after the first run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..kernels import _aot
from ..kernels import _common as kernels_common
from ..kernels._aot import ARCHS, CompileResult, compile_spec

CACHE_DIR = Path(os.environ.get("TRITONDET_CACHE", Path.home() / ".cache" / "tritondet"))


def _families():
    from ..kernels import FAMILIES

    return FAMILIES


def spec_ids() -> list[tuple[str, int]]:
    """(family, index into its AOT_SPECS) for every declared specialization."""
    return [(family, i) for family, module in _families().items() for i in range(len(module.AOT_SPECS))]


def _compile_one(family: str, index: int, arch: int) -> tuple[str, dict]:
    result = compile_spec(_families()[family].AOT_SPECS[index], arch)
    return family, dataclasses.asdict(result)


def _cache_path(archs: tuple[int, ...]) -> Path:
    import triton

    digest = hashlib.sha256(triton.__version__.encode())
    for family, module in sorted(_families().items()):
        digest.update(family.encode())
        digest.update(inspect.getsource(module).encode())
    digest.update(inspect.getsource(kernels_common).encode())  # the Triton helpers families share
    digest.update(inspect.getsource(_aot).encode())  # compile_spec and what it reads
    digest.update(repr(archs).encode())
    return CACHE_DIR / f"compile-report-{digest.hexdigest()[:16]}.json"


@contextlib.contextmanager
def _without_interpreter() -> Iterator[None]:
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def compile_all(archs: tuple[int, ...] = ARCHS, workers: int | None = None, use_cache: bool = True):
    """``[(family, CompileResult)]`` for every specialization and arch, in declaration order."""
    cache = _cache_path(archs)
    if use_cache and cache.exists():
        rows = json.loads(cache.read_text())
        return [(family, CompileResult(**fields)) for family, fields in rows]
    jobs = _jobs(archs)
    workers = workers or min(len(jobs), os.cpu_count() or 1) or 1
    # spawn: a fresh interpreter per worker, importing triton without TRITON_INTERPRET.
    with _without_interpreter(), ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(_compile_one, *zip(*jobs, strict=True))) if jobs else []
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(rows))
    partial.replace(cache)  # atomic: concurrent test workers never read a half-written report
    return [(family, CompileResult(**fields)) for family, fields in rows]


def _jobs(archs: tuple[int, ...]) -> list[tuple[str, int, int]]:
    """(family, spec index, arch) of every compilation, in :func:`compile_all`'s order."""
    return [(family, index, arch) for family, index in spec_ids() for arch in archs]


def is_exact(family: str, index: int) -> bool:
    """Whether spec ``index`` of ``family`` is of a kernel its family declares in ``EXACT_KERNELS``."""
    module = _families()[family]
    return module.AOT_SPECS[index].kernel in module.EXACT_KERNELS


def _inexact_rows(results, archs: tuple[int, ...]):
    """``(family, result, exact, found)`` per entry of :func:`compile_all`'s ``results`` (same
    order and archs): whether its kernel is exact, and its inexact PTX instructions as text."""
    for (family, index, _), (_, result) in zip(_jobs(archs), results, strict=True):
        found = ", ".join(f"{opcode} x{count}" for opcode, count in result.inexact_opcodes.items())
        yield family, result, is_exact(family, index), found


def ptx_lint(results, archs: tuple[int, ...] = ARCHS) -> list[str]:
    """The PTX column of ``results``: ``"exact"`` for an exact kernel with none of
    ``INEXACT_OPCODES``, ``"FAIL ..."`` with the ones it has, and for the other kernels the
    inexact instructions they keep (``"-"`` when none)."""
    return [
        (f"FAIL {found}" if found else "exact") if exact else (found or "-")
        for _, _, exact, found in _inexact_rows(results, archs)
    ]


def ptx_lint_failures(results, archs: tuple[int, ...] = ARCHS) -> list[str]:
    """``"family: kernel sm_XX: instructions"`` for every exact kernel whose PTX has inexact instructions."""
    return [
        f"{family}: {result.kernel} sm_{result.arch}: {found}"
        for family, result, exact, found in _inexact_rows(results, archs)
        if exact and found
    ]


def format_table(results, archs: tuple[int, ...] = ARCHS) -> str:
    header = ("family", "kernel", "arch", "regs", "spill B", "stack B", "smem B", "SASS instr", "status", "PTX lint")
    rows = [header]
    for (family, r), lint in zip(results, ptx_lint(results, archs), strict=True):
        status = "ok" if r.ok else (r.error or f"{r.spill_bytes} bytes spilled")
        rows.append(
            (
                family,
                r.kernel,
                f"sm_{r.arch}",
                str(r.registers),
                str(r.spill_bytes),
                str(r.stack_bytes),
                str(r.shared_bytes),
                str(r.sass_instructions),
                status,
                lint,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
