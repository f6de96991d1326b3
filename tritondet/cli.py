"""The ``tritondet`` command: ``ops``, ``compile-report``, ``bench`` (more subcommands arrive with the detector)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _cmd_ops(args: argparse.Namespace) -> int:
    from . import compile_report
    from ._backend import backend_name
    from .kernels import FAMILIES

    results = compile_report.compile_all(use_cache=not args.no_cache)
    status: dict[tuple[str, int], bool] = {}
    for family, result in results:
        status[(family, result.arch)] = status.get((family, result.arch), True) and result.ok
    cpu = backend_name(torch.device("cpu"))
    cuda = backend_name(torch.device("cuda")) if torch.cuda.is_available() else "no CUDA device"
    header = ("op", "family", "CPU tensors", "CUDA tensors", "sm_80", "sm_90")
    rows = [header]
    for family, module in FAMILIES.items():
        compiled = [
            "compiled" if status.get((family, arch)) else "FAILED" if (family, arch) in status else "-"
            for arch in (80, 90)
        ]
        for op in module.PUBLIC_OPS:
            rows.append((op, family, cpu, cuda, *compiled))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * width for width in widths))
    return 0 if all(status.values()) else 1


def _cmd_compile_report(args: argparse.Namespace) -> int:
    from . import compile_report

    archs = tuple(args.arch) if args.arch else compile_report.ARCHS
    results = compile_report.compile_all(archs=archs, use_cache=not args.no_cache)
    print(compile_report.format_table(results))
    failed = [r for _, r in results if not r.ok]
    print(f"\n{len(results)} compilations, {len(failed)} failed or spilled")
    return 1 if failed else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import os

    # Before the harness is imported: the CPU thread count both sides are timed with.
    os.environ["TRITONDET_BENCH_THREADS"] = str(args.threads)
    from . import bench, compile_report

    sizes = "quick" if args.quick else "full"
    print(f"running the {sizes} benchmark suite")
    rows, failures = bench.run_suite(sizes, only=args.only or ())
    compiled = None if args.no_compile_report else compile_report.compile_all()
    compile_table = None if compiled is None else compile_report.format_table(compiled)
    bench.write_report(rows, args.out, bench.environment(sizes, args.threads), compile_table, failures)
    print()
    print(bench.markdown_table(rows))
    if compiled is not None:
        failed = sum(not result.ok for _, result in compiled)
        print(f"\ncompile report: {len(compiled)} kernel compilations for sm_80/sm_90, {failed} failed or spilled")
    for failure in failures:
        print(f"FAILED {failure}")
    with_report = "" if compiled is None else " (with the compile report)"
    print(f"wrote {args.out}/results.csv, {args.out}/results.md{with_report} and one PNG per op")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tritondet",
        description="Triton GPU kernels for two-stage object detection (Faster R-CNN family).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    ops = commands.add_parser("ops", help="list every op, its backend here, and its sm_80/sm_90 compile status")
    ops.add_argument("--no-cache", action="store_true", help="recompile instead of reading the cached report")
    ops.set_defaults(run=_cmd_ops)

    report = commands.add_parser(
        "compile-report",
        help="compile every kernel for sm_80 and sm_90 (no GPU needed): registers, spills, shared memory, SASS size",
    )
    report.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 80 (repeatable)")
    report.add_argument("--no-cache", action="store_true", help="recompile instead of reading the cached report")
    report.set_defaults(run=_cmd_compile_report)

    bench = commands.add_parser(
        "bench",
        help="benchmark every op against torchvision (needs a source checkout): CSV, markdown table, ratio plots",
    )
    bench.add_argument("--quick", action="store_true", help="a few small sizes instead of the detector's sizes")
    bench.add_argument("--out", type=Path, default=Path("bench"), help="output directory (default: bench/)")
    bench.add_argument("--only", action="append", help="only benchmark files whose name contains this (repeatable)")
    bench.add_argument("--threads", type=int, default=1, help="torch CPU threads while timing on the CPU (default 1)")
    bench.add_argument("--no-compile-report", action="store_true", help="leave the sm_80/sm_90 compile report out")
    bench.set_defaults(run=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
