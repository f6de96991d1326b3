"""Detector level: our Faster R-CNN against torchvision's on the same weights and images.

Inference (``model(images)``) and one training step (losses + backward), for the tiny test
configuration (``tiny`` sizes), the small CPU configuration (``quick``) and torchvision's
``fasterrcnn_resnet50_fpn`` at 800x1333 (``full``). Our model is built from torchvision's with
``FasterRCNN.from_torchvision``, so both sides hold identical weights; inference results are
compared with the detector tests' parity bounds before anything is timed. The launch and sync
columns give the whole forward pass's counts on each side.
"""

from __future__ import annotations

import torch

from ...detector import FasterRCNN, config
from ..harness import Case
from ..inputs import assert_same_detections, torchvision_twin

# (preset, image height, width, batch) per size set.
_SIZES = {
    "tiny": [(config.tiny, 64, 80, 2)],
    "quick": [(config.small_cpu, 320, 480, 2)],
    "full": [(config.resnet50_fpn, 800, 1333, 1), (config.resnet50_fpn, 800, 1333, 2)],
}


def _models(preset, device: torch.device):
    theirs = torchvision_twin(preset()).to(device)
    ours = FasterRCNN.from_torchvision(theirs).to(device)
    return ours, theirs


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


def _inference_case(preset, height, width, batch, device) -> Case:
    ours, theirs = _models(preset, device)
    ours.eval()
    theirs.eval()

    def run(model):
        def call(images):
            with torch.no_grad():
                return model(images)

        return call

    return Case(
        op=f"FasterRCNN[{preset.__name__}] inference",
        size=f"B={batch} {height}x{width}",
        dtype=torch.float32,
        device=device,
        inputs=lambda: (_images(height, width, batch, device),),
        ours=run(ours),
        torchvision=run(theirs),
        min_bytes=batch * 3 * height * width * 4,  # the images, read once
        check=assert_same_detections,
    )


def _training_case(preset, height, width, batch, device) -> Case:
    ours, theirs = _models(preset, device)
    ours.train()
    theirs.train()
    num_classes = preset().roi_heads.num_classes

    def step(model):
        def call(images, targets):
            losses = model(images, targets)
            sum(losses.values()).backward()
            return {name: value.detach() for name, value in losses.items()}

        return call

    def same_loss_terms(mine, their):
        # Sampling draws differ between the two models, so the values are not compared.
        assert set(mine) == set(their)

    return Case(
        op=f"FasterRCNN[{preset.__name__}] train step",
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
        make(preset, height, width, batch, device)
        for preset, height, width, batch in _SIZES[sizes]
        for make in (_inference_case, _training_case)
    ]
