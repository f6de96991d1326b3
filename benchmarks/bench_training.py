"""Training side by side: our Faster R-CNN against torchvision's ``FasterRCNN``, same recipe and budget.

Both sides train the ``lite`` model (:class:`~tritondet.detector.backbone.LiteBackbone`, from
scratch) with ``tritondet train``'s recipe, :func:`tritondet.detector.engine.train` itself: the same
data (the synthetic set, its train split), optimizer (SGD, momentum 0.9, weight decay 1e-4), warm-up
and step decay, batch, image size, seed and wall-clock budget (``max_minutes``, which also reserves
the evaluation's time; the learning rate decays at the same fractions of it). torchvision's side is
:func:`tritondet.detector.compat.to_torchvision` around the same backbone, starting from our initial
weights (``load_state_dict``), so only the detection code differs: ours (``tritondet.ops``; Triton
kernels on CUDA, the PyTorch reference path on a CPU) against torchvision's.

Measured per side: training images/s (images over the seconds spent in training steps), inference
images/s (``model(images)`` over the val split, batches preloaded, so decoding is not timed), and
the COCO AP / AP50 reached on the synthetic val split, and the machine's 5-minute load average when
the side ended (other jobs on a shared machine slow a side down). torch's default thread count on a
CPU, as ``tritondet train``.

Sizes (``TRITONDET_BENCH_SIZES``, :func:`tritondet.bench.harness.bench_sizes`): ``tiny`` (the default, CI
smoke: 8 tiny images, 3 iterations per side, seconds), ``quick`` (5 minutes per side) and ``full``
(15 minutes per side, ``tritondet train``'s budget). Run as a script for a markdown table:

    nice python -m benchmarks.bench_training --sizes quick       # or --minutes 5; --out bench/training
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from tritondet.bench.harness import SIZES_VARIABLE, bench_device, bench_sizes
from tritondet.detector import data, evaluate
from tritondet.detector.compat import to_torchvision
from tritondet.detector.engine import TrainConfig, build_model, model_config_of, train

SIDES = ("ours", "torchvision")
# Budget per side in minutes (None: iterations only) and the run's TrainConfig changes per size set.
_SIZES = {
    "tiny": dict(
        max_minutes=None,
        iterations=3,
        num_train=8,
        num_val=4,
        min_size=64,
        max_size=96,
        warmup_iters=2,
        log_every=1,
        progress=False,
    ),
    "quick": dict(max_minutes=5.0),
    "full": dict(max_minutes=15.0),
}


class TorchvisionTrainer(nn.Module):
    """torchvision's ``FasterRCNN`` with the interface :func:`train` calls: ``generator`` is ignored
    (torchvision's samplers draw from the global generator, which :func:`train` seeds)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images, targets=None, generator=None):
        return self.detector(images, targets)


def run_config(sizes: str, output_dir: Path, data_root: str | None, minutes: float | None = None) -> TrainConfig:
    options = dict(_SIZES[sizes])
    if minutes is not None:
        options["max_minutes"] = minutes
    options.update(output_dir=str(output_dir), data_root=data_root, evaluate=False, plots=False, checkpoint_every=10**9)
    return TrainConfig(**options)


def _val_batches(config: TrainConfig) -> tuple[list, data.CocoDetection]:
    """The val split as preloaded ``(images, targets)`` batches of ``config.batch_size``."""
    synthetic = data.ensure_synthetic_dataset(
        config.data_root, seed=config.seed, num_train=config.num_train, num_val=config.num_val
    )
    val_set = data.CocoDetection(synthetic.val_images, synthetic.val_annotations)  # the models resize
    loader = data.make_data_loader(val_set, config.batch_size, shuffle=False)
    return list(loader), val_set


def train_side(side: str, config: TrainConfig, device: torch.device) -> dict:
    """Train one side with ``config``; its speeds and COCO AP on the val split."""
    model_config = model_config_of(config, len(data.SYNTHETIC_CLASSES) + 1)
    model = None
    if side == "torchvision":
        torch.manual_seed(config.seed)  # our initial weights, as train() builds them
        initial = build_model(model_config)
        detector = to_torchvision(model_config, initial.backbone)
        detector.load_state_dict(initial.state_dict())
        model = TorchvisionTrainer(detector)
    config = dataclasses.replace(config, device=str(device))
    result = train(config, model=model)
    trained = result["model"]
    batches, val_set = _val_batches(config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        predictions = evaluate.predict(trained, batches, device)
    inference_seconds = time.perf_counter() - start
    metrics = evaluate.evaluate_coco(val_set.coco, predictions, val_set.label_to_category_id)
    images = result["iteration"] * config.batch_size
    return {
        "side": side,
        "iterations": result["iteration"],
        "train_minutes": result["trained_seconds"] / 60,
        "train_images_per_s": images / max(result["trained_seconds"], 1e-9),
        "inference_images_per_s": len(val_set) / max(inference_seconds, 1e-9),
        "AP": metrics["AP"],
        "AP50": metrics["AP50"],
        "load": os.getloadavg()[1],  # the machine's 5-minute load average at the end (shared machines)
    }


def run(sizes: str, output_dir: Path, data_root: str | None = None, minutes: float | None = None) -> list[dict]:
    device = bench_device()
    results = []
    for side in SIDES:
        config = run_config(sizes, output_dir / side, data_root, minutes)
        results.append(train_side(side, config, device))
    return results


def format_table(results: list[dict], title: str = "") -> str:
    lines = [title, ""] if title else []
    lines += [
        "| model | iterations | training min | training images/s | inference images/s | AP | AP50 | load avg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['side']} | {r['iterations']} | {r['train_minutes']:.2f} | {r['train_images_per_s']:.2f} "
            f"| {r['inference_images_per_s']:.2f} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['load']:.1f} |"
        )
    return "\n".join(lines)


def test_training_side_by_side(benchmark, tmp_path):
    """The CI smoke run (``tiny``): both sides train and are evaluated. Other sizes run the real budget."""
    sizes = bench_sizes()
    data_root = str(tmp_path / "data") if sizes == "tiny" else None
    results = benchmark.pedantic(run, args=(sizes, tmp_path, data_root), rounds=1, iterations=1)
    print("\n" + format_table(results, f"training side by side ({sizes}, {bench_device().type})"))
    assert [r["side"] for r in results] == list(SIDES)
    for r in results:
        assert r["iterations"] >= _SIZES[sizes].get("iterations", 1)
        assert r["train_images_per_s"] > 0 and r["inference_images_per_s"] > 0
        assert 0 <= r["AP50"] <= 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", choices=tuple(_SIZES), default=None, help=f"default: ${SIZES_VARIABLE} or tiny")
    parser.add_argument("--minutes", type=float, help="budget per side (overrides the size set's)")
    parser.add_argument("--out", type=Path, default=Path("bench") / "training", help="run folders and training.md")
    parser.add_argument("--data-root", help="synthetic data cache (default ~/.cache/tritondet/data; tiny: a temp dir)")
    args = parser.parse_args(argv)
    if args.sizes:
        os.environ[SIZES_VARIABLE] = args.sizes
    sizes = bench_sizes()
    with tempfile.TemporaryDirectory() as scratch:
        data_root = args.data_root or (scratch if sizes == "tiny" else None)
        results = run(sizes, args.out, data_root, args.minutes)
    budget = args.minutes or _SIZES[sizes].get("max_minutes")
    device = bench_device()
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    title = f"training side by side: lite model, {sizes} ({budget} min per side), {machine}"
    table = format_table(results, title)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
