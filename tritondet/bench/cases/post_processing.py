"""The detector's post-processing stages, ours against torchvision's: ATen ops, launches, syncs.

Stages (bounded the same way on both sides, see :mod:`tritondet.measure.stage_costs`): the RPN
proposals (head outputs -> proposals) and the RoI post-processing (class logits and box
regression + proposals -> detections) of Faster R-CNN, and Mask R-CNN's mask branch (features and
detections -> pasted masks), at B = 1 and B = 8 images: torchvision's ``fasterrcnn_resnet50_fpn``
and ``maskrcnn_resnet50_fpn`` at 480x640 (resized by its transform to 800x1067) for ``quick`` and
``full``, the tiny test configuration (with a mask branch for Mask R-CNN) on 64x96 images for
``tiny`` (the CI smoke run). Our model is built from torchvision's (``from_torchvision``): identical
weights and inputs. Mask R-CNN's RPN and RoI stages are Faster R-CNN's and get no rows of their own.

Counted, never timed (:class:`tritondet.bench.harness.CountCase`): the figures are exact and the same on
every machine. The op name says whose path was counted for us: on a GPU the Triton kernels; on the
CPU the fast CPU path (``auto``) or the reference, unless the Triton interpreter is on (``TRITON_INTERPRET=1
TRITONDET_BACKEND=triton``), which runs the Triton path and is counted net of its argument copies.
``tritondet bench`` prints these rows in its table; ``pytest benchmarks/ --benchmark-only`` skips
them (they use no timer).
"""

from __future__ import annotations

import functools

import torch

from ... import _backend
from ...detector import FasterRCNN, MaskRCNN, config
from ...measure.stage_costs import StageCosts, post_processing_costs, torchvision_post_processing_costs
from ..harness import CountCase
from ..inputs import torchvision_twin

# (preset, image height, width, std of the RPN head's and predictor's weights) per size set. At
# torchvision's initial scale (0.01) the R50-FPN's RPN keeps all ~4.7k pre-NMS boxes, as a trained
# one does, and its detections fall in many classes; the tiny model needs wider weights (the
# detector tests' 0.3) for its 4 classes to reach the score threshold.
_SIZES = {
    "tiny": (config.tiny, 64, 96, 0.3),
    "quick": (config.resnet50_fpn, 480, 640, 0.01),
    "full": (config.resnet50_fpn, 480, 640, 0.01),
}
BATCHES = (1, 8)
# Per detector, the stages given rows: label -> StageCosts field.
STAGES = {
    FasterRCNN: {"RPN proposals": "rpn", "RoI post-processing": "roi"},
    MaskRCNN: {"mask branch": "mask"},
}


@functools.cache
def _stage_costs(detector: type, sizes: str, batch: int, device: torch.device) -> tuple[StageCosts, StageCosts]:
    """Every stage on both sides, measured once per detector, size set and batch (a case reads one stage)."""
    preset, height, width, spread = _SIZES[sizes]
    preset_config = preset() if detector is FasterRCNN else config.with_masks(preset())
    theirs = torchvision_twin(preset_config, spread=spread).to(device).eval()
    ours = detector.from_torchvision(theirs).eval()
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, height, width, generator=generator).to(device) for _ in range(batch)]
    return post_processing_costs(ours, images), torchvision_post_processing_costs(theirs, images)


def cases(device: torch.device, sizes: str) -> list[CountCase]:
    preset, height, width, _ = _SIZES[sizes]
    backend = _backend.backend_name(device)

    def stage(detector: type, name: str, batch: int):
        def costs():
            ours, theirs = _stage_costs(detector, sizes, batch, device)
            return getattr(ours, name), getattr(theirs, name)

        return costs

    return [
        CountCase(
            op=f"{detector.__name__}[{preset.__name__}] {label} (ours: {backend})",
            size=f"B={batch} {height}x{width}",
            dtype=torch.float32,
            device=device,
            costs=stage(detector, name, batch),
        )
        for detector, stages in STAGES.items()
        for label, name in stages.items()
        for batch in BATCHES
    ]
