"""A training run's options (:class:`TrainConfig`, the ``tritondet train`` flags), the model it trains, and the
model configuration read back from a checkpoint (the dict ``dataclasses.asdict`` wrote)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..backbone import LiteBackbone
from ..config import (
    MODEL_PRESETS,
    AnchorConfig,
    BackboneConfig,
    FasterRCNNConfig,
    MaskHeadConfig,
    RoIHeadsConfig,
    RPNConfig,
    TransformConfig,
    with_masks,
)
from ..data import BAD_DATA_CHOICES, ensure_synthetic_dataset
from ..data.errors import InputError
from ..faster_rcnn import FasterRCNN
from ..mask_rcnn import MaskRCNN

SCHEDULES = ("joint", "alternating")


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
    # Decoded training images kept in memory, up to this many MiB (uint8: the synthetic train split takes
    # ~0.5 GiB, so every epoch after the first skips PNG decoding); 0: decode every time.
    image_cache_mb: int = 1024
    # Bad annotations and unreadable images: "skip" (with a warning naming each) or "raise".
    on_bad_data: str = "skip"
    # Model: a preset of MODEL_PRESETS; min_size/max_size override its image sizes when set.
    model: str = "lite"
    masks: bool = False  # Mask R-CNN: the preset plus a mask branch (config.with_masks), trained on instance masks
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
    max_minutes: float | None = 15.0  # wall-clock budget of the whole run, evaluation (when on) included; inf: none
    # Bookkeeping.
    seed: int = 0
    num_workers: int | None = None  # default: 2 on CUDA, 0 on the CPU (the model needs both cores there)
    # torch's intra-op threads on the CPU; None: the fastest of 1 and torch's default, timed while training
    # and re-timed every two minutes (engine.threads.ThreadChooser: other processes make more threads slower).
    threads: int | None = None
    checkpoint_every: int = 500
    log_every: int = 10
    resume: str | None = None  # a checkpoint path, or "auto": output_dir/last.pt if it exists
    evaluate: bool = True
    plots: bool = True
    progress: bool = True
    device: str | None = None  # default: cuda if available, else cpu
    extra: dict = field(default_factory=dict)  # free-form notes stored in the checkpoint

    def __post_init__(self) -> None:
        """Check every option; :class:`~..data.errors.InputError` names the first bad one."""

        def check(name: str, ok: bool, requirement: str) -> None:
            if not ok:
                raise InputError(f"{name} must be {requirement}, got {getattr(self, name)!r}")

        check("model", self.model in MODEL_PRESETS, f"one of {sorted(MODEL_PRESETS)}")
        check("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}")
        check("on_bad_data", self.on_bad_data in BAD_DATA_CHOICES, f"one of {BAD_DATA_CHOICES}")
        for name in ("iterations", "batch_size", "checkpoint_every", "log_every", "num_train", "num_val"):
            check(name, getattr(self, name) >= 1, "at least 1")
        for name in ("warmup_iters", "seed", "num_workers", "image_cache_mb"):
            check(name, getattr(self, name) is None or getattr(self, name) >= 0, "non-negative")
        for name in ("min_size", "max_size", "threads"):
            check(name, getattr(self, name) is None or getattr(self, name) >= 1, "at least 1")
        for name in ("lr", "clip_grad_norm", "gamma"):
            check(name, _finite(getattr(self, name)) and getattr(self, name) > 0, "a positive number")
        minutes = self.max_minutes
        check("max_minutes", minutes is None or minutes > 0, "a positive number (inf: no budget)")  # nan fails
        check("momentum", _finite(self.momentum) and 0 <= self.momentum < 1, "in [0, 1)")
        check("weight_decay", _finite(self.weight_decay) and self.weight_decay >= 0, "a non-negative number")
        check("warmup_factor", _finite(self.warmup_factor) and 0 < self.warmup_factor <= 1, "in (0, 1]")
        check("lr_steps", all(_finite(s) and 0 < s < 1 for s in self.lr_steps), "fractions in (0, 1)")
        shares = self.alternating_split
        check("alternating_split", len(shares) == 4 and all(_finite(s) and s > 0 for s in shares), "4 positive shares")
        if self.schedule == "alternating" and self.resume is not None:
            raise InputError("resume: the alternating schedule cannot resume (it writes step<k>.pt after each step)")
        self.lr_steps = tuple(self.lr_steps)
        self.alternating_split = tuple(self.alternating_split)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def resolve_device(name: str | None) -> torch.device:
    """The device ``name`` (``--device``) names; ``None``: cuda if available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InputError(f"device must be a torch device such as cpu, cuda or cuda:1, got {name!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r}: no CUDA device is available here")
    return device


def build_model(config: FasterRCNNConfig) -> FasterRCNN:
    """The detector for ``config`` (a :class:`~..mask_rcnn.MaskRCNN` when ``config.mask`` is set);
    ``config.backbone is None`` means :class:`~.backbone.LiteBackbone` (the ``lite`` preset)."""
    backbone = LiteBackbone() if config.backbone is None else None
    return (FasterRCNN if config.mask is None else MaskRCNN)(config, backbone=backbone)


def model_config_of(config: TrainConfig, num_classes: int) -> FasterRCNNConfig:
    """The model a run of ``config`` trains: its preset with ``num_classes``, the image sizes it
    overrides and, with ``masks``, a mask branch."""
    model_config = MODEL_PRESETS[config.model](num_classes)
    if config.masks:
        model_config = with_masks(model_config)
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


def config_from_dict(values: dict) -> FasterRCNNConfig:
    """The :class:`FasterRCNNConfig` that ``dataclasses.asdict`` turned into ``values`` (a checkpoint's ``model_config``)."""
    sections = {
        "transform": TransformConfig,
        "backbone": BackboneConfig,
        "anchors": AnchorConfig,
        "rpn": RPNConfig,
        "roi_heads": RoIHeadsConfig,
        "mask": MaskHeadConfig,
    }
    kwargs = {}
    for name, cls in sections.items():
        section = values.get(name)
        kwargs[name] = None if section is None else cls(**{k: _tuples(v) for k, v in section.items()})
    return FasterRCNNConfig(**kwargs)


def dataset_paths(config: TrainConfig) -> tuple[str, str, str, str]:
    """The run's data: (train images, train annotations, val images, val annotations), COCO format; the
    synthetic set (generated into ``config.data_root`` if missing) unless ``config`` names COCO files."""
    coco_paths = (config.train_images, config.train_annotations, config.val_images, config.val_annotations)
    if any(coco_paths):
        if not all(coco_paths):
            raise InputError("COCO data needs train_images, train_annotations, val_images and val_annotations")
        return config.train_images, config.train_annotations, config.val_images, config.val_annotations
    synthetic = ensure_synthetic_dataset(
        config.data_root, seed=config.seed, num_train=config.num_train, num_val=config.num_val
    )
    return synthetic.train_images, synthetic.train_annotations, synthetic.val_images, synthetic.val_annotations
