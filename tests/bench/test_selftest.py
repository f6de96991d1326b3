"""``tritondet selftest``: the CPU run CI makes, and that a parity failure fails the command."""

import csv
import os
import subprocess
import sys

import torch

from tritondet import cli, ops, selftest


def _row(output: str, op: str) -> list[str]:
    """The table line of ``op``, split on runs of two or more spaces."""
    lines = [line for line in output.splitlines() if line.startswith(op + " ")]
    assert len(lines) == 1, output
    return [cell.strip() for cell in lines[0].split("  ") if cell.strip()]


def test_cpu_run_restarts_under_the_interpreter_and_passes(tmp_path):
    """Without TRITON_INTERPRET the command re-runs itself with it; small sizes, no timing."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    table = tmp_path / "selftest.csv"
    command = [sys.executable, "-m", "tritondet.cli", "selftest", "--only", "nms,roi_align", "--sizes", "small"]
    result = subprocess.run(
        [*command, "--csv", str(table)], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CPU interpreter" in result.stdout
    assert "nvidia-smi -L" in result.stdout  # how to send the table
    nms, roi_align = _row(result.stdout, "nms"), _row(result.stdout, "roi_align")
    assert nms == ["nms", "64", "torchvision", "100.00%", "-", "pass", "pass", "-"]
    assert roi_align[:3] == ["roi_align", "16x8ch 7x9", "torchvision"]
    assert roi_align[-3:] == ["pass", "pass", "-"]
    assert "2 checks, 0 failed" in result.stdout
    with table.open() as file:
        rows = list(csv.reader(file))
    assert rows[0] == selftest.HEADER
    assert [row[0] for row in rows[1:]] == ["nms", "roi_align"]


def test_a_parity_failure_fails_the_row_and_the_command(monkeypatch, capsys):
    wrong = lambda *args, **kwargs: torch.zeros(16, 8, 7, 7)
    monkeypatch.setattr(ops, "roi_align", wrong)
    assert cli.main(["selftest", "--only", "roi_align", "--sizes", "small"]) == 1
    output = capsys.readouterr().out
    row = _row(output, "roi_align")
    assert row[5:7] == ["pass", "FAIL"]  # equal to our (equally wrong) reference, not to torchvision
    assert "1 checks, 1 failed: roi_align" in output


def test_a_crash_is_a_failing_row(monkeypatch, capsys):
    def crash(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(ops, "soft_nms", crash)
    assert cli.main(["selftest", "--only", "soft_nms,box_iou", "--sizes", "small"]) == 1
    output = capsys.readouterr().out
    assert _row(output, "soft_nms")[-2:] == ["-", "RuntimeError: kernel exploded"]
    assert _row(output, "box_iou")[-3:] == ["pass", "pass", "-"]


def test_timed_rows_show_torchvision_time_over_ours(monkeypatch):
    """The ratio column, as on a GPU: only rows against torchvision are timed."""
    times = iter([3.0, 1.5])  # torchvision's median, then ours
    monkeypatch.setattr(selftest, "_median_ms", lambda function: next(times))
    checks = selftest.BUILDERS["box_iou"](False, torch.device("cpu"))
    row = selftest.run_check(checks[0], timed=True)
    assert row.cells()[-2] == "2.00x"
    batched = selftest.run_check(selftest.BUILDERS["batched_box_iou"](False, torch.device("cpu"))[0], timed=True)
    assert batched.against == "reference" and batched.ratio is None


def test_capture_is_skipped_without_a_gpu():
    row = selftest.capture_row(False, torch.device("cpu"))
    assert row.passed is None and not row.failed
    assert "skipped: no GPU" in row.note


def test_unknown_op_is_named(capsys):
    assert cli.main(["selftest", "--only", "nms,not_an_op"]) == 2
    assert "not_an_op" in capsys.readouterr().err


def test_every_public_op_is_checked():
    """A new op joins the self-test; these are checked through another name."""
    through_another = {
        "grid_anchors": "AnchorGenerator",
        "sample_balanced": "anchor_targets and proposal_targets (it launches no kernel of its own)",
        "RoIAlign": "roi_align",
        "RoIPool": "roi_pool",
        "PSRoIAlign": "ps_roi_align",
        "PSRoIPool": "ps_roi_pool",
    }
    assert set(ops.__all__) - set(selftest.OP_NAMES) == set(through_another)
