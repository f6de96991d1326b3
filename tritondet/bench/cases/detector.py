"""Detector level: our Faster R-CNN against torchvision's on the same weights and images.

Inference (``model(images)``) and one training step (``zero_grad(set_to_none=True)``, losses,
backward: a training loop's step without the optimizer's update), for the tiny test
configuration (``tiny`` sizes), the small CPU configuration (``quick``) and torchvision's
``fasterrcnn_resnet50_fpn`` at 800x1333 (``full``). Our model is built from torchvision's with
``FasterRCNN.from_torchvision``, so both sides hold identical weights; inference results are
compared with the detector tests' parity bounds before anything is timed. The launch and sync
columns give the whole forward pass's counts on each side.

Our model runs its convolutions channels-last on the CPU (``convolution_memory_format``), so there
each case is timed twice: against torchvision's model as it comes (NCHW) and converted to
channels-last by its user (``model.to(memory_format=torch.channels_last)``: the same computation,
the ratio then being our ops' alone). Detections are checked against torchvision's model in our
layout: across layouts the convolutions' rounding (~1e-6) reaches the boxes of these untrained
models, whose predictors have wide weights, as more than the parity bound.
"""

from __future__ import annotations

import copy

import torch

from ...detector import FasterRCNN, config
from ...detector.faster_rcnn import convolution_memory_format
from ..harness import Case
from ..inputs import assert_same_detections, torchvision_twin

# (preset, image height, width, batch) per size set.
_SIZES = {
    "tiny": [(config.tiny, 64, 80, 2)],
    "quick": [(config.small_cpu, 320, 480, 2)],
    "full": [(config.resnet50_fpn, 800, 1333, 1), (config.resnet50_fpn, 800, 1333, 2)],
}


def _models(preset, device: torch.device, layout: torch.memory_format):
    """Ours, torchvision's in ``layout`` (timed) and torchvision's in our layout (the check's)."""
    theirs = torchvision_twin(preset()).to(device)
    ours = FasterRCNN.from_torchvision(theirs).to(device)
    ours_layout = convolution_memory_format(device)
    reference = theirs if layout == ours_layout else copy.deepcopy(theirs).to(memory_format=ours_layout)
    return ours, theirs.to(memory_format=layout), reference


def _layouts(device: torch.device) -> list[torch.memory_format]:
    return list(dict.fromkeys((torch.contiguous_format, convolution_memory_format(device))))


def _label(preset, stage: str, layout: torch.memory_format) -> str:
    suffix = " (torchvision channels-last)" if layout == torch.channels_last else ""
    return f"FasterRCNN[{preset.__name__}] {stage}{suffix}"


def _images(height: int, width: int, batch: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, height, width, generator=generator).to(device) for _ in range(batch)]


def _targets(height: int, width: int, batch: int, num_classes: int, device: torch.device):
    generator = torch.Generator().manual_seed(1)
    targets = []
    for _ in range(batch):
        corner = torch.rand(5, 2, generator=generator) * torch.tensor([width / 2, height / 2])
        size = torch.rand(5, 2, generator=generator) * torch.tensor([width / 2, height / 2]) + 4
        boxes = torch.cat([corner, corner + size], dim=1)
        labels = torch.randint(1, num_classes, (5,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return targets


def _inference_case(preset, height, width, batch, device, layout) -> Case:
    ours, theirs, reference = _models(preset, device, layout)
    for model in (ours, theirs, reference):
        model.eval()

    def run(model):
        def call(images):
            with torch.no_grad():
                return model(images)

        return call

    images = _images(height, width, batch, device)

    def same_as_torchvision_in_our_layout(mine, _theirs):
        assert_same_detections(mine, run(reference)(images))

    return Case(
        op=_label(preset, "inference", layout),
        size=f"B={batch} {height}x{width}",
        dtype=torch.float32,
        device=device,
        inputs=lambda: (images,),
        ours=run(ours),
        torchvision=run(theirs),
        min_bytes=batch * 3 * height * width * 4,  # the images, read once
        check=same_as_torchvision_in_our_layout,
    )


def _training_case(preset, height, width, batch, device, layout) -> Case:
    ours, theirs, _ = _models(preset, device, layout)
    ours.train()
    theirs.train()
    num_classes = preset().roi_heads.num_classes

    def step(model):
        def call(images, targets):
            model.zero_grad(set_to_none=True)  # as a training loop does: the step makes fresh gradients
            losses = model(images, targets)
            sum(losses.values()).backward()
            return {name: value.detach() for name, value in losses.items()}

        return call

    def same_loss_terms(mine, their):
        # Sampling draws differ between the two models, so the values are not compared.
        assert set(mine) == set(their)

    return Case(
        op=_label(preset, "train step", layout),
        size=f"B={batch} {height}x{width}",
        dtype=torch.float32,
        device=device,
        inputs=lambda: (_images(height, width, batch, device), _targets(height, width, batch, num_classes, device)),
        ours=step(ours),
        torchvision=step(theirs),
        min_bytes=batch * 3 * height * width * 4,
        check=same_loss_terms,
    )


def cases(device: torch.device, sizes: str) -> list[Case]:
    return [
        make(preset, height, width, batch, device, layout)
        for preset, height, width, batch in _SIZES[sizes]
        for layout in _layouts(device)
        for make in (_inference_case, _training_case)
    ]
