"""The benchmark report: rows (:class:`~tritondet.bench.harness.Row`) to ``results.csv``, ``results.md`` and one PNG per op.

The measuring itself is :func:`tritondet.bench.harness.measure` (one module per op family in
:mod:`tritondet.bench.cases`, each case running our op and torchvision's on the same inputs in one
process).

``ratio`` is torchvision's time over ours: above 1 ours is faster. On the CPU the two sides are
timed in paired rounds (one call of each per round) and the ratio is the median of the rounds'
ratios; on CUDA it is torchvision's median time over ours. Rows that are counted
but not timed (the detector's post-processing stages, :mod:`tritondet.bench.cases.post_processing`) have
no times, and their ratio is torchvision's ATen ops over ours. ``launches`` counts
Triton kernel launches plus the ATen ops that launch a device kernel (every op but views and
allocations; torchvision's compiled ops such as ``torchvision::nms`` count once, though they may
launch more than one kernel inside); ``syncs`` counts the ops that make the host wait for the
device (:mod:`tritondet.measure.dispatch_audit`). Both are counted per call on the path that was timed.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .harness import Row

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


def format_ms(value: float | None) -> str:
    """A time in ms to 3 significant digits (whole ms from 100 on); "-" for no time."""
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def timed(row: Row) -> bool:
    """Whether ``row`` has times (and a time ratio) or only counts (an ATen-op ratio)."""
    return row.ours_ms is not None


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3g}"


def markdown_table(rows: Sequence[Row]) -> str:
    """One line per case: op, size, dtype, device, ours, torchvision, ratio, launches, syncs, ATen ops
    (+ peak MiB of one call on timed rows, + GB/s on CUDA). Counted-only rows show "-" for times
    and their ATen-op ratio as "<r>x ops"."""
    with_bandwidth = any(row.ours_gbps is not None for row in rows)
    with_memory = any(row.ours_peak_mem is not None for row in rows)
    header = ["op", "size", "dtype", "device", "ours ms", "torchvision ms", "ratio", "launches", "syncs", "ATen ops"]
    if with_memory:
        header += ["peak MiB"]
    if with_bandwidth:
        header += ["ours GB/s (% of peak)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in rows:
        cells = [
            row.op,
            row.size,
            row.dtype,
            row.device,
            format_ms(row.ours_ms),
            format_ms(row.torchvision_ms),
            f"{row.ratio:.2f}x" if timed(row) else f"{row.ratio:.3g}x ops",
            f"{row.ours_launches} / {row.torchvision_launches}",
            f"{row.ours_syncs} / {row.torchvision_syncs}",
            f"{row.ours_aten_ops} / {row.torchvision_aten_ops}",
        ]
        if with_memory:
            cells.append(
                "-" if row.ours_peak_mem is None else f"{_mib(row.ours_peak_mem)} / {_mib(row.torchvision_peak_mem)}"
            )
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
        "ratio = torchvision time / ours (above 1: ours is faster). On the CPU both sides are timed in paired",
        "rounds (after a warm-up call of each, one call of ours and one of torchvision's per round, in",
        "alternating order): ours ms and torchvision ms are each side's median call, the ratio is the median",
        "of the rounds' ratios, so load from other processes, hitting both calls of a round, cancels out.",
        "On CUDA each side is timed with triton.testing.do_bench and the ratio is that of the medians.",
        "launches, syncs and ATen ops are per call, ours / torchvision: Triton launches plus ATen ops that",
        "launch a device kernel, ops that make the host wait for the device, all ATen ops; counted exactly,",
        "not timed. Rows without times are counted only (the detector's post-processing stages): their",
        "ratio is torchvision's ATen ops over ours, and the op name says whose path (backend) was counted.",
        "peak MiB, ours / torchvision: the most one call holds allocated at once (its inputs excluded).",
    ]
    if any(row.device == "cpu" for row in rows):
        lines += [
            "On the CPU ours is the CPU path (`auto`: the fast CPU backend), so its counts are that path's, not",
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
        "load average (1, 5, 15 min) after the run": ", ".join(f"{load:.2f}" for load in os.getloadavg()),
    }


def write_report(
    rows: Sequence[Row],
    out_dir: Path,
    environment: dict[str, str],
    compile_table: str | None,
    failures: Sequence[str] = (),
) -> list[Path]:
    """Write ``results.csv`` (replacing it), ``results.md`` and, if matplotlib is installed (the
    ``bench`` extra), the plots; return the plots' paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_file = out_dir / "results.csv"
    csv_file.unlink(missing_ok=True)
    append_csv(rows, csv_file)
    report = markdown_report(rows, environment, compile_table, failures)
    (out_dir / "results.md").write_text(report)
    if importlib.util.find_spec("matplotlib") is None:
        return []
    return plot_ratios(rows, out_dir)
