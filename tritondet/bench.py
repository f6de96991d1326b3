"""``tritondet bench``: the benchmark rows' schema, the CSV, the markdown report and the ratio plots.

The measuring itself lives in ``benchmarks/harness.py`` (one ``bench_<family>.py`` per op family,
each case running our op and torchvision's on the same inputs in one process); this module turns
its rows into ``results.csv``, ``results.md`` and one ``<op>.png`` per op.

``ratio`` is torchvision's median time over ours: above 1 ours is faster. Rows that are counted
but not timed (the detector's post-processing stages, ``benchmarks/bench_post_processing.py``) have
no times, and their ratio is torchvision's ATen ops over ours. ``launches`` counts
Triton kernel launches plus the ATen ops that launch a device kernel (every op but views and
allocations; torchvision's compiled ops such as ``torchvision::nms`` count once, though they may
launch more than one kernel inside); ``syncs`` counts the ops that make the host wait for the
device (:mod:`tritondet.measure.dispatch_audit`). Both are counted per call on the path that was timed.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path


@dataclasses.dataclass
class Row:
    """One benchmark case: our op against torchvision's on the same inputs. Times in ms."""

    op: str
    size: str
    dtype: str
    device: str
    ours_backend: str  # what ran for us: "triton" (CUDA), "triton-interpreter" or "reference" (the CPU path)
    ours_ms: float | None  # None: counted, not timed
    ours_ms_q20: float | None
    ours_ms_q80: float | None
    torchvision_ms: float | None
    torchvision_ms_q20: float | None
    torchvision_ms_q80: float | None
    ratio: float  # torchvision_ms / ours_ms; without times torchvision_aten_ops / ours_aten_ops
    ours_launches: int
    torchvision_launches: int
    ours_syncs: int
    torchvision_syncs: int
    ours_aten_ops: int
    torchvision_aten_ops: int
    min_bytes: int  # the bytes the op must read and write at least
    ours_gbps: float | None = None  # min_bytes / ours_ms (CUDA only)
    torchvision_gbps: float | None = None
    peak_gbps: float | None = None  # the device's peak DRAM bandwidth
    ours_peak_mem: int | None = None  # peak bytes allocated during one call (CUDA only)
    torchvision_peak_mem: int | None = None
    device_name: str = ""


FIELDS = [field.name for field in dataclasses.fields(Row)]
_FIELD_TYPES = {field.name: field.type for field in dataclasses.fields(Row)}


def _parse(name: str, text: str):
    kind = _FIELD_TYPES[name]
    if text == "" and "None" in kind:
        return None
    if kind.startswith("int"):
        return int(text)
    if kind.startswith("float"):
        return float(text)
    return text


def append_csv(rows: Iterable[Row], path: Path) -> None:
    """Append ``rows`` to the CSV at ``path``, writing the header if the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in dataclasses.asdict(row).items()})


def read_csv(path: Path) -> list[Row]:
    with Path(path).open(newline="") as file:
        return [Row(**{name: _parse(name, record[name]) for name in FIELDS}) for record in csv.DictReader(file)]


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def timed(row: Row) -> bool:
    """Whether ``row`` has times (and a time ratio) or only counts (an ATen-op ratio)."""
    return row.ours_ms is not None


def markdown_table(rows: Sequence[Row]) -> str:
    """One line per case: op, size, dtype, device, ours, torchvision, ratio, launches, syncs, ATen ops
    (+ GB/s on CUDA). Counted-only rows show "-" for times and their ATen-op ratio as "<r>x ops"."""
    with_bandwidth = any(row.ours_gbps is not None for row in rows)
    header = ["op", "size", "dtype", "device", "ours ms", "torchvision ms", "ratio", "launches", "syncs", "ATen ops"]
    if with_bandwidth:
        header += ["ours GB/s (% of peak)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in rows:
        cells = [
            row.op,
            row.size,
            row.dtype,
            row.device,
            _ms(row.ours_ms),
            _ms(row.torchvision_ms),
            f"{row.ratio:.2f}x" if timed(row) else f"{row.ratio:.3g}x ops",
            f"{row.ours_launches} / {row.torchvision_launches}",
            f"{row.ours_syncs} / {row.torchvision_syncs}",
            f"{row.ours_aten_ops} / {row.torchvision_aten_ops}",
        ]
        if with_bandwidth:
            cells.append(
                "" if row.ours_gbps is None else f"{row.ours_gbps:.0f} ({100 * row.ours_gbps / row.peak_gbps:.0f}%)"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _series(rows: Sequence[Row]) -> dict[str, dict[str, list[Row]]]:
    """op -> "dtype device" -> timed rows in the order they were measured (sizes ascending)."""
    by_op: dict[str, dict[str, list[Row]]] = {}
    for row in filter(timed, rows):
        by_op.setdefault(row.op, {}).setdefault(f"{row.dtype} {row.device}", []).append(row)
    return by_op


def plot_ratios(rows: Sequence[Row], out_dir: Path) -> list[Path]:
    """One PNG per op: the ratio (torchvision / ours) at each size, one bar series per dtype and device."""
    import matplotlib  # lazy: only the report needs it (the ``bench`` extra)

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    paths = []
    for op, series in _series(rows).items():
        sizes = list(dict.fromkeys(row.size for group in series.values() for row in group))
        width = 0.8 / len(series)
        figure, axes = plt.subplots(figsize=(max(5.0, 1.3 * len(sizes) * len(series) + 2), 3.8), dpi=110)
        for i, (label, group) in enumerate(series.items()):
            xs = [sizes.index(row.size) + (i - (len(series) - 1) / 2) * width for row in group]
            ratios = [row.ratio for row in group]
            bars = axes.bar(xs, ratios, width, label=label)
            axes.bar_label(bars, labels=[f"{r:.2f}x" for r in ratios], fontsize=8, padding=2)
        axes.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        axes.set_xticks(range(len(sizes)), sizes)
        axes.set_xlabel("size")
        axes.set_ylabel("torchvision time / ours (>1: ours faster)")
        axes.set_title(f"{op}: speed relative to torchvision")
        axes.set_ylim(0, max(1.0, *(row.ratio for group in series.values() for row in group)) * 1.25)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = Path(out_dir) / f"{op}.png"
        figure.savefig(path)
        plt.close(figure)
        paths.append(path)
    return paths


def markdown_report(
    rows: Sequence[Row], environment: dict[str, str], compile_table: str | None, failures: Sequence[str] = ()
) -> str:
    lines = ["# tritondet benchmarks", ""]
    lines += [f"- {key}: {value}" for key, value in environment.items()]
    lines += [
        "",
        "ratio = torchvision time / ours (above 1: ours is faster), median of the timed calls.",
        "launches, syncs and ATen ops are per call, ours / torchvision: Triton launches plus ATen ops that",
        "launch a device kernel, ops that make the host wait for the device, all ATen ops; counted exactly,",
        "not timed. Rows without times are counted only (the detector's post-processing stages): their",
        "ratio is torchvision's ATen ops over ours, and the op name says whose path (backend) was counted.",
    ]
    if any(row.device == "cpu" for row in rows):
        lines += [
            "On the CPU ours is the PyTorch reference (the CPU path), so its counts are that path's, not",
            "the Triton kernels' (run `tritondet bench` on a GPU for those), except in rows naming the",
            "triton-interpreter: the Triton path's counts, net of the interpreter's argument copies.",
        ]
    lines += ["", markdown_table(rows)]
    if failures:
        lines += ["", "## Failed cases", "", *[f"- {failure}" for failure in failures]]
    if compile_table is not None:
        lines += [
            "",
            "## Ahead-of-time compile report (sm_80 / sm_90)",
            "",
            "```",
            compile_table,
            "```",
        ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Running the suite (needs a source checkout: the cases live in benchmarks/).
# ----------------------------------------------------------------------------------------------


def benchmark_modules(root: Path) -> list[str]:
    """The ``benchmarks.bench_<family>`` module names under ``root``, in name order."""
    return [f"benchmarks.{path.stem}" for path in sorted((Path(root) / "benchmarks").glob("bench_*.py"))]


def find_checkout() -> Path:
    """The source checkout holding ``benchmarks/``: the current directory or the package's parent."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (candidate / "benchmarks" / "harness.py").exists():
            return candidate
    raise FileNotFoundError(
        "tritondet bench needs a source checkout (it runs benchmarks/bench_*.py): run it from the repository root"
    )


def run_suite(sizes: str, only: Sequence[str] = ()) -> tuple[list[Row], list[str]]:
    """Measure every case of every benchmark module (those whose name contains one of ``only``).

    Returns the rows and one line per case (or module) that failed: a failure, e.g. our result
    differing from torchvision's, is reported and the suite goes on.
    """
    root = find_checkout()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    harness = importlib.import_module("benchmarks.harness")
    rows, failures = [], []
    for name in benchmark_modules(root):
        if only and not any(word in name for word in only):
            continue
        try:
            cases = importlib.import_module(name).cases(harness.bench_device(), sizes)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # also pytest's module-level skip (an op not there yet)
            failures.append(f"{name}: {type(error).__name__}: {error}")
            continue
        for case in cases:
            try:
                row = harness.measure(case)
            except Exception as error:
                failures.append(f"{case.id}: {type(error).__name__}: {str(error).strip().splitlines()[0]}")
                print(f"  FAILED {failures[-1]}")
                continue
            if timed(row):
                result = f"{_ms(row.ours_ms)} ms, torchvision {_ms(row.torchvision_ms)} ms"
            else:
                result = f"{row.ours_aten_ops} ATen ops, torchvision {row.torchvision_aten_ops}"
            print(f"  {row.op} {row.size} {row.dtype} {row.device}: {result}")
            rows.append(row)
    return rows, failures


def environment(sizes: str, cpu_threads: int) -> dict[str, str]:
    import platform

    import torch
    import torchvision
    import triton

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.machine()}, {os.cpu_count()} cores), {cpu_threads} torch thread(s) while timing"
    return {
        "device": device,
        "torch / torchvision / triton": f"{torch.__version__} / {torchvision.__version__} / {triton.__version__}",
        "sizes": sizes,
    }


def write_report(
    rows: Sequence[Row],
    out_dir: Path,
    environment: dict[str, str],
    compile_table: str | None,
    failures: Sequence[str] = (),
) -> str:
    """Write ``results.csv`` (replacing it), ``results.md`` and the plots; return the markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_file = out_dir / "results.csv"
    csv_file.unlink(missing_ok=True)
    append_csv(rows, csv_file)
    report = markdown_report(rows, environment, compile_table, failures)
    (out_dir / "results.md").write_text(report)
    plot_ratios(rows, out_dir)
    return report
