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

One timed case, :func:`postprocess_detections_case`: ``ops.postprocess_detections`` against
torchvision's ``RoIHeads.postprocess_detections`` on the same box-head outputs (R50-FPN's test
setting: 1000 proposals per 800x1333 image, 91 classes, score 0.05, NMS 0.5, 100 detections;
``tiny``: 50 proposals, 5 classes), the same detections checked (:func:`assert_same_detections`).
"""

from __future__ import annotations

import functools

import torch
from torchvision.models.detection.roi_heads import RoIHeads

from ... import _backend, ops
from ...detector import FasterRCNN, MaskRCNN, config
from ...measure.stage_costs import StageCosts, post_processing_costs, torchvision_post_processing_costs
from ..harness import Case, CountCase
from ..inputs import assert_same_detections, proposal_like_boxes, torchvision_twin

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


# postprocess_detections: (images, proposals per image, classes) per size set and device.
_DETECTION_SIZES = {
    "tiny": {"cpu": [(1, 50, 5)], "cuda": [(2, 50, 5)]},
    "quick": {"cpu": [(1, 1000, 91)], "cuda": [(2, 1000, 91)]},
    "full": {"cpu": [(1, 1000, 91), (2, 1000, 91)], "cuda": [(b, 1000, 91) for b in (2, 8)]},
}
_IMAGE = (800, 1333)
_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
_SCORE_THRESH, _NMS_THRESH, _DETECTIONS = 0.05, 0.5, 100


def _head_outputs(batch: int, count: int, num_classes: int, device: torch.device):
    """Box-head outputs on proposal-like boxes: logits of spread 3 (so that a few classes per
    proposal pass the 0.05 score), deltas of spread 0.5 (boxes moved by a fraction of their size)."""

    def inputs():
        generator = torch.Generator().manual_seed(batch * count + num_classes)
        proposals = proposal_like_boxes(batch, count, height=_IMAGE[0], width=_IMAGE[1], generator=generator)
        logits = torch.randn(batch * count, num_classes, generator=generator) * 3
        deltas = torch.randn(batch * count, 4 * num_classes, generator=generator) * 0.5
        sizes = torch.tensor([_IMAGE] * batch)
        num_valid = torch.full((batch,), count)
        return tuple(t.to(device) for t in (logits, deltas, proposals, num_valid, sizes))

    return inputs


def _ours_detections(logits, deltas, proposals, num_valid, sizes):
    return ops.postprocess_detections(
        logits, deltas, proposals, num_valid, sizes, _WEIGHTS, _SCORE_THRESH, _NMS_THRESH, _DETECTIONS
    )


def _torchvision_detections(logits, deltas, proposals, num_valid, sizes):
    heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, _WEIGHTS, _SCORE_THRESH, _NMS_THRESH, _DETECTIONS)
    return heads.postprocess_detections(logits, deltas, list(proposals), [tuple(s) for s in sizes.tolist()])


def _same_detections(ours, theirs) -> None:
    """torchvision's detections per image, and zeros in our padding slots."""
    boxes, scores, labels, num_valid = ours
    counts = num_valid.tolist()
    assert counts == [len(image_labels) for image_labels in theirs[2]]
    assert_same_detections(
        [
            {"boxes": b[:n], "scores": s[:n], "labels": c[:n]}
            for b, s, c, n in zip(boxes, scores, labels, counts, strict=True)
        ],
        [{"boxes": b, "scores": s, "labels": c} for b, s, c in zip(*theirs, strict=True)],
    )
    assert not any(t[i, n:].any() for t in (boxes, scores, labels) for i, n in enumerate(counts))


def postprocess_detections_case(batch: int, count: int, num_classes: int, device: torch.device) -> Case:
    """``postprocess_detections`` on ``batch`` images of ``count`` proposals and ``num_classes`` classes, timed."""
    return Case(
        op="postprocess_detections",
        size=f"{batch}x{count}x{num_classes}",
        dtype=torch.float32,
        device=device,
        inputs=_head_outputs(batch, count, num_classes, device),
        ours=_ours_detections,
        torchvision=_torchvision_detections,
        # Read the logits, deltas and proposals once; write the padded detections once.
        min_bytes=batch * (count * (5 * num_classes + 4) * 4 + _DETECTIONS * (4 + 1 + 1) * 4),
        check=_same_detections,
    )


def cases(device: torch.device, sizes: str) -> list[Case | CountCase]:
    preset, height, width, _ = _SIZES[sizes]
    backend = _backend.backend_name(device)

    def stage(detector: type, name: str, batch: int):
        def costs():
            ours, theirs = _stage_costs(detector, sizes, batch, device)
            return getattr(ours, name), getattr(theirs, name)

        return costs

    detections = [postprocess_detections_case(*size, device) for size in _DETECTION_SIZES[sizes][device.type]]
    return detections + [
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
