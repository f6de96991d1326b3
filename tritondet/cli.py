"""The ``tritondet`` command: ``ops``, ``compile-report``, ``bench``, ``selftest``, and the detector's ``train``, ``eval``, ``predict``.

Bad input - a file, annotation, image, checkpoint or option the user can fix (:class:`InputError`), or a file
the system refuses (``OSError``) - ends the command with one line on stderr naming the culprit and what is wrong,
and exit status 2 (``--debug`` adds the traceback); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from pathlib import Path

import torch

from .detector.data import BAD_DATA_CHOICES, InputError

EXIT_BAD_INPUT = 2  # argparse's own status for a bad command line
EXIT_INTERRUPTED = 130  # the shell's status for a command ended by SIGINT (128 + 2)


def _cmd_ops(args: argparse.Namespace) -> int:
    from ._backend import backend_name
    from .kernels import FAMILIES
    from .measure import compile_report

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
    from .measure import compile_report

    archs = tuple(args.arch) if args.arch else compile_report.ARCHS
    results = compile_report.compile_all(archs=archs, use_cache=not args.no_cache)
    print(compile_report.format_table(results, archs))
    failed = [r for _, r in results if not r.ok]
    inexact = compile_report.ptx_lint_failures(results, archs)
    print(
        f"\n{len(results)} compilations, {len(failed)} failed or spilled, "
        f"{len(inexact)} with inexact PTX in an exact kernel"
    )
    return 1 if failed or inexact else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import os

    from .bench import harness, report, suite
    from .measure import compile_report

    # The CPU thread count both sides are timed with (read by the harness when it times).
    os.environ[harness.THREADS_VARIABLE] = str(args.threads)

    sizes = "quick" if args.quick else "full"
    print(f"running the {sizes} benchmark suite")
    rows, failures = suite.run_suite(sizes, only=args.only or ())
    compiled = None if args.no_compile_report else compile_report.compile_all()
    compile_table = None if compiled is None else compile_report.format_table(compiled)
    plots = report.write_report(rows, args.out, report.environment(sizes, args.threads), compile_table, failures)
    print()
    print(report.markdown_table(rows))
    if compiled is not None:
        failed = sum(not result.ok for _, result in compiled)
        print(f"\ncompile report: {len(compiled)} kernel compilations for sm_80/sm_90, {failed} failed or spilled")
    for failure in failures:
        print(f"FAILED {failure}")
    with_report = "" if compiled is None else " (with the compile report)"
    drawn = f"{len(plots)} ratio plots" if plots else "no plots (they need matplotlib: pip install 'tritondet[bench]')"
    print(f"wrote {args.out}/results.csv, {args.out}/results.md{with_report} and {drawn}")
    return 1 if failures else 0


def _cmd_selftest(args: argparse.Namespace) -> int:
    from . import selftest

    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else []
    return selftest.main(args.sizes, only, args.csv)


# ---------------------------------------------------------------------------------------------------------------------
# The detector: train, eval, predict
# ---------------------------------------------------------------------------------------------------------------------

_TRAIN_HELP = {
    "output_dir": "checkpoints, log.csv, loss_curves.png, detections.png, metrics.json",
    "data_root": "where the synthetic data set is cached (default ~/.cache/tritondet/data)",
    "num_train": "synthetic training images",
    "num_val": "synthetic val images",
    "train_images": "COCO-format training image folder (with the three other paths, instead of the synthetic set)",
    "model": "model preset: lite (CPU, from scratch), small_cpu, tiny, resnet50_fpn, resnet_c4, paper_vgg16",
    "masks": "Mask R-CNN: add a mask branch to the preset, train on instance masks, report box and mask AP",
    "min_size": "shorter image side (overrides the preset)",
    "max_size": "cap on the longer image side (overrides the preset)",
    "iterations": "training iterations (the budget may stop earlier)",
    "batch_size": "images per process and iteration",
    "lr_steps": "fractions of the run at which the learning rate is multiplied by gamma",
    "max_minutes": "wall-clock budget of the whole run, evaluation included (inf: no budget)",
    "amp": "bf16 autocast (CUDA only)",
    "resume": "a checkpoint to resume from, or 'auto' (output_dir/last.pt if present)",
    "num_workers": "data loader workers (default: 2 on CUDA, 0 on the CPU)",
    "image_cache_mb": "decoded training images kept in memory up to this many MiB (0: decode every time)",
    "threads": "intra-op threads on the CPU (default: the faster of 1 and torch's default, re-timed while training)",
    "schedule": "joint (approximate joint training) or alternating (the paper's 4-step training, Section 3.2)",
    "alternating_split": "the 4 alternating steps' shares of the iterations and of the time budget",
    "on_bad_data": "bad annotations and unreadable images: skip (a warning names each) or raise (stop at once)",
}


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per :class:`~tritondet.detector.engine.TrainConfig` field; unset options keep its defaults."""
    import dataclasses

    from .detector.engine import TrainConfig

    kinds = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{_TRAIN_HELP.get(f.name, f.name.replace('_', ' '))} (default: {default})"
        kind = str(f.type)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif kind.startswith("tuple"):
            parser.add_argument(flag, type=float, nargs="+", default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(
                flag, type=kinds[kind.split(" ")[0]], default=argparse.SUPPRESS, help=help_text, metavar=f.name.upper()
            )


def train_config(args: argparse.Namespace):
    """The :class:`~tritondet.detector.engine.TrainConfig` of parsed ``train`` arguments."""
    from .detector.engine import TrainConfig

    return TrainConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "run", "debug")})


def _cmd_train(args: argparse.Namespace) -> int:
    from .detector.engine import train

    result = train(train_config(args))
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    minutes = result["total_seconds"] / 60
    print(
        f"trained {result['iteration']} iterations in {result['trained_seconds'] / 60:.1f} min ({minutes:.1f} min in all)"
        f", {result['threads']} intra-op threads at the end"
    )
    if result["metrics"] is not None:
        _print_metrics(result["metrics"], f"on the val split ({result['output_dir']})")
    print(f"outputs in {result['output_dir']}/: last.pt, log.csv, loss_curves.png, detections.png, metrics.json")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .detector.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        args.checkpoint, args.val_images, args.val_annotations, args.batch_size, args.device, args.on_bad_data
    )
    _print_metrics(metrics, f"of {args.checkpoint}")
    return 0


def _print_metrics(metrics: dict, where: str) -> None:
    """The box AP table, and the mask AP table of a Mask R-CNN's metrics."""
    from .detector.evaluate import format_coco_table

    print(format_coco_table(metrics, title=f"COCO box evaluation {where}"))
    if "segm" in metrics:
        print()
        print(format_coco_table(metrics["segm"], title=f"COCO mask (segm) evaluation {where}"))


def _cmd_predict(args: argparse.Namespace) -> int:
    from .detector.visualize import predict_image

    prediction = predict_image(args.checkpoint, args.image, args.out, args.score_thresh, args.device, args.stages)
    shown = int((prediction["scores"] >= args.score_thresh).sum())
    print(f"{shown} detections with score >= {args.score_thresh} drawn to {args.out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse's parser with a one-line error (no usage block), as every other bad input gets."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tritondet",
        description="Triton GPU kernels for two-stage object detection (Faster R-CNN family).",
    )
    debug_help = "on bad input, show the traceback as well as the one-line error"
    parser.add_argument("--debug", action="store_true", help=debug_help)
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
        help="benchmark every op against torchvision: CSV, markdown table, ratio plots",
    )
    bench.add_argument("--quick", action="store_true", help="a few small sizes instead of the detector's sizes")
    bench.add_argument("--out", type=Path, default=Path("bench"), help="output directory (default: bench/)")
    bench.add_argument(
        "--only",
        action="append",
        help="only the op families (tritondet.bench.cases) whose name contains this (repeatable)",
    )
    bench.add_argument(
        "--threads", type=_positive_int, default=1, help="torch CPU threads while timing on the CPU (default 1)"
    )
    bench.add_argument("--no-compile-report", action="store_true", help="leave the sm_80/sm_90 compile report out")
    bench.set_defaults(run=_cmd_bench)

    selftest = commands.add_parser(
        "selftest",
        help="run first on a new GPU: every op against torchvision (parity and time ratio), CUDA-graph capture",
    )
    selftest.add_argument(
        "--sizes",
        choices=("small", "real"),
        help="the detector's sizes or a few dozen boxes (default: real on a GPU, small on the CPU)",
    )
    selftest.add_argument("--only", metavar="OP[,OP]", help="only these ops (comma-separated names as in the table)")
    selftest.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    selftest.set_defaults(run=_cmd_selftest)

    train = commands.add_parser(
        "train",
        help="train the detector; with no arguments: the synthetic data set, the CPU model, then the COCO AP table",
    )
    _add_train_options(train)
    train.set_defaults(run=_cmd_train)

    evaluation = commands.add_parser(
        "eval", help="COCO box (and, for Mask R-CNN, mask) AP of a training checkpoint (default: its val split)"
    )
    evaluation.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by train")
    evaluation.add_argument("--val-images", help="COCO-format image folder (default: the checkpoint's val split)")
    evaluation.add_argument("--val-annotations", help="COCO instances JSON for --val-images")
    evaluation.add_argument("--batch-size", type=_positive_int, help="images per batch (default: the training run's)")
    evaluation.add_argument("--device", help="default: cuda if available, else cpu")
    evaluation.add_argument("--on-bad-data", choices=BAD_DATA_CHOICES, default="skip", help=_TRAIN_HELP["on_bad_data"])
    evaluation.set_defaults(run=_cmd_eval)

    predict = commands.add_parser("predict", help="draw a checkpoint's detections (and masks) on an image")
    predict.add_argument("image", type=Path, help="an image file")
    predict.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by train")
    predict.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG (default out.png)")
    predict.add_argument(
        "--score-thresh", type=_fraction, default=0.5, help="draw detections scoring at least this (in [0, 1])"
    )
    predict.add_argument("--device", help="default: cuda if available, else cpu")
    predict.add_argument(
        "--stages",
        action="store_true",
        help="a 2x2 grid: anchors at one position, top RPN proposals before and after NMS, final detections",
    )
    predict.set_defaults(run=_cmd_predict)
    for command in commands.choices.values():  # --debug also after the command, where users type options
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; its exit status (2: bad input, reported in one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a bad command line (reported in one line)
        return exit.code
    try:
        return args.run(args)
    except (InputError, OSError) as error:  # OSError: a file the system refused (permissions, a full disk)
        if args.debug:
            traceback.print_exc()
        message = " ".join(line.strip() for line in str(error).splitlines())
        print(f"tritondet {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"tritondet {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
