"""Training checkpoints: written atomically, read back as a model (:func:`load_checkpoint`) or to resume a run.

Reading a checkpoint that is missing, empty, truncated, corrupt, not a training checkpoint (e.g. a bare
state dict) or whose weights do not fit the model raises :class:`~..data.errors.InputError` naming the file.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..data.errors import InputError
from ..faster_rcnn import FasterRCNN
from .train_config import TrainConfig, build_model, config_from_dict

CHECKPOINT_VERSION = 1
# What train writes besides "version"; a file lacking any is not a (complete) training checkpoint.
_CHECKPOINT_KEYS = ("model", "optimizer", "iteration", "trained_seconds", "rng", "model_config", "train_config")
_NUMBERED = re.compile(r"checkpoint_(\d+)\.pt")


def save_checkpoint(path: Path, model: nn.Module, optimizer, state: dict) -> None:
    """Write atomically (a temporary file, flushed to disk, renamed into place): an interrupted save leaves
    the old file, or none, never a partial one."""
    payload = {"version": CHECKPOINT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(), **state}
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        torch.save(payload, file)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(path)


def read_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    """The dict of a training checkpoint written by :func:`save_checkpoint`, tensors on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no checkpoint there ({'a directory' if path.is_dir() else 'no such file'})")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the checkpoint file is empty")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)  # our own file: configs are plain dicts
    except Exception as error:  # unpickling an arbitrary file fails in many ways, all meaning "not a checkpoint"
        # The first sentence: torch's advice after it ("if you are seeing this error...") does not fit one line.
        reason = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: not a readable checkpoint (truncated or corrupt): {reason}") from error
    if not isinstance(checkpoint, dict) or "version" not in checkpoint:
        bare = isinstance(checkpoint, dict) and checkpoint and all(torch.is_tensor(v) for v in checkpoint.values())
        holds = "a bare state dict (weights only)" if bare else f"a {type(checkpoint).__name__}"
        raise InputError(f"{path}: not a tritondet training checkpoint: it holds {holds}, without its configs")
    if checkpoint["version"] != CHECKPOINT_VERSION:
        raise InputError(
            f"{path}: not a tritondet training checkpoint of version {CHECKPOINT_VERSION} "
            f"(version {checkpoint['version']})"
        )
    missing = [key for key in _CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise InputError(f"{path}: an incomplete training checkpoint: no {', '.join(repr(k) for k in missing)}")
    not_dicts = [
        key
        for key in ("model", "optimizer", "rng", "model_config", "train_config")
        if not isinstance(checkpoint[key], dict)
    ]
    if not_dicts:
        raise InputError(f"{path}: not a training checkpoint: {', '.join(repr(k) for k in not_dicts)} not a dict")
    return checkpoint


def model_description(preset: str, num_classes: int) -> str:
    """How errors name a model: its preset and class count (background included)."""
    return f"model {preset} with num_classes {num_classes}"


def load_weights(path: Path, checkpoint: dict, model: nn.Module, built: str | None) -> None:
    """``checkpoint["model"]`` (read from ``path``) into ``model``; ``built``: :func:`model_description` of
    ``model``, or ``None`` when ``model`` was built from the checkpoint's own configs."""
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        roi_heads = checkpoint["model_config"].get("roi_heads") or {}
        trained = model_description(checkpoint["train_config"].get("model"), roi_heads.get("num_classes"))
        detail = str(error).strip().splitlines()[-1].strip()
        if built is None:
            message = f"{path}: its weights do not fit the {trained} its configs describe ({detail})"
        elif built != trained:
            message = f"{path} was trained with {trained}; this run builds {built}"
        else:
            message = f"{path}: its weights do not fit this run's {built} ({detail})"
        raise InputError(message) from error


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[FasterRCNN, dict]:
    """The model (in eval mode, on ``device``) and the whole checkpoint dict of a training run."""
    checkpoint = read_checkpoint(path, device)
    try:
        model_config = config_from_dict(checkpoint["model_config"])
    except (TypeError, KeyError, AttributeError) as error:  # a field this version does not know, or a non-dict
        raise InputError(f"{path}: its model_config is not one this tritondet builds ({error!r})") from error
    model = build_model(model_config)
    load_weights(Path(path), checkpoint, model, None)
    return model.to(device).eval(), checkpoint


def _auto_resume_candidates(output_dir: Path) -> list[Path]:
    """``last.pt``, then the numbered checkpoints, newest first."""
    numbered = [p for p in output_dir.glob("checkpoint_*.pt") if _NUMBERED.fullmatch(p.name)]
    numbered.sort(key=lambda p: int(_NUMBERED.fullmatch(p.name).group(1)), reverse=True)
    last = output_dir / "last.pt"
    return ([last] if last.is_file() else []) + numbered


def resume_checkpoint(config: TrainConfig, device: torch.device) -> tuple[Path, dict] | None:
    """The checkpoint ``config.resume`` names and its dict, or ``None`` (start from iteration 0).

    ``"auto"``: the newest readable of ``output_dir``'s ``last.pt`` and ``checkpoint_<iteration>.pt``
    (unreadable ones are skipped with a warning; :class:`~..data.errors.InputError` when there are
    checkpoints but none is readable), ``None`` when there is none."""
    if config.resume is None:
        return None
    if config.resume != "auto":
        return Path(config.resume), read_checkpoint(config.resume, device)
    output_dir = Path(config.output_dir)
    failures = []
    for path in _auto_resume_candidates(output_dir):
        try:
            checkpoint = read_checkpoint(path, device)
        except InputError as error:
            failures.append(str(error))
            continue
        if failures:
            warnings.warn(f"resume auto: skipping unreadable checkpoints: {'; '.join(failures)}", stacklevel=2)
        return path, checkpoint
    if failures:
        raise InputError(f"resume auto: no readable checkpoint in {output_dir}: {'; '.join(failures)}")
    interrupted = sorted(p.name for p in output_dir.glob("*.pt.tmp"))
    if interrupted:
        warnings.warn(
            f"resume auto: no checkpoint in {output_dir} (an interrupted write left {', '.join(interrupted)}); "
            "starting from iteration 0",
            stacklevel=2,
        )
    return None


def restore_checkpoint(
    path: Path,
    checkpoint: dict,
    model: nn.Module,
    optimizer,
    sampling: torch.Generator,
    rank: int,
    built: str,
) -> tuple[int, float]:
    """Load ``checkpoint`` (read from ``path``) into ``model``, ``optimizer``, torch's random state and
    ``sampling`` (rank ``rank``'s detector sampling generator); return its (iteration, trained seconds).
    ``built``: :func:`model_description` of ``model``, for the error when the weights do not fit."""
    load_weights(path, checkpoint, model, built)
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as error:
        raise InputError(f"{path}: its optimizer state does not fit this run's: {error}") from error
    samplings = checkpoint["rng"]["sampling"]
    if rank >= len(samplings):
        raise InputError(f"{path} was written by a run of {len(samplings)} processes; this is process {rank}")
    torch.set_rng_state(checkpoint["rng"]["torch"])
    sampling.set_state(samplings[rank].to("cpu"))
    return checkpoint["iteration"], checkpoint["trained_seconds"]
