"""The benchmark suite shipped in the package (tritondet.bench, tritondet bench): the report, the harness's counting
and rows, and its independence from the source checkout."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
import torchvision

import tritondet
from tritondet import cli, ops
from tritondet.bench import cases, harness, report, suite
from tritondet.bench.inputs import random_boxes
from tritondet.measure.dispatch_audit import Costs


def _row(**changes) -> harness.Row:
    fields = dict(
        op="box_iou",
        size="2000x100",
        dtype="float32",
        device="cpu",
        ours_backend="reference",
        ours_ms=2.0,
        ours_ms_q20=1.5,
        ours_ms_q80=2.5,
        torchvision_ms=3.0,
        torchvision_ms_q20=2.9,
        torchvision_ms_q80=3.1,
        ratio=1.5,
        ours_launches=1,
        torchvision_launches=14,
        ours_syncs=0,
        torchvision_syncs=2,
        ours_aten_ops=3,
        torchvision_aten_ops=34,
        min_bytes=833600,
    )
    fields.update(changes)
    return harness.Row(**fields)


def test_csv_round_trip_keeps_types_and_missing_values(tmp_path):
    rows = [
        _row(),
        _row(size="12000x100", device="cuda", ours_gbps=512.5, peak_gbps=2039.0, ours_peak_mem=4800000),
    ]
    path = tmp_path / "out" / "results.csv"
    report.append_csv(rows[:1], path)
    report.append_csv(rows[1:], path)  # appends, one header
    assert path.read_text().count("op,size") == 1
    assert report.read_csv(path) == rows
    assert report.read_csv(path)[0].ours_gbps is None


def test_markdown_table_has_the_columns_and_one_line_per_row():
    table = report.markdown_table([_row(), _row(op="nms", size="12000", ratio=0.25)])
    lines = table.splitlines()
    assert lines[0] == "| op | size | dtype | device | ours ms | torchvision ms | ratio | launches | syncs | ATen ops |"
    assert len(lines) == 4
    assert "| box_iou | 2000x100 | float32 | cpu | 2 | 3 | 1.50x | 1 / 14 | 0 / 2 | 3 / 34 |" in lines
    assert "| 0.25x |" in lines[3]
    assert "GB/s" not in table  # no bandwidth column without CUDA rows


def _counted_row(**changes) -> harness.Row:
    """A row counted but not timed (the detector's post-processing stages)."""
    untimed = dict.fromkeys(
        ["ours_ms", "ours_ms_q20", "ours_ms_q80", "torchvision_ms", "torchvision_ms_q20", "torchvision_ms_q80"]
    )
    return _row(op="RPN proposals (ours: reference)", size="B=8 64x96", ratio=34 / 3, **untimed, **changes)


def test_counted_rows_show_no_times_and_their_aten_op_ratio(tmp_path):
    rows = [_row(), _counted_row()]
    line = report.markdown_table(rows).splitlines()[-1]
    assert (
        line
        == "| RPN proposals (ours: reference) | B=8 64x96 | float32 | cpu | - | - | 11.3x ops | 1 / 14 | 0 / 2 | 3 / 34 |"
    )
    report.append_csv(rows, tmp_path / "results.csv")
    assert report.read_csv(tmp_path / "results.csv") == rows
    assert list(report._series(rows)) == ["box_iou"]  # the time-ratio plots leave them out


def test_markdown_table_shows_peak_memory_of_timed_rows():
    table = report.markdown_table([_row(ours_peak_mem=3 * 2**20, torchvision_peak_mem=2**19), _counted_row()])
    lines = table.splitlines()
    assert lines[0].endswith("| ATen ops | peak MiB |")
    assert lines[2].endswith("| 3 / 0.5 |") and lines[3].endswith("| - |")


def test_markdown_table_shows_bandwidth_against_peak_on_cuda():
    table = report.markdown_table([_row(device="cuda", ours_gbps=1000.0, peak_gbps=2000.0)])
    assert "ours GB/s (% of peak)" in table and "| 1000 (50%) |" in table


def test_report_has_environment_table_and_compile_report():
    markdown = report.markdown_report([_row()], {"device": "CPU (test)"}, "family  kernel\nbox_iou  k")
    assert "- device: CPU (test)" in markdown
    assert report.markdown_table([_row()]) in markdown
    assert "## Ahead-of-time compile report" in markdown and "box_iou  k" in markdown
    assert "compile report" not in report.markdown_report([_row()], {}, None)
    assert "the CPU path" in markdown  # CPU rows say whose counts they are


def test_report_lists_failed_cases():
    markdown = report.markdown_report([_row()], {}, None, ["nms-12000-float32-cpu: AssertionError: differ"])
    assert "## Failed cases" in markdown and "- nms-12000-float32-cpu: AssertionError: differ" in markdown
    assert "Failed" not in report.markdown_report([_row()], {}, None)


def test_write_report_replaces_the_csv_and_draws_one_png_per_op(tmp_path):
    pytest.importorskip("matplotlib")
    report.append_csv([_row(op="stale")], tmp_path / "results.csv")
    rows = [_row(), _row(size="12000x100", ratio=0.5), _row(op="nms", size="1000"), _row(op="nms", dtype="float16")]
    report.write_report(rows, tmp_path, {"device": "test"}, None)
    assert report.read_csv(tmp_path / "results.csv") == rows
    assert (tmp_path / "results.md").read_text().count("| box_iou |") == 2
    for op in ("box_iou", "nms"):
        png = (tmp_path / f"{op}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert not (tmp_path / "stale.png").exists()


def test_every_case_family_is_found_in_the_package():
    assert {"box_iou", "nms", "post_processing", "roi_align"} <= set(cases.FAMILIES)


def test_the_package_never_imports_the_checkout_or_edits_sys_path():
    """``tritondet bench`` runs from a wheel: no module of the package imports the top-level
    ``benchmarks`` or ``tests`` folders, or edits ``sys.path`` to reach them."""
    package = Path(tritondet.__file__).parent
    sources = sorted(package.rglob("*.py"))
    assert len(sources) > 20
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                names = []
            for name in names:
                assert name.split(".")[0] not in ("benchmarks", "tests"), f"{path}: imports {name}"
            if isinstance(node, ast.Attribute) and node.attr == "path":
                assert not (isinstance(node.value, ast.Name) and node.value.id == "sys"), f"{path}: uses sys.path"


def test_the_suite_runs_one_tiny_case_into_a_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(harness.THREADS_VARIABLE, "1")
    monkeypatch.chdir(tmp_path)  # any directory: nothing is read from the current one
    rows, failures = suite.run_suite("tiny", only=["box_iou"])
    assert failures == [] and {row.op for row in rows} == {"box_iou", "generalized_box_iou"}
    report.write_report(rows[:1], tmp_path / "out", {"device": "test"}, None)
    assert report.read_csv(tmp_path / "out" / "results.csv") == rows[:1]
    assert "| box_iou | 37x11 |" in (tmp_path / "out" / "results.md").read_text()


def test_counts_see_kernel_ops_syncs_and_launches(backend):
    boxes = random_boxes(9)
    ours = harness.count(lambda: ops.box_iou(boxes, boxes))
    theirs = harness.count(lambda: torchvision.ops.box_iou(boxes, boxes))
    assert theirs.syncs == 0 and theirs.launches > 3 and theirs.aten_ops >= theirs.launches
    if backend == "triton":
        # One Triton launch; the interpreter adds its own copies, so only a lower bound here.
        assert ours.launches >= 1
    else:
        assert ours.launches > 3
    scores = torch.rand(9)
    syncing = harness.count(lambda: torchvision.ops.nms(boxes, scores, 0.5))
    assert syncing.syncs == 1 and syncing.launches == 1  # torchvision::nms is one op that syncs
    views = harness.count(lambda: boxes.view(3, 3, 4).transpose(0, 1).unsqueeze(0))
    assert views.launches == 0 and views.aten_ops == 3


def test_measure_compares_the_same_work_and_fills_a_row():
    boxes1, boxes2 = random_boxes(50), random_boxes(7)
    case = harness.Case(
        op="box_iou",
        size="50x7",
        dtype=torch.float32,
        device=torch.device("cpu"),
        inputs=lambda: (boxes1, boxes2),
        ours=ops.box_iou,
        torchvision=torchvision.ops.box_iou,
        min_bytes=57 * 16 + 350 * 4,
    )
    row = harness.measure(case)
    assert row.op == "box_iou" and row.device == "cpu" and row.ours_backend == "cpu"
    # The CPU ratio is the median of paired rounds' ratios (tests/bench/test_harness_timing.py).
    assert row.ratio > 0 and row.timed_rounds >= harness.CPU_MIN_ROUNDS
    assert row.ours_ms_q20 <= row.ours_ms <= row.ours_ms_q80
    assert row.ours_gbps is None  # a CUDA-only figure
    # The 50x7 IoU matrix (1400 bytes) is allocated at least once on each side.
    assert row.ours_peak_mem >= 50 * 7 * 4 and row.torchvision_peak_mem >= 50 * 7 * 4
    wrong = dataclasses.replace(case, ours=ops.generalized_box_iou)
    with pytest.raises(AssertionError):
        harness.measure(wrong)


def test_measure_counts_a_count_case_without_timing():
    ours, theirs = (
        Costs(aten_ops=30, interpreter_ops=20, kernel_ops=4, launches=2),
        Costs(aten_ops=40, kernel_ops=25, syncs=3),
    )
    case = harness.CountCase("stage", "B=1", torch.float32, torch.device("cpu"), lambda: (ours, theirs))
    row = harness.measure(case)
    assert row.ours_ms is None and row.torchvision_ms is None and not report.timed(row)
    assert (row.ours_aten_ops, row.torchvision_aten_ops, row.ratio) == (10, 40, 4.0)  # net of interpreter copies
    assert (row.ours_launches, row.torchvision_launches) == (6, 25)  # Triton launches + kernel ATen ops
    assert (row.ours_syncs, row.torchvision_syncs) == (0, 3)


def test_bench_command_writes_the_report(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv(harness.THREADS_VARIABLE, "1")
    out = tmp_path / "bench"
    assert cli.main(["bench", "--quick", "--only", "box_iou", "--no-compile-report", "--out", str(out)]) == 0
    rows = report.read_csv(out / "results.csv")
    assert {row.op for row in rows} == {"box_iou", "generalized_box_iou"}
    assert all(row.ratio > 0 for row in rows)
    assert (out / "box_iou.png").exists() and (out / "results.md").exists()
    assert "| op | size | dtype | device |" in capsys.readouterr().out


def test_forward_backward_cases_reset_grads_between_calls():
    def inputs():
        return random_boxes(20).requires_grad_(), random_boxes(5).requires_grad_()

    def forward_backward(boxes1, boxes2):
        torchvision.ops.generalized_box_iou(boxes1, boxes2).sum().backward()
        return boxes1.grad.clone()

    case = harness.Case(
        op="giou_fwd_bwd",
        size="20x5",
        dtype=torch.float32,
        device=torch.device("cpu"),
        inputs=inputs,
        ours=forward_backward,
        torchvision=forward_backward,
        min_bytes=0,
    )
    row = harness.measure(case)  # the check compares the two grads: equal only if reset in between
    # Same call on both sides, so the same counts: no gradient accumulation op on the second one.
    assert row.ours_aten_ops == row.torchvision_aten_ops and row.ours_launches == row.torchvision_launches


def test_a_failing_case_family_is_reported_and_the_suite_goes_on(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(cases, "FAMILIES", ("no_such_module", *cases.FAMILIES))
    monkeypatch.setenv(harness.THREADS_VARIABLE, "1")
    out = tmp_path / "bench"
    assert (
        cli.main(
            ["bench", "--quick", "--only", "no_such", "--only", "box_iou", "--no-compile-report", "--out", str(out)]
        )
        == 1
    )
    assert "FAILED tritondet.bench.cases.no_such_module: ModuleNotFoundError" in capsys.readouterr().out
    assert "## Failed cases" in (out / "results.md").read_text()
    assert len(report.read_csv(out / "results.csv")) == 2  # box_iou and generalized_box_iou still ran
