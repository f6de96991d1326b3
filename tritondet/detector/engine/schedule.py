"""The learning-rate schedule (linear warm-up, step decay on the run's progress) and the training schedules:
``"joint"`` (one step training everything) or the paper's 4-step ``"alternating"`` training (Section 3.2).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..faster_rcnn import FasterRCNN
from .train_config import TrainConfig


def learning_rate(config: TrainConfig, iteration: int, progress: float) -> float:
    """Linear warm-up over ``warmup_iters`` iterations, then ``gamma`` at each step of ``lr_steps`` passed."""
    factor = config.gamma ** sum(progress >= step for step in config.lr_steps)
    if iteration < config.warmup_iters:
        alpha = iteration / config.warmup_iters
        factor *= config.warmup_factor * (1 - alpha) + alpha
    return config.lr * factor


@dataclass
class Step:
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


def alternating_steps(config: TrainConfig, model: FasterRCNN) -> list[Step]:
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
        Step("rpn", first, (first.backbone, first.rpn), counts[0], shares[0], dict(roi_heads=False), **common),
        Step(
            "detector",
            second,
            (second.backbone, second.roi_heads),
            counts[1],
            shares[1],
            dict(rpn=False, proposer=first),
            **common,
        ),
        Step(
            "rpn_shared",
            second,
            (second.rpn,),
            counts[2],
            shares[2],
            dict(roi_heads=False),
            before=rpn_from_step_1,
            **common,
        ),
        Step("detector_shared", second, (second.roi_heads,), counts[3], shares[3], dict(rpn=False), **common),
    ]


def prepare_step(step: Step) -> None:
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


def schedule_steps(config: TrainConfig, model: FasterRCNN) -> list[Step]:
    """The steps of ``config.schedule`` on ``model``: one ``joint`` step training everything, or the 4 alternating ones."""
    if config.schedule == "alternating":
        return alternating_steps(config, model)
    return [Step("joint", model, (model,), config.iterations, 1.0)]


def final_model(steps: list[Step]) -> nn.Module:
    """The last step's model, in training mode with the parameters the preset trains unfrozen."""
    model = steps[-1].model
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in steps[-1].trainable)
    return model.train()
