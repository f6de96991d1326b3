"""The ``tritondet`` command: ``ops``, ``compile-report`` (more subcommands arrive with the detector)."""

from __future__ import annotations

import argparse
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
