"""``tritondet bench``'s run: every case of every family in :mod:`tritondet.bench.cases`, measured in turn.

A failing case (e.g. our result differing from torchvision's) or family (e.g. one that cannot be
imported) is reported and the suite goes on.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from . import cases, harness
from .report import format_ms, timed


def run_suite(sizes: str, only: Sequence[str] = ()) -> tuple[list[harness.Row], list[str]]:
    """Measure every case of every family (of those whose name contains one of ``only``).

    Returns the rows and one line per case (or family) that failed.
    """
    rows, failures = [], []
    for family in cases.FAMILIES:
        if only and not any(word in family for word in only):
            continue
        module = f"{cases.__name__}.{family}"
        try:
            family_cases = importlib.import_module(module).cases(harness.bench_device(), sizes)
        except Exception as error:
            failures.append(f"{module}: {type(error).__name__}: {error}")
            continue
        for case in family_cases:
            try:
                row = harness.measure(case)
            except Exception as error:
                failures.append(f"{case.id}: {type(error).__name__}: {str(error).strip().splitlines()[0]}")
                print(f"  FAILED {failures[-1]}")
                continue
            if timed(row):
                result = f"{format_ms(row.ours_ms)} ms, torchvision {format_ms(row.torchvision_ms)} ms"
            else:
                result = f"{row.ours_aten_ops} ATen ops, torchvision {row.torchvision_aten_ops}"
            print(f"  {row.op} {row.size} {row.dtype} {row.device}: {result}")
            rows.append(row)
    return rows, failures
