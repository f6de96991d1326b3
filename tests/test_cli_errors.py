"""Bad input at the command line: every case ends with exit status 2 and one line on stderr naming the culprit
(the file, annotation id or option) and what is wrong, no traceback; ``--debug`` adds the traceback. An
interrupted training run resumes with one log row per iteration.

Tiny files written by the tests: a hand-made COCO set of 64 x 48 images, the ``tiny`` model, a few iterations
on the CPU (reference backend, as in ``test_train.py``).
"""

import csv
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tritondet import cli
from tritondet.detector.engine import TrainConfig, train
from tritondet.detector.engine import loop as training_loop

CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "bar"}]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    # The Triton interpreter would make these runs minutes long; the kernels have their own tests.
    monkeypatch.setenv("TRITONDET_BACKEND", "reference")


def write_coco(folder: Path, count: int = 4, annotate=None, categories=CATEGORIES) -> tuple[Path, Path]:
    """``count`` 64 x 48 PNGs with a bright box each; ``annotate(image_id) -> [annotation]`` (default: the box)."""
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    images, annotations = [], []
    for image_id in range(1, count + 1):
        pixels = rng.integers(0, 60, size=(48, 64, 3), dtype=np.uint8)
        pixels[10:30, 8 + 4 * image_id : 28 + 4 * image_id] = 230
        Image.fromarray(pixels).save(image_dir / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 64, "height": 48})
        box = {"image_id": image_id, "category_id": 1 + image_id % 2, "bbox": [8 + 4 * image_id, 10, 20, 20]}
        for ann in annotate(image_id) if annotate else [box]:
            annotations.append({"id": len(annotations) + 1, "area": 400, "iscrowd": 0, **box, **ann})
    annotation_file = folder / "instances.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return image_dir, annotation_file


def train_argv(out: Path, train_files, val_files, *extra: str) -> list[str]:
    (train_images, train_annotations), (val_images, val_annotations) = train_files, val_files
    return [
        "train", "--output-dir", str(out), "--model", "tiny", "--min-size", "48", "--max-size", "64",
        "--train-images", str(train_images), "--train-annotations", str(train_annotations),
        "--val-images", str(val_images), "--val-annotations", str(val_annotations),
        "--iterations", "2", "--batch-size", "2", "--warmup-iters", "1", "--checkpoint-every", "1",
        "--log-every", "1", "--no-evaluate", "--no-plots", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-category data set and a 2-iteration checkpoint of the ``tiny`` model trained on it."""
    root = tmp_path_factory.mktemp("trained")
    files = write_coco(root / "data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITONDET_BACKEND", "reference")
        assert cli.main(train_argv(root / "run", files, files)) == 0
    return root, files, root / "run" / "last.pt"


@dataclass
class Workspace:
    """What a case builds its command line from: a folder of its own, good data and a good checkpoint."""

    folder: Path
    files: tuple[Path, Path]
    checkpoint: Path

    def train(self, *extra: str, files=None) -> list[str]:
        files = files or self.files
        return train_argv(self.folder / "run", files, self.files, *extra)

    def eval(self, *extra: str, checkpoint=None, files=None) -> list[str]:
        data = () if files is None else ("--val-images", str(files[0]), "--val-annotations", str(files[1]))
        return ["eval", "--checkpoint", str(checkpoint or self.checkpoint), *data, *extra]

    def predict(self, image, *extra: str, checkpoint=None) -> list[str]:
        image = image or self.files[0] / "1.png"
        checkpoint = checkpoint or self.checkpoint
        return ["predict", str(image), "--checkpoint", str(checkpoint), "--out", str(self.folder / "p.png"), *extra]

    def coco(self, name: str = "bad", **options) -> tuple[Path, Path]:
        return write_coco(self.folder / name, **options)

    def json_file(self, text: str) -> tuple[Path, Path]:
        image_dir, annotation_file = self.coco()
        annotation_file.write_text(text)
        return image_dir, annotation_file

    def damaged(self, name: str, content: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(content)
        return path

    def truncated_checkpoint(self) -> Path:
        whole = self.checkpoint.read_bytes()
        return self.damaged("truncated.pt", whole[: len(whole) // 2])

    def saved(self, name: str, value) -> Path:
        path = self.folder / name
        torch.save(value, path)
        return path


def _truncate_images(files: tuple[Path, Path]) -> tuple[Path, Path]:
    for png in sorted(files[0].glob("*.png")):
        png.write_bytes(png.read_bytes()[:200])
    return files


def _no_categories(w: Workspace):
    files = w.coco(categories=[])
    return w.train(files=files), str(files[1])


def _everything_missing(w: Workspace):
    files = w.coco()
    shutil.rmtree(files[0])
    files[0].mkdir()
    return w.train(files=files), str(files[1])


def _auto_with_only_corrupt_checkpoints(w: Workspace):
    (w.folder / "run").mkdir()
    (w.folder / "run" / "last.pt").write_bytes(b"\x80\x02garbage")
    (w.folder / "run" / "checkpoint_0000001.pt").write_bytes(b"")
    return w.train("--resume", "auto"), "last.pt"


def _other_class_count(w: Workspace):
    three = [*CATEGORIES, {"id": 3, "name": "disc"}]
    files = w.coco(categories=three)
    return w.train(
        "--resume", str(w.checkpoint), files=files
    ), "num_classes 3; this run builds model tiny with num_classes 4"


# Each case: its name, and (workspace -> (argv, text the one error line must hold: the culprit)).
CASES = {
    # The annotation file
    "missing annotation file": lambda w: (w.train(files=(w.files[0], w.folder / "none.json")), "none.json"),
    "malformed JSON": lambda w: (w.train(files=w.json_file('{"images": [\n  {"id": 1,}\n]}')), "line 2 column"),
    "empty JSON file": lambda w: (w.train(files=w.json_file("")), "instances.json: not valid JSON"),
    "JSON list": lambda w: (w.train(files=w.json_file("[]")), "instances.json: not a COCO instances file"),
    "no images key": lambda w: (w.train(files=w.json_file('{"categories": []}')), "'images'"),
    "images not a list": lambda w: (w.train(files=w.json_file('{"images": 3}')), "'images' must be a list"),
    "no categories": _no_categories,
    "category without name": lambda w: (
        w.train(files=w.coco(categories=[{"id": 1}])),
        "categories[0] has no valid 'name'",
    ),
    "binary annotation file": lambda w: (
        w.train(files=(w.files[0], w.damaged("instances.json", b"\xff\xfe\x00"))),
        "instances.json: not a UTF-8",
    ),
    # Nothing usable left
    "no image has annotations": lambda w: (w.train(files=w.coco(annotate=lambda i: [])), "bad/instances.json"),
    "every annotation crowd": lambda w: (
        w.train(files=w.coco(annotate=lambda i: [{"iscrowd": 1}])),
        "bad/instances.json: no image with a usable annotation",
    ),
    "only 1-pixel boxes": lambda w: (
        w.train(files=w.coco(annotate=lambda i: [{"bbox": [4, 4, 1, 9]}])),
        "bad/instances.json",
    ),
    "image folder missing": lambda w: (w.train(files=(w.folder / "nowhere", w.files[1])), "nowhere"),
    "every image file missing": _everything_missing,
    "every image truncated": lambda w: (w.train(files=_truncate_images(w.coco())), "bad/instances.json"),
    "smaller than one batch": lambda w: (
        w.train("--batch-size", "8"),
        "instances.json: the training set (4 images",
    ),
    # Bad annotations and images refused with --on-bad-data raise
    "bad annotation refused": lambda w: (
        w.train("--on-bad-data", "raise", files=w.coco(annotate=lambda i: [{"bbox": [1, 1, -5, 5]}] * (i == 2))),
        "annotation id 1 (image 2.png): non-positive width",
    ),
    "annotation without id refused": lambda w: (
        w.train("--on-bad-data", "raise", files=w.coco(annotate=lambda i: [{"id": None}])),
        "annotations[0]: no valid 'id'",
    ),
    "truncated image refused": lambda w: (
        w.train("--on-bad-data", "raise", files=_truncate_images(w.coco())),
        "cannot read image",
    ),
    # Flags
    "max-minutes nan": lambda w: (w.train("--max-minutes", "nan"), "max_minutes"),
    "max-minutes negative": lambda w: (w.train("--max-minutes", "-1"), "max_minutes"),
    "lr inf": lambda w: (w.train("--lr", "inf"), "lr must be a positive number"),
    "lr negative": lambda w: (w.train("--lr", "-0.1"), "lr must be"),
    "momentum 1.5": lambda w: (w.train("--momentum", "1.5"), "momentum"),
    "gamma nan": lambda w: (w.train("--gamma", "nan"), "gamma"),
    "lr-steps nan": lambda w: (w.train("--lr-steps", "nan"), "lr_steps"),
    "batch-size 0": lambda w: (w.train("--batch-size", "0"), "batch_size must be at least 1"),
    "min-size 0": lambda w: (w.train("--min-size", "0"), "min_size"),
    "num-workers negative": lambda w: (w.train("--num-workers", "-1"), "num_workers"),
    "iterations not a number": lambda w: (w.train("--iterations", "many"), "--iterations"),
    "unknown model": lambda w: (w.train("--model", "huge"), "model must be one of"),
    "unknown on-bad-data": lambda w: (w.train("--on-bad-data", "ignore"), "on_bad_data"),
    "unknown device": lambda w: (w.train("--device", "tpu9"), "'tpu9'"),
    "COCO paths incomplete": lambda w: (
        ["train", "--train-annotations", str(w.files[1]), "--no-progress"],
        "train_images, train_annotations, val_images and val_annotations",
    ),
    # Checkpoints to resume from
    "resume from nothing": lambda w: (w.train("--resume", str(w.folder / "gone.pt")), "gone.pt: no checkpoint"),
    "resume from a folder": lambda w: (w.train("--resume", str(w.folder)), "a directory"),
    "resume from an empty file": lambda w: (
        w.train("--resume", str(w.damaged("empty.pt", b""))),
        "empty.pt: the checkpoint file is empty",
    ),
    "resume from garbage": lambda w: (
        w.train("--resume", str(w.damaged("garbage.pt", b"\x80\x04garbage"))),
        "garbage.pt: not a readable checkpoint",
    ),
    "resume from a truncated checkpoint": lambda w: (
        w.train("--resume", str(w.truncated_checkpoint())),
        "truncated.pt: not a readable checkpoint",
    ),
    "resume from a bare state dict": lambda w: (
        w.train("--resume", str(w.saved("bare.pt", {"weight": torch.zeros(2)}))),
        "bare.pt: not a tritondet training checkpoint: it holds a bare state dict",
    ),
    "resume from an incomplete checkpoint": lambda w: (
        w.train("--resume", str(w.saved("partial.pt", {"version": 1, "iteration": 3}))),
        "partial.pt: an incomplete training checkpoint: no 'model'",
    ),
    "resume another preset": lambda w: (
        w.train("--resume", str(w.checkpoint), "--model", "lite"),
        "was trained with model tiny with num_classes 3; this run builds model lite with num_classes 3",
    ),
    "resume another class count": _other_class_count,
    "resume auto, only corrupt checkpoints": _auto_with_only_corrupt_checkpoints,
    # eval
    "eval missing checkpoint": lambda w: (w.eval(checkpoint=w.folder / "gone.pt"), "gone.pt"),
    "eval truncated checkpoint": lambda w: (w.eval(checkpoint=w.truncated_checkpoint()), "truncated.pt"),
    "eval bare state dict": lambda w: (w.eval(checkpoint=w.saved("bare.pt", {"weight": torch.zeros(2)})), "bare.pt"),
    "eval batch-size 0": lambda w: (w.eval("--batch-size", "0"), "--batch-size"),
    "eval annotations without images": lambda w: (
        w.eval("--val-annotations", str(w.files[1])),
        "val_images and val_annotations",
    ),
    "eval malformed val JSON": lambda w: (
        w.eval("--val-images", str(w.files[0]), "--val-annotations", str(w.json_file("{")[1])),
        "instances.json: not valid JSON",
    ),
    "eval every val image unreadable": lambda w: (
        w.eval(files=_truncate_images(w.coco())),
        "bad/instances.json: no image could be read",
    ),
    "eval unknown device": lambda w: (w.eval("--device", "cuda:7x"), "'cuda:7x'"),
    # predict
    "predict missing image": lambda w: (w.predict(w.folder / "no.png"), "no.png"),
    "predict truncated image": lambda w: (
        w.predict(w.damaged("cut.png", (w.files[0] / "1.png").read_bytes()[:300])),
        "cannot read image",
    ),
    "predict score-thresh nan": lambda w: (w.predict(None, "--score-thresh", "nan"), "--score-thresh"),
    "predict into a missing folder": lambda w: (
        w.predict(None, "--out", str(w.folder / "no" / "p.png")),
        "p.png: its folder",
    ),
    "predict to an unknown format": lambda w: (w.predict(None, "--out", str(w.folder / "p.xyz")), "p.xyz"),
    "predict garbage checkpoint": lambda w: (
        w.predict(None, checkpoint=w.damaged("garbage.pt", b"PK\x03\x04")),
        "garbage.pt",
    ),
    "bench threads 0": lambda w: (["bench", "--threads", "0"], "--threads"),
}


def run(argv: list[str], capsys) -> tuple[int, str]:
    """``tritondet argv``'s exit status and stderr (the bad-data warnings, ignored here, are not the error)."""
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = cli.main(argv)
    return status, capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_culprit(case, trained, tmp_path, capsys):
    _, files, checkpoint = trained
    argv, culprit = CASES[case](Workspace(tmp_path, files, checkpoint))
    status, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1, err
    assert culprit in lines[0], lines[0]
    assert "Traceback" not in err and "error:" in lines[0]


def test_unreadable_images_are_skipped_with_a_warning_by_default(tmp_path):
    bad = write_coco(tmp_path / "bad")
    (bad[0] / "3.png").write_bytes((bad[0] / "3.png").read_bytes()[:200])
    workspace = Workspace(tmp_path, bad, tmp_path)
    with pytest.warns(UserWarning, match=r"cannot read image .*3.png \(image id 3\)"):
        assert cli.main(workspace.train("--iterations", "4", "--batch-size", "1")) == 0  # an epoch: every image


def test_an_unwritable_output_folder_is_one_line(trained, tmp_path, capsys):
    _, files, _ = trained
    (tmp_path / "file").write_text("")
    argv = train_argv(tmp_path / "file" / "run", files, files)
    status, err = run(argv, capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "file/run" in err


def test_debug_adds_the_traceback(trained, tmp_path, capsys):
    _, files, _ = trained
    argv = Workspace(tmp_path, files, tmp_path).train("--resume", str(tmp_path / "gone.pt"))
    for debug in (["--debug", *argv], [*argv, "--debug"]):
        status, err = run(debug, capsys)
        assert status == 2
        assert "Traceback (most recent call last)" in err and "InputError" in err
        assert err.strip().splitlines()[-1].endswith("gone.pt: no checkpoint there (no such file)")


def read_iterations(path: Path) -> list[int]:
    with open(path, newline="") as file:
        return [int(row["iteration"]) for row in csv.DictReader(file)]


def test_resume_after_an_interruption_logs_each_iteration_once(trained, tmp_path, capsys, monkeypatch):
    """Ctrl-C after iteration 3 of 6 (checkpoints every 2): exit 130; ``--resume auto`` goes on from the
    checkpoint of iteration 2, trains 3 again, and the log holds iterations 1..6 once each."""
    _, files, _ = trained
    argv = Workspace(tmp_path, files, tmp_path).train("--iterations", "6", "--checkpoint-every", "2")
    out = tmp_path / "run"
    one_iteration = training_loop._train_iteration

    def interrupted_after_3(run, *args):
        if run.iteration == 3:
            raise KeyboardInterrupt
        return one_iteration(run, *args)

    monkeypatch.setattr(training_loop, "_train_iteration", interrupted_after_3)
    status, err = run(argv, capsys)
    assert status == 130 and err.strip() == "tritondet train: interrupted"
    assert read_iterations(out / "log.csv") == [1, 2, 3]
    monkeypatch.setattr(training_loop, "_train_iteration", one_iteration)
    assert run([*argv, "--resume", "auto"], capsys)[0] == 0
    assert read_iterations(out / "log.csv") == [1, 2, 3, 4, 5, 6]

    # Killed after iteration 6 with last.pt of iteration 4 (SIGKILL: log rows written, a row cut short).
    shutil.copy(out / "checkpoint_0000004.pt", out / "last.pt")
    with open(out / "log.csv", "a") as log:
        log.write("7,joint,3,0.01,1.2")
    assert run([*argv, "--resume", "auto"], capsys)[0] == 0
    assert read_iterations(out / "log.csv") == [1, 2, 3, 4, 5, 6]


def test_resume_auto_skips_a_corrupt_last_checkpoint(trained, tmp_path, capsys):
    _, files, _ = trained
    argv = Workspace(tmp_path, files, tmp_path).train("--iterations", "4", "--checkpoint-every", "2")
    out = tmp_path / "run"
    assert run(argv, capsys)[0] == 0
    (out / "last.pt").write_bytes((out / "last.pt").read_bytes()[:100])  # torn by a crash of the disk
    with pytest.warns(UserWarning, match=r"last.pt: not a readable checkpoint"):
        result = train(_config_of([*argv, "--resume", "auto"]))
    assert result["iteration"] == 4
    assert read_iterations(out / "log.csv") == [1, 2, 3, 4]


def test_resume_auto_after_a_first_checkpoint_write_was_interrupted(trained, tmp_path):
    """The write is atomic: a kill during it leaves ``last.pt.tmp``, no ``last.pt``; resume starts over, saying so."""
    _, files, _ = trained
    argv = Workspace(tmp_path, files, tmp_path).train()
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    (out / "log.csv").write_text("iteration,step\n1,joint\n")
    with pytest.warns(UserWarning, match=r"an interrupted write left last.pt.tmp\); starting from iteration 0"):
        result = train(_config_of([*argv, "--resume", "auto"]))
    assert result["iteration"] == 2
    assert read_iterations(out / "log.csv") == [1, 2]


def _config_of(argv: list[str]) -> TrainConfig:
    return cli.train_config(cli.build_parser().parse_args(argv))
