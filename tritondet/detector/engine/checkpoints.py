"""Training checkpoints: written atomically, read back as a model (:func:`load_checkpoint`) or to resume a run."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..faster_rcnn import FasterRCNN
from .train_config import TrainConfig, build_model, config_from_dict

CHECKPOINT_VERSION = 1


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
    model = build_model(config_from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint


def resume_path(config: TrainConfig) -> Path | None:
    """The checkpoint ``config.resume`` names (``"auto"``: ``output_dir/last.pt`` if it exists), or ``None``."""
    if config.resume is None:
        return None
    if config.resume == "auto":
        last = Path(config.output_dir) / "last.pt"
        return last if last.is_file() else None
    path = Path(config.resume)
    if not path.is_file():
        raise ValueError(f"resume: no checkpoint at {path}")
    return path


def restore_checkpoint(
    path: Path, model: nn.Module, optimizer, sampling: torch.Generator, rank: int, device: torch.device
) -> tuple[int, float]:
    """Load ``path`` into ``model``, ``optimizer``, torch's random state and ``sampling`` (rank ``rank``'s
    detector sampling generator); return the checkpoint's (iteration, trained seconds)."""
    checkpoint = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    sampling.set_state(checkpoint["rng"]["sampling"][rank].to("cpu"))
    return checkpoint["iteration"], checkpoint["trained_seconds"]
