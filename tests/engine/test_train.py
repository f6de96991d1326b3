"""Training: a short run lowers the loss and writes a checkpoint that `eval` and `predict` load; resume
repeats the uninterrupted run; two gloo processes end with identical weights; the schedule and config checks.

Tiny runs: 8 synthetic training images resized to a 64-pixel short side, the ``lite`` model, tens of
iterations on the CPU (reference backend, as ``tritondet train`` runs on a CPU).
"""

import csv
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tritondet import cli
from tritondet.detector import data
from tritondet.detector.engine import TrainConfig, build_model, learning_rate, load_checkpoint, train
from tritondet.detector.engine.threads import thread_candidates
from tritondet.detector.visualize import pipeline_stages

NUM_TRAIN, NUM_VAL = 8, 4


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    # The Triton interpreter would make these runs minutes long; the kernels have their own tests.
    monkeypatch.setenv("TRITONDET_BACKEND", "reference")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data.ensure_synthetic_dataset(root, seed=0, num_train=NUM_TRAIN, num_val=NUM_VAL, workers=1)
    return root


def tiny_config(data_root, output_dir, **changes) -> TrainConfig:
    options = dict(
        output_dir=str(output_dir),
        data_root=str(data_root),
        num_train=NUM_TRAIN,
        num_val=NUM_VAL,
        min_size=64,
        max_size=96,
        batch_size=2,
        iterations=8,
        lr=0.01,
        warmup_iters=2,
        checkpoint_every=4,
        log_every=1,
        evaluate=False,
        plots=False,
        progress=False,
    )
    options.update(changes)
    return TrainConfig(**options)


def read_log(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_learning_rate_schedule():
    config = TrainConfig(lr=0.1, warmup_iters=10, warmup_factor=0.01, lr_steps=(0.5, 0.75), gamma=0.1)
    assert learning_rate(config, 0, 0.0) == pytest.approx(0.001)
    assert learning_rate(config, 5, 0.0) == pytest.approx(0.1 * (0.01 * 0.5 + 0.5))
    assert learning_rate(config, 10, 0.4) == pytest.approx(0.1)
    assert learning_rate(config, 50, 0.5) == pytest.approx(0.01)
    assert learning_rate(config, 80, 0.8) == pytest.approx(0.001)


@pytest.mark.parametrize(
    ("field", "value"),
    [("model", "nope"), ("iterations", 0), ("lr", -1.0), ("lr_steps", (1.5,)), ("max_minutes", 0.0), ("threads", 0)],
)
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_short_run_lowers_loss_and_checkpoint_loads(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    config = tiny_config(data_root, out, iterations=20, lr=0.02, checkpoint_every=10, evaluate=True, plots=True)
    result = train(config)
    rows = read_log(out / "log.csv")
    assert [int(r["iteration"]) for r in rows] == list(range(1, 21))
    assert all(torch.isfinite(torch.tensor([float(r["loss"]) for r in rows])))
    # The RPN's objectness loss falls first and fastest (the total rises for a while in every Faster
    # R-CNN run: a better RPN sends more foreground RoIs, whose box loss then counts).
    objectness = [float(r["loss_objectness"]) for r in rows]
    first, last = sum(objectness[:4]) / 4, sum(objectness[-4:]) / 4
    assert last < 0.7 * first, (first, last)
    for name in ("last.pt", "checkpoint_0000010.pt", "checkpoint_0000020.pt", "loss_curves.png", "detections.png"):
        assert (out / name).is_file(), name
    assert set(result["metrics"]) >= {"AP", "AP50", "per_class_AP"}

    model, checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["iteration"] == 20
    assert checkpoint["categories"][1:] == list(data.SYNTHETIC_CLASSES)
    for name, value in result["model"].state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=0, rtol=0)

    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out / "last.pt")]) == 0
    printed = capsys.readouterr().out
    assert "AP50" in printed and "circle" in printed
    image = sorted(data_root.glob("synthetic-*/val/*.png"))[0]
    assert (
        cli.main(["predict", str(image), "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "p.png")]) == 0
    )
    assert (tmp_path / "p.png").stat().st_size > 0
    argv = ["predict", str(image), "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "s.png"), "--stages"]
    assert cli.main(argv) == 0
    assert (tmp_path / "s.png").stat().st_size > (tmp_path / "p.png").stat().st_size  # four panels


def test_pipeline_stages_boxes(data_root, tmp_path):
    train(tiny_config(data_root, tmp_path, iterations=2))
    model, _ = load_checkpoint(tmp_path / "last.pt")
    image = torch.rand(3, 70, 90)
    stages = pipeline_stages(model, image, top=5)
    anchors_per_position = model.config.anchors.num_anchors()
    assert stages["anchors"].shape == (anchors_per_position * len(model.config.anchors.sizes), 4)
    centres = (stages["anchors"][:, :2] + stages["anchors"][:, 2:]) / 2
    # Every level's central anchors sit within one stride (at most 64 / (64 / 70) pixels) of the centre.
    assert ((centres - torch.tensor([45.0, 35.0])).abs() <= 70).all()
    assert stages["before_nms"].shape == (5, 4)
    assert stages["after_nms"].shape[0] <= 5
    for name in ("before_nms", "after_nms", "detections"):
        boxes = stages[name]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 90 + 1e-3).all() and (boxes[:, 3] <= 70 + 1e-3).all()


def test_resume_repeats_the_uninterrupted_run(data_root, tmp_path):
    # 8 iterations, 4 per epoch, checkpoint at 4; a fixed thread count, as in test_same_seed_same_run.
    straight = train(tiny_config(data_root, tmp_path / "a", threads=1))
    checkpoint = str(tmp_path / "a" / "checkpoint_0000004.pt")
    resumed = train(tiny_config(data_root, tmp_path / "b", resume=checkpoint, threads=1))
    assert resumed["iteration"] == 8
    assert [int(r["iteration"]) for r in read_log(tmp_path / "b" / "log.csv")] == [5, 6, 7, 8]
    for name, value in straight["model"].state_dict().items():
        torch.testing.assert_close(resumed["model"].state_dict()[name], value, atol=0, rtol=0, msg=name)
    # "auto" picks output_dir/last.pt: already at the end, nothing more is trained.
    again = train(tiny_config(data_root, tmp_path / "a", resume="auto"))
    assert again["iteration"] == 8


def test_same_seed_same_run(data_root, tmp_path):
    # A fixed thread count: the timed choice may differ between runs, and with it the order of float sums.
    first = train(tiny_config(data_root, tmp_path / "a", iterations=3, threads=1))
    second = train(tiny_config(data_root, tmp_path / "b", iterations=3, threads=1))
    assert read_log(tmp_path / "a" / "log.csv") != []
    for name, value in first["model"].state_dict().items():
        torch.testing.assert_close(second["model"].state_dict()[name], value, atol=0, rtol=0, msg=name)


def test_thread_count_chosen_then_restored(data_root, tmp_path):
    before = torch.get_num_threads()
    result = train(tiny_config(data_root, tmp_path / "chosen", iterations=4))
    assert result["threads"] in thread_candidates(before)
    assert torch.get_num_threads() == before
    result = train(tiny_config(data_root, tmp_path / "fixed", iterations=2, threads=1))
    assert result["threads"] == 1
    assert torch.get_num_threads() == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, data_root: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    os.environ["TRITONDET_BACKEND"] = "reference"
    torch.set_num_threads(1)
    config = tiny_config(data_root, out, iterations=3, batch_size=1, evaluate=True)
    result = train(config)
    torch.save(
        {"state": result["model"].state_dict(), "metrics": result["metrics"]}, os.path.join(out, f"rank{rank}.pt")
    )
    torch.distributed.destroy_process_group()


def test_two_process_gloo_run_keeps_ranks_identical(data_root, tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(data_root), str(out)), nprocs=2, join=True)
    rank0 = torch.load(out / "rank0.pt", weights_only=False)
    rank1 = torch.load(out / "rank1.pt", weights_only=False)
    for name, value in rank0["state"].items():
        torch.testing.assert_close(rank1["state"][name], value, atol=0, rtol=0, msg=name)
    # Trained: the weights moved away from the initialization both ranks started from.
    model, checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["iteration"] == 3
    torch.manual_seed(0)
    initial = build_model(model.config).state_dict()
    assert any(not torch.equal(initial[n], v) for n, v in rank0["state"].items() if v.is_floating_point())
    # Evaluation gathered every rank's share of the val split: both ranks scored the same numbers.
    assert rank0["metrics"]["AP50"] == pytest.approx(rank1["metrics"]["AP50"], nan_ok=True)
    assert [int(r["iteration"]) for r in read_log(out / "log.csv")] == [1, 2, 3]


def test_alternating_schedule_freezes_the_shared_convs(data_root, tmp_path):
    """``tritondet train --schedule alternating``: the 4 steps of Section 3.2, each step's model saved."""
    out = tmp_path / "alternating"
    config = tiny_config(data_root, out, iterations=16, evaluate=True)
    argv = ["train", "--schedule", "alternating", "--no-progress", "--no-plots"]
    for name in ("output_dir", "data_root", "num_train", "num_val", "min_size", "max_size", "iterations", "lr"):
        argv += ["--" + name.replace("_", "-"), str(getattr(config, name))]
    argv += ["--warmup-iters", "2", "--log-every", "1"]
    assert cli.main(argv) == 0
    # Iterations split 0.35/0.35/0.15/0.15; each step logs the loss terms it trains, the others empty.
    rows = read_log(out / "log.csv")
    assert [r["step"] for r in rows] == ["rpn"] * 6 + ["detector"] * 6 + ["rpn_shared"] * 2 + ["detector_shared"] * 2
    assert [int(r["iteration"]) for r in rows] == list(range(1, 17))
    for row in rows:
        rpn_step = row["step"].startswith("rpn")
        assert (row["loss_objectness"] != "") == rpn_step and (row["loss_classifier"] != "") != rpn_step, row

    s1, s2, s3, s4 = (torch.load(out / f"step{k}.pt", weights_only=False)["model"] for k in (1, 2, 3, 4))
    model, checkpoint = load_checkpoint(out / "last.pt")
    torch.manual_seed(0)
    initial = build_model(model.config).state_dict()

    def changed(before: dict, after: dict) -> set[str]:
        return {name for name in after if not torch.equal(before[name], after[name])}

    def parts(names: set[str]) -> set[str]:
        return {name.split(".")[0] for name in names}

    # Step 1 trains the backbone and the RPN; step 2 a separate detector from the same initialization.
    assert parts(changed(initial, s1)) == {"backbone", "rpn"}
    assert parts(changed(initial, s2)) == {"backbone", "roi_heads"}
    assert changed(s1, s2) & {n for n in s2 if n.startswith("backbone.")}
    # Step 3: step 2's backbone, frozen (weights and batch-norm statistics), the RPN from step 1, fine-tuned.
    before_step_3 = {**s2, **{name: value for name, value in s1.items() if name.startswith("rpn.")}}
    assert parts(changed(before_step_3, s3)) == {"rpn"}
    # Step 4: the shared convolutions still frozen, only the RoI head fine-tuned on step 3's proposals.
    assert parts(changed(s3, s4)) == {"roi_heads"}
    for name, value in s2.items():
        if name.startswith("backbone."):
            torch.testing.assert_close(s4[name], value, atol=0, rtol=0, msg=name)
    # The final model is step 4's, a normal checkpoint for eval and predict.
    assert checkpoint["iteration"] == 16 and checkpoint["train_config"]["schedule"] == "alternating"
    for name, value in s4.items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=0, rtol=0, msg=name)
    assert cli.main(["eval", "--checkpoint", str(out / "last.pt")]) == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(schedule="nope"), "schedule"),
        (dict(alternating_split=(1.0, 1.0, 1.0)), "alternating_split"),
        (dict(alternating_split=(1.0, 0.0, 1.0, 1.0)), "alternating_split"),
        (dict(schedule="alternating", resume="auto"), "resume"),
    ],
)
def test_bad_schedule(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_partial_losses_terms():
    from tritondet.detector.config import lite

    torch.manual_seed(0)
    model = build_model(lite()).train()
    images = [torch.rand(3, 64, 80)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 40.0, 50.0]]), "labels": torch.tensor([1])}]
    assert set(model.partial_losses(images, targets, rpn=False)) == {"loss_classifier", "loss_box_reg"}
    assert set(model.partial_losses(images, targets, roi_heads=False)) == {"loss_objectness", "loss_rpn_box_reg"}
    with pytest.raises(ValueError, match="rpn, roi_heads"):
        model.partial_losses(images, targets, rpn=False, roi_heads=False)
    with pytest.raises(ValueError, match="training mode"):
        model.eval().partial_losses(images, targets)
