"""Training the detector: SGD with warm-up and step decay, checkpoints, logs, multi-process (torchrun).

``tritondet train`` (no arguments) runs :func:`train` with :class:`TrainConfig`'s defaults: it generates
the synthetic data set if missing, trains the CPU-friendly ``lite`` model (a narrow ResNet-like
backbone with an FPN, trained from scratch: no pretrained weights are ever downloaded), evaluates
on the val split with COCO AP and prints the table.

The recipe (Faster R-CNN paper Section 3.3 / torchvision's reference scripts): SGD, momentum 0.9,
weight decay 1e-4, a linear warm-up over ``warmup_iters`` from ``warmup_factor * lr``, then the learning
rate times ``gamma`` at each of ``lr_steps`` (fractions of the run). The run's progress is the larger of
``iteration / iterations`` and the elapsed fraction of the ``max_minutes`` budget, so a run cut short
by its budget still decays its learning rate before it stops. Gradients are clipped to
``clip_grad_norm``; on CUDA the forward pass runs under bf16 autocast (``amp``).

Outputs in ``output_dir``: ``checkpoint_<iteration>.pt`` every ``checkpoint_every`` iterations (joint
schedule) and ``last.pt`` (model, optimizer, iteration, elapsed time, random states, configs),
``log.csv`` (one row per ``log_every`` iterations, naming the schedule's step; the loss terms a step
does not train are empty), TensorBoard events when ``tensorboard`` is installed, ``loss_curves.png``,
``detections.png`` (a few val images with their detections), ``metrics.json``.

Schedules (``schedule``): ``"joint"`` (the default) trains everything at once on the sum of the four
losses (the paper's approximate joint training). ``"alternating"`` is the paper's 4-step alternating
training (Section 3.2), each step a training of its own (fresh SGD, warm-up and step decay over the
step) on :meth:`FasterRCNN.partial_losses <tritondet.detector.faster_rcnn.FasterRCNN.partial_losses>`:

1. ``rpn``: the backbone and the RPN, on the RPN's losses.
2. ``detector``: a separate detector (its own backbone, from the same initial weights) and its RoI
   head, on the RoI head's losses for step 1's proposals (step 1's model frozen, no gradients).
3. ``rpn_shared``: step 2's backbone frozen (the shared convolutions: no gradients, batch norm in eval
   mode), the RPN initialized from step 1's; only the RPN's own layers are fine-tuned.
4. ``detector_shared``: the shared convolutions still frozen, only the RoI head is fine-tuned, on the
   proposals of step 3's RPN.

The final model - step 2's backbone, step 3's RPN, step 4's RoI head - is saved as ``last.pt``, a
normal checkpoint; each step's model as ``step<k>.pt``. The budget is split by ``alternating_split``
(default 0.35, 0.35, 0.15, 0.15: steps 1 and 2 train a backbone from scratch, steps 3 and 4 only
fine-tune heads): step k runs ``round(iterations * split_k / sum(split))`` iterations and gets the
share ``split_k / sum(split_k..4)`` of the time left when it starts (a step ending early leaves more
to the next). The time left excludes the evaluation's reserve, re-estimated from the current step's
speed as in joint training: slow steps 1 and 2 reserve more, so the faster frozen-backbone steps 3
and 4 can end up with more than their share. Frozen RPNs propose with their test settings (``post_nms_top_n[1]``), as the final
model does. The alternating schedule runs in one process and does not resume.

Multi-process: launched by ``torchrun --nproc_per_node N -m tritondet.cli train ...`` the run uses
``DistributedDataParallel`` (NCCL on CUDA, gloo on CPU), a ``DistributedSampler`` per rank (the
batch size is per process), logs and checkpoints on rank 0 only, and evaluates every rank's share of
the val split, gathered with :func:`~tritondet.detector.evaluate.gather_predictions`.

Reproducibility: ``seed`` fixes the model's initialization, the data order, the flips and the
detector's anchor/RoI sampling (rank r samples with ``seed + r``), so a CPU run repeats exactly.
Resuming from a checkpoint taken at an epoch boundary repeats the uninterrupted run exactly; from
the middle of an epoch the skipped batches are re-drawn, so the flips may differ.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torchvision.utils import draw_bounding_boxes

from .. import ops
from ..kernels._common import clip_to_images
from . import data, evaluate
from .backbone import LiteBackbone, feature_strides
from .config import (
    MODEL_PRESETS,
    AnchorConfig,
    BackboneConfig,
    FasterRCNNConfig,
    RoIHeadsConfig,
    RPNConfig,
    TransformConfig,
)
from .faster_rcnn import LOSS_NAMES, FasterRCNN
from .rpn import RPN_BOX_WEIGHTS, flatten_head_outputs

__all__ = [
    "TrainConfig",
    "build_model",
    "draw_detections",
    "evaluate_checkpoint",
    "load_checkpoint",
    "model_config_of",
    "pipeline_stages",
    "predict_image",
    "read_image",
    "train",
]

CHECKPOINT_VERSION = 1


def build_model(config: FasterRCNNConfig) -> FasterRCNN:
    """The detector for ``config``; ``config.backbone is None`` means :class:`~.backbone.LiteBackbone`
    (the ``lite`` preset)."""
    backbone = LiteBackbone() if config.backbone is None else None
    return FasterRCNN(config, backbone=backbone)


def model_config_of(config: TrainConfig, num_classes: int) -> FasterRCNNConfig:
    """The model a run of ``config`` trains: its preset with ``num_classes`` and the image sizes it overrides."""
    model_config = MODEL_PRESETS[config.model](num_classes)
    if config.min_size is not None or config.max_size is not None:
        model_config = model_config.replace(
            transform=dict(
                min_size=config.min_size or model_config.transform.min_size,
                max_size=config.max_size or model_config.transform.max_size,
            )
        )
    return model_config


def _tuples(value):
    """Lists (from JSON or ``dataclasses.asdict``) back to the tuples the configs hold."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _config_from_dict(values: dict) -> FasterRCNNConfig:
    sections = {
        "transform": TransformConfig,
        "backbone": BackboneConfig,
        "anchors": AnchorConfig,
        "rpn": RPNConfig,
        "roi_heads": RoIHeadsConfig,
    }
    kwargs = {}
    for name, cls in sections.items():
        section = values.get(name)
        kwargs[name] = None if section is None else cls(**{k: _tuples(v) for k, v in section.items()})
    return FasterRCNNConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every option of a training run (the ``tritondet train`` flags have the same names)."""

    output_dir: str = "runs/train"
    # Data: the synthetic set (generated into data_root, default ~/.cache/tritondet/data) unless the
    # COCO-format train_* paths are given.
    data_root: str | None = None
    num_train: int = 2000  # synthetic training images (ignored with COCO data)
    num_val: int = 200
    train_images: str | None = None
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    # Model: a preset of MODEL_PRESETS; min_size/max_size override its image sizes when set.
    model: str = "lite"
    min_size: int | None = None
    max_size: int | None = None
    # Optimization.
    iterations: int = 20000  # on 2 CPU cores the 15-minute budget ends the run first
    batch_size: int = 2  # images per process; from scratch, more steps beat bigger batches at equal cost
    lr: float = 0.01  # the rate of the measured 15-minute CPU run (batch 2, from scratch); not swept
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    warmup_factor: float = 1e-3
    lr_steps: tuple[float, ...] = (0.7, 0.9)  # fractions of the run's progress
    gamma: float = 0.1
    clip_grad_norm: float = 10.0
    # "joint" (approximate joint training) or "alternating" (the paper's 4 steps, see the module docstring);
    # alternating_split: each step's share of the iterations and of the time budget.
    schedule: str = "joint"
    alternating_split: tuple[float, ...] = (0.35, 0.35, 0.15, 0.15)
    amp: bool = True  # bf16 autocast, on CUDA only
    max_minutes: float | None = 15.0  # wall-clock budget of the whole run, evaluation (when on) included
    # Bookkeeping.
    seed: int = 0
    num_workers: int | None = None  # default: 2 on CUDA, 0 on the CPU (the model needs both cores there)
    checkpoint_every: int = 500
    log_every: int = 10
    resume: str | None = None  # a checkpoint path, or "auto": output_dir/last.pt if it exists
    evaluate: bool = True
    plots: bool = True
    progress: bool = True
    device: str | None = None  # default: cuda if available, else cpu
    extra: dict = field(default_factory=dict)  # free-form notes stored in the checkpoint

    def __post_init__(self) -> None:
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"model must be one of {sorted(MODEL_PRESETS)}, got {self.model!r}")
        for name in ("iterations", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.clip_grad_norm <= 0:
            raise ValueError(f"lr and clip_grad_norm must be positive, got {self.lr}, {self.clip_grad_norm}")
        if any(not 0 < s < 1 for s in self.lr_steps):
            raise ValueError(f"lr_steps must be fractions in (0, 1), got {self.lr_steps}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if len(self.alternating_split) != 4 or any(share <= 0 for share in self.alternating_split):
            raise ValueError(f"alternating_split must be 4 positive shares, got {self.alternating_split}")
        if self.schedule == "alternating" and self.resume is not None:
            raise ValueError("resume: the alternating schedule cannot resume (it writes step<k>.pt after each step)")
        self.lr_steps = tuple(self.lr_steps)
        self.alternating_split = tuple(self.alternating_split)


SCHEDULES = ("joint", "alternating")


def learning_rate(config: TrainConfig, iteration: int, progress: float) -> float:
    """Linear warm-up over ``warmup_iters`` iterations, then ``gamma`` at each step of ``lr_steps`` passed."""
    factor = config.gamma ** sum(progress >= step for step in config.lr_steps)
    if iteration < config.warmup_iters:
        alpha = iteration / config.warmup_iters
        factor *= config.warmup_factor * (1 - alpha) + alpha
    return config.lr * factor


# ---------------------------------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------------------------------


def _init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _average_buffers(model: nn.Module) -> None:
    """Average the floating buffers (batch-norm statistics) over the ranks. DDP copies rank 0's buffers
    into every rank at each forward, but each rank's last forward updates its own: averaging before a
    checkpoint and at the end leaves every rank with the same model, using every rank's statistics."""
    if not _distributed():
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(dist.get_world_size())


def _max_over_ranks(value: float) -> float:
    """The largest ``value`` of all ranks, so time-based decisions agree everywhere."""
    if not _distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def _datasets(config: TrainConfig, model_config: FasterRCNNConfig, rank: int):
    transform = model_config.transform
    train_tf = data.DetectionTransform(transform.min_size, transform.max_size, train=True)
    val_tf = data.DetectionTransform(transform.min_size, transform.max_size, train=False)
    if config.train_annotations:
        if not (config.train_images and config.val_images and config.val_annotations):
            raise ValueError("COCO data needs train_images, train_annotations, val_images and val_annotations")
        paths = (config.train_images, config.train_annotations, config.val_images, config.val_annotations)
    else:
        if rank == 0:
            synthetic = data.ensure_synthetic_dataset(
                config.data_root, seed=config.seed, num_train=config.num_train, num_val=config.num_val
            )
        if _distributed():
            dist.barrier()  # rank 0 generated it; the others find it complete
        synthetic = data.ensure_synthetic_dataset(
            config.data_root, seed=config.seed, num_train=config.num_train, num_val=config.num_val
        )
        paths = (synthetic.train_images, synthetic.train_annotations, synthetic.val_images, synthetic.val_annotations)
    train_set = data.CocoDetection(paths[0], paths[1], train_tf, remove_images_without_annotations=True)
    val_set = data.CocoDetection(paths[2], paths[3], val_tf)
    return train_set, val_set


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, model: nn.Module, optimizer, state: dict) -> None:
    """Write atomically (a temporary file renamed into place): an interrupted save leaves the old one."""
    payload = {"version": CHECKPOINT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(), **state}
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[FasterRCNN, dict]:
    """The model (in eval mode, on ``device``) and the whole checkpoint dict of a training run."""
    checkpoint = torch.load(path, map_location=device, weights_only=False)  # our own file: configs are plain dicts
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: not a tritondet training checkpoint (version {checkpoint.get('version')})")
    model = build_model(_config_from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint


def _resume_path(config: TrainConfig) -> Path | None:
    if config.resume is None:
        return None
    if config.resume == "auto":
        last = Path(config.output_dir) / "last.pt"
        return last if last.is_file() else None
    path = Path(config.resume)
    if not path.is_file():
        raise ValueError(f"resume: no checkpoint at {path}")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Logs and pictures
# ---------------------------------------------------------------------------------------------------------------------

_CSV_FIELDS = ("iteration", "step", "epoch", "lr", "loss", *LOSS_NAMES, "images_per_s", "elapsed_s")
# Progress-bar names of the loss terms.
_SHORT_NAMES = {
    "loss": "loss",
    "loss_objectness": "obj",
    "loss_rpn_box_reg": "rpn_box",
    "loss_classifier": "cls",
    "loss_box_reg": "box",
}
_CURVE_COLORS = ((0, 0, 0), (214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14))


def plot_loss_curves(csv_path: Path, out_path: Path, size: tuple[int, int] = (800, 480)) -> None:
    """The total and per-term losses of ``log.csv`` against the iteration, drawn with PIL, log-scale y."""
    with open(csv_path, newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows:
        return
    names = ("loss", *LOSS_NAMES)
    iterations = [int(r["iteration"]) for r in rows]
    # Per term, the runs of consecutive rows that log it (an alternating step trains some terms only).
    series = {n: [[]] for n in names}
    for iteration, row in zip(iterations, rows, strict=True):
        for n in names:
            if row.get(n):
                series[n][-1].append((iteration, max(float(row[n]), 1e-4)))
            elif series[n][-1]:
                series[n].append([])
    values = [v for runs in series.values() for run in runs for _, v in run]
    width, height = size
    left, right, top, bottom = 60, 170, 20, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    low = math.log10(min(values))
    high = math.log10(max(values))
    high = high if high > low else low + 1
    x_max = max(iterations[-1], iterations[0] + 1)

    def point(iteration: int, value: float) -> tuple[float, float]:
        x = left + (iteration - iterations[0]) / (x_max - iterations[0]) * (width - left - right)
        y = top + (high - math.log10(value)) / (high - low) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for exponent in range(math.floor(low), math.ceil(high) + 1):
        y = point(iterations[0], 10.0**exponent)[1]
        if top <= y <= height - bottom:
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((5, y - 6), f"1e{exponent}", fill="black")
    for fraction in (0, 0.5, 1):
        iteration = round(iterations[0] + fraction * (x_max - iterations[0]))
        x = point(iteration, 1.0)[0]
        draw.text((x - 10, height - bottom + 6), str(iteration), fill="black")
    draw.text(((width - right) // 2, height - 18), "iteration", fill="black")
    for i, name in enumerate(names):
        color = _CURVE_COLORS[i]
        for run in series[name]:
            if run:
                draw.line([point(t, v) for t, v in run], fill=color, width=2)
        draw.line([width - right + 10, top + 10 + 16 * i, width - right + 30, top + 10 + 16 * i], fill=color, width=2)
        draw.text((width - right + 35, top + 4 + 16 * i), name, fill="black")
    image.save(out_path)


def draw_detections(
    image: Tensor, prediction: dict, categories: list[str], score_thresh: float = 0.5, color: str = "red"
) -> Tensor:
    """``image`` ``[3, H, W]`` in [0, 1] with the boxes scoring at least ``score_thresh``, labelled
    ``"name score"``; returns ``uint8 [3, H, W]``."""
    keep = prediction["scores"] >= score_thresh
    boxes = prediction["boxes"][keep].detach().float().cpu()
    names = [
        f"{categories[int(label)]} {float(score):.2f}"
        for label, score in zip(prediction["labels"][keep], prediction["scores"][keep], strict=True)
    ]
    pixels = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return draw_bounding_boxes(pixels, boxes, labels=names, colors=color, width=2)


def save_image_grid(images: list[Tensor], path: Path, columns: int = 4, gap: int = 4) -> None:
    """Tile ``uint8 [3, H_i, W_i]`` images of different sizes into one PNG."""
    cell_h = max(i.shape[1] for i in images)
    cell_w = max(i.shape[2] for i in images)
    rows = math.ceil(len(images) / columns)
    columns = min(columns, len(images))
    canvas = Image.new("RGB", (columns * (cell_w + gap) - gap, rows * (cell_h + gap) - gap), "white")
    for k, tile in enumerate(images):
        r, c = divmod(k, columns)
        canvas.paste(Image.fromarray(tile.permute(1, 2, 0).numpy()), (c * (cell_w + gap), r * (cell_h + gap)))
    canvas.save(path)


def _plot_val_detections(model: FasterRCNN, val_set, categories, device, out_path: Path, count: int = 8) -> None:
    images = [val_set[i][0] for i in range(min(count, len(val_set)))]
    with torch.no_grad():
        outputs = model([image.to(device) for image in images])
    save_image_grid([draw_detections(i, o, categories) for i, o in zip(images, outputs, strict=True)], out_path)


# ---------------------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------------------


def _loss_terms(losses: dict[str, Tensor]) -> dict[str, float]:
    """The terms of :data:`LOSS_NAMES` present (an alternating step trains some) and their sum, ``loss``."""
    values = {name: float(losses[name].detach()) for name in LOSS_NAMES if name in losses}
    values["loss"] = sum(values.values())
    return values


def _optimizer(config: TrainConfig, modules: tuple[nn.Module, ...]) -> torch.optim.SGD:
    """SGD over the parameters of ``modules`` that require gradients."""
    parameters = [p for module in modules for p in module.parameters() if p.requires_grad]
    # No weight decay on biases and batch-norm parameters (1-d), as torchvision's reference scripts can do;
    # the paper decays everything, but from scratch on small data the decayed norms slow training down.
    decay = [p for p in parameters if p.ndim > 1]
    no_decay = [p for p in parameters if p.ndim <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        momentum=config.momentum,
    )


@dataclass
class _Step:
    """One training step of a schedule: ``model``'s losses (``FasterRCNN.partial_losses`` options
    ``losses``) optimize the parameters of ``trained``; the other parts of ``models`` are frozen."""

    name: str
    model: nn.Module
    trained: tuple[nn.Module, ...]
    iterations: int
    share: float  # of the time budget left when the step starts
    losses: dict = field(default_factory=dict)
    models: tuple[nn.Module, ...] = ()
    trainable: frozenset = frozenset()  # ids of the parameters the preset trains at all
    before: Callable[[], object] | None = None


def _alternating_steps(config: TrainConfig, model: FasterRCNN) -> list[_Step]:
    """The paper's 4-step alternating training (Section 3.2) on ``model`` and a copy of its initial weights."""
    first = model  # steps 1: backbone + RPN
    second = copy.deepcopy(model)  # step 2's separate detector, from the same initialization; the final model
    split = config.alternating_split
    counts = [max(1, round(config.iterations * share / sum(split))) for share in split]
    shares = [share / sum(split[k:]) for k, share in enumerate(split)]
    models = (first, second)
    trainable = frozenset(id(p) for m in models for p in m.parameters() if p.requires_grad)

    def rpn_from_step_1():
        second.rpn.load_state_dict(first.rpn.state_dict())

    common = dict(models=models, trainable=trainable)
    return [
        _Step("rpn", first, (first.backbone, first.rpn), counts[0], shares[0], dict(roi_heads=False), **common),
        _Step(
            "detector",
            second,
            (second.backbone, second.roi_heads),
            counts[1],
            shares[1],
            dict(rpn=False, proposer=first),
            **common,
        ),
        _Step(
            "rpn_shared",
            second,
            (second.rpn,),
            counts[2],
            shares[2],
            dict(roi_heads=False),
            before=rpn_from_step_1,
            **common,
        ),
        _Step("detector_shared", second, (second.roi_heads,), counts[3], shares[3], dict(rpn=False), **common),
    ]


def _prepare_step(step: _Step) -> None:
    """Freeze all but ``step.trained``: no gradients, and eval mode (batch norm keeps its statistics, a
    frozen RPN proposes with its test settings, as the final model will); the models stay in training
    mode at the top level, where the losses are computed."""
    for model in step.models:
        model.train()
        for part in (model.backbone, model.rpn, model.roi_heads):
            trained = any(part is module for module in step.trained)
            part.train(trained)
            for parameter in part.parameters():
                parameter.requires_grad_(trained and id(parameter) in step.trainable)
    if step.before is not None:
        step.before()


def train(config: TrainConfig, model: nn.Module | None = None) -> dict:
    """Run the training described by ``config``; return ``{"model", "metrics", "iteration", "output_dir", ...}``.

    ``metrics`` is :func:`~tritondet.detector.evaluate.evaluate_coco`'s result (``None`` when
    ``evaluate`` is off). Works as a single process or under torchrun (see the module docstring).
    ``model``: a module to train instead of the ``config.model`` preset's (the training benchmark
    trains torchvision's ``FasterRCNN`` with this recipe); it must take ``(images, targets,
    generator=...)`` and return the four :data:`LOSS_NAMES` terms in training mode, and its checkpoints
    are not for :func:`load_checkpoint`.
    """
    start = time.monotonic()
    deadline = None if config.max_minutes is None else start + 60 * config.max_minutes
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world_size = _init_distributed(device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    main = rank == 0
    output_dir = Path(config.output_dir)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    # Data first: the model's class count is the data set's.
    train_set, val_set = _datasets(config, model_config_of(config, 2), rank)
    model_config = model_config_of(config, train_set.num_classes)
    categories = list(train_set.categories)
    num_workers = config.num_workers if config.num_workers is not None else (2 if device.type == "cuda" else 0)
    loader = data.make_data_loader(
        train_set, config.batch_size, shuffle=True, num_workers=num_workers, seed=config.seed,
        distributed=world_size > 1, drop_last=True,
    )  # fmt: skip
    if len(loader) == 0:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one batch ({config.batch_size})")

    torch.manual_seed(config.seed)  # the same initial weights on every rank, however the data was made
    alternating = config.schedule == "alternating"
    if alternating and (world_size > 1 or model is not None):
        raise ValueError("schedule='alternating' runs in one process, on the model preset (no torchrun, no model=)")
    model = (build_model(model_config) if model is None else model).to(device)
    sampling = torch.Generator(device=device).manual_seed(config.seed + rank)
    iteration, trained_seconds = 0, 0.0
    if alternating:
        steps = _alternating_steps(config, model)
    else:
        steps = [_Step("joint", model, (model,), config.iterations, 1.0)]
    optimizer = _optimizer(config, (model,))
    resume = _resume_path(config)
    if resume is not None:
        checkpoint = torch.load(resume, map_location=device, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        iteration, trained_seconds = checkpoint["iteration"], checkpoint["trained_seconds"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        sampling.set_state(checkpoint["rng"]["sampling"][rank].to("cpu"))
    ddp = model
    if world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    writer = None
    if main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(output_dir / "tensorboard")
        except ImportError:  # TensorBoard is optional
            writer = None
    csv_path = output_dir / "log.csv"
    csv_file = None
    if main:
        fresh = resume is None or not csv_path.is_file()
        csv_file = open(csv_path, "w" if fresh else "a", newline="")  # noqa: SIM115 - closed in finally
        log = csv.DictWriter(csv_file, _CSV_FIELDS)
        if fresh:
            log.writeheader()
            csv_file.flush()

    def state(saved: nn.Module) -> dict:
        _average_buffers(saved)
        sampling_states = [sampling.get_state()]
        if _distributed():
            sampling_states = [None] * world_size
            dist.all_gather_object(sampling_states, sampling.get_state())
        return {
            "iteration": iteration,
            "trained_seconds": trained_seconds,
            "rng": {"torch": torch.get_rng_state(), "sampling": sampling_states},
            "model_config": dataclasses.asdict(model_config),
            "train_config": dataclasses.asdict(config),
            "categories": categories,
            "label_to_category_id": dict(train_set.label_to_category_id),
        }

    use_amp = config.amp and device.type == "cuda"
    seconds_per_iteration = None  # running mean, to reserve time for the evaluation
    bar = None
    try:
        for number, step in enumerate(steps, start=1):
            if alternating:
                _prepare_step(step)
                optimizer = _optimizer(config, step.trained)
            else:
                model.train()
            step_start, step_seconds_start = iteration if alternating else 0, trained_seconds
            label = f"step {number}/4 {step.name}" if alternating else "train"
            if main and config.progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=step.iterations, initial=iteration - step_start, desc=label, dynamic_ncols=True)
            parameters = [p for module in step.trained for p in module.parameters() if p.requires_grad]
            epoch = iteration // len(loader)
            skip = iteration % len(loader)
            interval_images, interval_start = 0, time.monotonic()
            running, running_count = {}, {}
            progress = (iteration - step_start) / step.iterations
            stop = iteration - step_start >= step.iterations
            while not stop:
                if world_size > 1:
                    loader.sampler.set_epoch(epoch)
                else:
                    loader.generator.manual_seed(config.seed * 100_003 + epoch)  # epoch e's order, resumable
                for batch_index, (images, targets) in enumerate(loader):
                    if batch_index < skip:
                        continue
                    step_begin = time.monotonic()
                    images = [image.to(device, non_blocking=True) for image in images]
                    targets = [
                        {"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets
                    ]  # fmt: skip
                    lr = learning_rate(config, iteration - step_start, progress)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                        if alternating:
                            losses = step.model.partial_losses(images, targets, sampling, **step.losses)
                        else:
                            losses = ddp(images, targets, generator=sampling)
                    loss = sum(value.float() for name, value in losses.items() if name in LOSS_NAMES)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"iteration {iteration}: the loss is {float(loss)}; lower the lr")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(parameters, config.clip_grad_norm)
                    optimizer.step()
                    iteration += 1
                    step_seconds = time.monotonic() - step_begin
                    trained_seconds += step_seconds
                    seconds_per_iteration = (
                        step_seconds
                        if seconds_per_iteration is None
                        else 0.9 * seconds_per_iteration + 0.1 * step_seconds
                    )
                    for name, value in _loss_terms(losses).items():
                        running[name] = running.get(name, 0.0) + value
                        running_count[name] = running_count.get(name, 0) + 1
                    interval_images += len(images) * world_size

                    # Progress and the time budget: the evaluation's share is reserved from the running
                    # speed; an alternating step gets its share of the time left (step.share).
                    progress = (iteration - step_start) / step.iterations
                    if deadline is not None:
                        now = time.monotonic()
                        val_batches = math.ceil(len(val_set) / (config.batch_size * world_size))
                        # Inference ~ 1/2 a training step; 20 s for the last checkpoint and the plots.
                        reserve = (0.5 * val_batches * seconds_per_iteration if config.evaluate else 0.0) + 20.0
                        budget_end = deadline - reserve
                        spent = trained_seconds - step_seconds_start
                        fraction = spent / max(step.share * (budget_end - (now - spent)), 1e-9)
                        progress = max(progress, _max_over_ranks(fraction))
                    stop = iteration - step_start >= step.iterations or progress >= 1.0

                    if main and (iteration % config.log_every == 0 or stop):
                        now = time.monotonic()
                        speed = interval_images / max(now - interval_start, 1e-9)
                        means = {name: running[name] / running_count[name] for name in running}
                        row = {"iteration": iteration, "step": step.name, "epoch": epoch, "lr": f"{lr:.6g}"}
                        row["images_per_s"] = f"{speed:.3f}"
                        row.update({name: f"{value:.5f}" for name, value in means.items()})
                        row["elapsed_s"] = f"{trained_seconds:.1f}"
                        log.writerow(row)
                        csv_file.flush()
                        if writer is not None:
                            for name, value in means.items():
                                writer.add_scalar(f"train/{name}", value, iteration)
                            writer.add_scalar("train/lr", lr, iteration)
                            writer.add_scalar("train/images_per_s", speed, iteration)
                        if bar is not None:
                            terms = {
                                short: f"{means[name]:.3f}" for name, short in _SHORT_NAMES.items() if name in means
                            }
                            bar.set_postfix(**terms, img_s=f"{speed:.1f}", lr=f"{lr:.2g}")
                        running, running_count = {}, {}
                        interval_images, interval_start = 0, now
                    if bar is not None:
                        bar.update(1)
                    if not alternating and (iteration % config.checkpoint_every == 0 or stop):
                        snapshot = state(model)  # a collective under torchrun: every rank calls it
                        if main:
                            save_checkpoint(output_dir / "last.pt", model, optimizer, snapshot)
                            if iteration % config.checkpoint_every == 0:
                                save_checkpoint(
                                    output_dir / f"checkpoint_{iteration:07d}.pt", model, optimizer, snapshot
                                )
                    if stop:
                        break
                skip = 0
                epoch += 1
            if bar is not None:
                bar.close()
                bar = None
            if alternating and main:  # every step's model, loadable like a final one
                snapshot = state(step.model)
                save_checkpoint(output_dir / f"step{number}.pt", step.model, optimizer, snapshot)
                if number == len(steps):
                    save_checkpoint(output_dir / "last.pt", step.model, optimizer, snapshot)
    finally:
        if bar is not None:
            bar.close()
        if csv_file is not None:
            csv_file.close()
        if writer is not None:
            writer.close()
    if alternating:
        model = steps[-1].model
        for parameter in model.parameters():  # unfrozen as the preset built it
            parameter.requires_grad_(id(parameter) in steps[-1].trainable)
        model.train()

    result = {"iteration": iteration, "trained_seconds": trained_seconds, "output_dir": str(output_dir), "model": model}
    result["metrics"] = None
    if config.evaluate:
        val_loader = data.make_data_loader(
            val_set, config.batch_size, shuffle=False, num_workers=num_workers, distributed=world_size > 1
        )
        result["metrics"] = evaluate.evaluate_model(model, val_loader, device=device)
    if main and config.plots:
        plot_loss_curves(csv_path, output_dir / "loss_curves.png")
        _plot_val_detections(model.eval(), val_set, categories, device, output_dir / "detections.png")
    result["total_seconds"] = time.monotonic() - start
    if main:
        saved = {k: v for k, v in result.items() if k != "model"}
        (output_dir / "metrics.json").write_text(json.dumps(saved, indent=1, default=str) + "\n")
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Using a checkpoint: evaluation and drawing detections
# ---------------------------------------------------------------------------------------------------------------------


def evaluate_checkpoint(
    checkpoint_path: str | os.PathLike,
    val_images: str | None = None,
    val_annotations: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
) -> dict:
    """COCO AP of a training checkpoint on ``val_images``/``val_annotations`` (default: the val split
    of the data it was trained on; the synthetic set is regenerated if missing).

    ``batch_size`` defaults to the training run's: images in a batch are padded to a common size, and
    the padding changes the features near the borders slightly, so the same batch size reproduces
    the AP printed at the end of training."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, checkpoint = load_checkpoint(checkpoint_path, device)
    transform = model.config.transform
    val_tf = data.DetectionTransform(transform.min_size, transform.max_size, train=False)
    if val_annotations is None:
        config = TrainConfig(**{**checkpoint["train_config"], "resume": None})
        if config.val_annotations:
            val_images, val_annotations = config.val_images, config.val_annotations
        else:
            synthetic = data.ensure_synthetic_dataset(
                config.data_root, seed=config.seed, num_train=config.num_train, num_val=config.num_val
            )
            val_images, val_annotations = synthetic.val_images, synthetic.val_annotations
    elif val_images is None:
        raise ValueError("val_images must be given with val_annotations")
    val_set = data.CocoDetection(val_images, val_annotations, val_tf)
    loader = data.make_data_loader(val_set, batch_size or checkpoint["train_config"]["batch_size"], shuffle=False)
    return evaluate.evaluate_model(model, loader, device=device)


def read_image(path: str | os.PathLike) -> Tensor:
    """An image file as ``Tensor[3, H, W]`` float32 RGB in [0, 1]."""
    with Image.open(path) as file:
        pixels = torch.frombuffer(bytearray(file.convert("RGB").tobytes()), dtype=torch.uint8)
        width, height = file.size
    return pixels.reshape(height, width, 3).permute(2, 0, 1).float().div_(255.0)


@torch.no_grad()
def pipeline_stages(model: FasterRCNN, image: Tensor, top: int = 30) -> dict[str, Tensor]:
    """Boxes of each stage of the detector on ``image`` ``[3, H, W]``, in its pixels (``[N, 4]`` each):

    ``anchors``: every anchor of every level at the feature position nearest the image centre;
    ``before_nms``: the ``top`` anchors with the highest objectness, decoded with their RPN deltas;
    ``after_nms``: the first ``top`` proposals (:meth:`RegionProposalNetwork.proposals`: per-level NMS);
    ``detections``: the final boxes (with ``scores`` and ``labels``).
    """
    model.eval()
    image_list, _ = model.transform([image])
    padded = image_list.tensors
    height, width = image_list.image_sizes[0]
    levels = list(model.backbone(padded).values())
    objectness, deltas = model.rpn.head(levels)
    strides = feature_strides(levels, tuple(padded.shape[-2:]))
    anchors = ops.grid_anchors(
        [tuple(f.shape[-2:]) for f in levels], strides, model.config.anchors.sizes,
        model.config.anchors.aspect_ratios, device=padded.device,
    )  # fmt: skip
    logits, flat_deltas = flatten_head_outputs(objectness, deltas)
    image_sizes = torch.tensor([[height, width]], device=padded.device)
    # Anchors at the centre: per level, the position whose anchors' centre is nearest the image centre.
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    distance = (centres - torch.tensor([width / 2, height / 2], device=padded.device)).abs().sum(-1)
    per_level = model.config.anchors.num_anchors()
    central, start = [], 0
    for feature in levels:
        count = feature.shape[-2] * feature.shape[-1] * per_level
        nearest = start + int(distance[start : start + count].argmin()) // per_level * per_level
        central.append(anchors[nearest : nearest + per_level])
        start += count
    best = logits[0].topk(min(top, logits.shape[1])).indices
    before = ops.decode_boxes(flat_deltas[0, best], anchors[best], RPN_BOX_WEIGHTS)
    before = clip_to_images(before[None], image_sizes)[0]
    proposals, num_valid = model.rpn.proposals(objectness, deltas, image_sizes, strides)
    after = proposals[0, : min(int(num_valid[0]), top)]
    to_original = tuple(image.shape[-2:])
    stages = {
        name: data.resize_boxes(boxes.float(), (height, width), to_original).cpu()
        for name, boxes in (("anchors", torch.cat(central)), ("before_nms", before), ("after_nms", after))
    }
    detections = model([image])[0]
    stages.update({k: v.cpu() for k, v in detections.items()})
    stages["detections"] = stages.pop("boxes")
    return stages


def _panel(image: Tensor, boxes: Tensor, title: str, color: str, labels: list[str] | None = None) -> Tensor:
    pixels = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    drawn = draw_bounding_boxes(pixels, boxes, labels=labels, colors=color, width=1)
    canvas = Image.fromarray(drawn.permute(1, 2, 0).numpy())
    ImageDraw.Draw(canvas).text((4, 2), title, fill="white", stroke_width=2, stroke_fill="black")
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def predict_image(
    checkpoint_path: str | os.PathLike,
    image_path: str | os.PathLike,
    out_path: str | os.PathLike,
    score_thresh: float = 0.5,
    device: str | None = None,
    stages: bool = False,
) -> dict:
    """Detect objects in one image file and write it with boxes, labels and scores drawn to ``out_path``.

    ``stages``: a 2x2 grid instead - the anchors at one position, the top RPN proposals before and
    after NMS, and the final detections (:func:`pipeline_stages`)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, checkpoint = load_checkpoint(checkpoint_path, device)
    image = read_image(image_path)
    categories = checkpoint["categories"]
    if not stages:
        with torch.no_grad():
            prediction = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
        drawn = draw_detections(image, prediction, categories, score_thresh)
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(out_path)
        return prediction
    boxes = pipeline_stages(model, image.to(device))
    final = {"boxes": boxes["detections"], "scores": boxes["scores"], "labels": boxes["labels"]}
    panels = [
        _panel(image, boxes["anchors"], "1. anchors at the centre position, every level", "yellow"),
        _panel(image, boxes["before_nms"], "2. top RPN proposals before NMS", "cyan"),
        _panel(image, boxes["after_nms"], "3. top RPN proposals after NMS", "lime"),
        _panel(
            draw_detections(image, final, categories, score_thresh).float() / 255,
            final["boxes"][:0],
            "4. detections",
            "red",
        ),
    ]
    save_image_grid(panels, Path(out_path), columns=2)
    return final
