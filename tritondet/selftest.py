"""``tritondet selftest``: every op at the detector's sizes against torchvision (or our reference), one row per op.

Each check runs our op on the Triton backend (``TRITONDET_BACKEND=triton``: compiled kernels on a
GPU, the Triton interpreter on the CPU) and compares it with torchvision's op on the same inputs
and device; ops torchvision does not have are compared with our pure-PyTorch reference backend
(``TRITONDET_BACKEND=reference``). On a GPU both sides are timed with ``triton.testing.do_bench``
in the same run; the table's ratio is torchvision's median time over ours (above 1 ours is
faster). A last row captures ``FasterRCNN.forward_padded`` in a CUDA graph and checks that its
replay equals the eager run.

Shapes: ``real`` are the detector's (R50-FPN at 800x1088: 2000x2000 IoU, 12000 boxes into NMS,
512 RoIs x 256 channels pooled to 7x7 on a 50x68 map, ...); ``small`` are a few dozen boxes, what
the Triton interpreter runs in seconds.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torchvision.models.detection import _utils as detection_utils
from torchvision.models.detection import anchor_utils, roi_heads
from torchvision.models.detection.image_list import ImageList

from . import _backend, ops

SIZES = ("small", "real")
# fp32 parity bound, as the test suite's fp32 row: our kernels and torchvision's differ only by
# the order of a few fp32 operations.
ATOL, RTOL = 1e-5, 1e-5
# Image side lengths of the detector's padded batch: R50-FPN at min_size 800 pads 800x1066 to 800x1088.
REAL_IMAGE = (800, 1088)
SMALL_IMAGE = (64, 96)

REPORT_INSTRUCTIONS = """\
Please send us this table: paste it into a GitHub issue of tritondet together with the output of
    nvidia-smi -L
    python -c 'import torch, torchvision, triton, tritondet; print(torch.__version__, torch.version.cuda, torchvision.__version__, triton.__version__, tritondet.__version__)'"""


@dataclasses.dataclass
class Row:
    """One checked op: its agreement with the expected result and (on a GPU) the time ratio."""

    op: str
    size: str
    against: str  # "torchvision" or "reference" (our pure-PyTorch backend)
    match: float | None  # fraction of output elements (kept indices for NMS) equal to the expected ones
    max_abs_diff: float | None
    passed: bool | None  # agreement with ``against``; None: skipped
    reference: bool | None  # agreement with our reference backend too, where ``against`` is torchvision
    ratio: float | None  # torchvision's time over ours; None where not timed
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.passed is False or self.reference is False

    def cells(self) -> list[str]:
        match = "-" if self.match is None else f"{100 * self.match:.2f}%"
        diff = "-" if self.max_abs_diff is None else f"{self.max_abs_diff:.2g}"
        reference = "-" if self.reference is None else "pass" if self.reference else "FAIL"
        result = "skipped" if self.passed is None else "FAIL" if self.failed else "pass"
        ratio = "-" if self.ratio is None else f"{self.ratio:.2f}x"
        return [self.op, self.size, self.against, match, diff, reference, result, ratio, self.note]


HEADER = [
    "op",
    "size",
    "against",
    "exact match",
    "max abs diff",
    "= reference",
    "result",
    "torchvision ms / ours ms",
    "note",
]


@dataclasses.dataclass
class Comparison:
    """Fraction of equal elements, largest absolute difference, and whether the results agree."""

    match: float
    max_abs_diff: float | None
    passed: bool


@dataclasses.dataclass
class Check:
    """One op call compared: ``ours(*inputs)`` against ``expected(*inputs)`` with ``compare``,
    and (where ``expected`` is torchvision's) against ``ours`` on the reference backend with
    ``compare_reference`` (default ``compare``: where both sides' results have the same form)."""

    op: str
    size: str
    against: str
    inputs: tuple
    ours: Callable[..., Any]
    expected: Callable[..., Any]
    compare: Callable[[Any, Any], Comparison]
    compare_reference: Callable[[Any, Any], Comparison] | None = None


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the enclosed calls on ``TRITONDET_BACKEND=name``, then restore the variable."""
    previous = os.environ.get(_backend.BACKEND_VARIABLE)
    os.environ[_backend.BACKEND_VARIABLE] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_backend.BACKEND_VARIABLE]
        else:
            os.environ[_backend.BACKEND_VARIABLE] = previous


def _on_reference(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` run on our reference backend: the expected side of ops torchvision lacks."""

    def run(*inputs):
        with backend("reference"):
            return function(*inputs)

    return run


# ---------------------------------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------------------------------


def _flat(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [tensor for part in result for tensor in _flat(part)]


def compare_close(ours, expected, atol: float = ATOL, rtol: float = RTOL) -> Comparison:
    """Tensors (or nested sequences of them) equal in shape and dtype and close within ``atol``/``rtol``."""
    ours, expected = _flat(ours), _flat(expected)
    if len(ours) != len(expected) or any(
        a.shape != b.shape or a.dtype != b.dtype for a, b in zip(ours, expected, strict=True)
    ):
        return Comparison(0.0, None, False)
    equal = total = 0
    max_diff = 0.0
    passed = True
    for a, b in zip(ours, expected, strict=True):
        a, b = a.detach().cpu(), b.detach().cpu()
        equal += int((a == b).sum()) + int((a.isnan() & b.isnan()).sum() if a.is_floating_point() else 0)
        total += a.numel()
        if a.numel():
            difference = (a.double() - b.double()).abs().nan_to_num(0.0)
            max_diff = max(max_diff, float(difference.max()))
        passed &= torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol, equal_nan=True)
    return Comparison(equal / total if total else 1.0, max_diff, passed)


def compare_keep(scores: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], Comparison]:
    """NMS keep lists: equal sets, or (torchvision's own criterion) differing only where scores tie:
    same length and the same scores in order. ``match`` is the shared share of the union of both sets."""

    def compare(ours: torch.Tensor, expected: torch.Tensor) -> Comparison:
        ours, expected = ours.cpu(), expected.cpu()
        both = torch.isin(ours, expected).sum().item()
        union = ours.numel() + expected.numel() - both
        match = both / union if union else 1.0
        same_set = ours.numel() == expected.numel() and torch.equal(ours.sort().values, expected.sort().values)
        ties_only = ours.numel() == expected.numel() and torch.equal(scores.cpu()[ours], scores.cpu()[expected])
        return Comparison(match, None, same_set or ties_only)

    return compare


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------


def random_boxes(*shape: int, image: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``Tensor[*shape, 4]`` xyxy boxes inside an ``image`` (height, width), sides 2-40% of the image."""
    height, width = image
    extent = torch.tensor([width, height], dtype=torch.float32)
    size = (0.02 + 0.38 * torch.rand(*shape, 2, generator=generator) ** 2) * extent
    corner = torch.rand(*shape, 2, generator=generator) * (extent - size)
    return torch.cat([corner, corner + size], dim=-1)


def _rois(count: int, images: int, image: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``Tensor[count, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in image coordinates."""
    batch_index = torch.randint(images, (count, 1), generator=generator).float()
    return torch.cat([batch_index, random_boxes(count, image=image, generator=generator)], dim=1)


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ---------------------------------------------------------------------------------------------------------------------
# The checks, one builder per op name (``--only`` takes these names)
# ---------------------------------------------------------------------------------------------------------------------


def _pairwise_checks(real: bool, device: torch.device) -> list[Check]:
    # 2000 x 2000: the RPN's 2000 training proposals of an image against each other (NMS's IoU matrix).
    n, m = (2000, 2000) if real else (40, 56)
    image = REAL_IMAGE if real else SMALL_IMAGE
    generator = _generator()
    boxes1 = random_boxes(n, image=image, generator=generator).to(device)
    boxes2 = random_boxes(m, image=image, generator=generator).to(device)
    return [
        Check(name, f"{n}x{m}", "torchvision", (boxes1, boxes2), getattr(ops, name), getattr(torchvision.ops, name), compare_close)
        for name in ("box_iou", "generalized_box_iou", "distance_box_iou", "complete_box_iou")
    ]  # fmt: skip


def _batched_box_iou(real: bool, device: torch.device) -> list[Check]:
    # 2 images x 2000 proposals x 20 ground-truth boxes: the box head's matching in training.
    batch, n, m = (2, 2000, 20) if real else (2, 24, 5)
    image = REAL_IMAGE if real else SMALL_IMAGE
    generator = _generator()
    boxes1 = random_boxes(batch, n, image=image, generator=generator).to(device)
    boxes2 = random_boxes(batch, m, image=image, generator=generator).to(device)
    call = lambda a, b: ops.batched_box_iou(a, b)
    return [Check("batched_box_iou", f"{batch}x{n}x{m}", "reference", (boxes1, boxes2), call, _on_reference(call), compare_close)]  # fmt: skip


def _nms(real: bool, device: torch.device) -> list[Check]:
    checks = []
    # 2000: RPN per level at test time; 12000: the paper's single-level pre-NMS count.
    for n in (2000, 12000) if real else (64,):
        generator = _generator()
        image = REAL_IMAGE if real else SMALL_IMAGE
        boxes = random_boxes(n, image=image, generator=generator).to(device)
        scores = torch.rand(n, generator=generator).to(device)
        checks.append(
            Check(
                "nms",
                str(n),
                "torchvision",
                (boxes, scores),
                lambda b, s: ops.nms(b, s, 0.7),
                lambda b, s: torchvision.ops.nms(b, s, 0.7),
                compare_keep(scores),
            )
        )
    return checks


def _batched_nms(real: bool, device: torch.device) -> list[Check]:
    # 5000 candidates of 90 classes: the box head's survivors of the score threshold.
    n, classes = (5000, 90) if real else (64, 4)
    generator = _generator()
    boxes = random_boxes(n, image=REAL_IMAGE if real else SMALL_IMAGE, generator=generator).to(device)
    scores = torch.rand(n, generator=generator).to(device)
    idxs = torch.randint(classes, (n,), generator=generator).to(device)
    return [
        Check(
            "batched_nms",
            f"{n}/{classes}cls",
            "torchvision",
            (boxes, scores, idxs),
            lambda b, s, i: ops.batched_nms(b, s, i, 0.5),
            lambda b, s, i: torchvision.ops.batched_nms(b, s, i, 0.5),
            compare_keep(scores),
        )
    ]


def _torchvision_padded(boxes, scores, iou_threshold, max_output, score_threshold):
    """torchvision's detector post-processing per image (score filter, ``batched_nms``, top
    ``max_output``): one ``(boxes [D_i, 4], scores [D_i], labels [D_i])`` per image."""
    images, n, classes = scores.shape
    labels = torch.arange(classes, device=scores.device).repeat(n)
    detections = []
    for image in range(images):
        image_boxes, image_scores = boxes[image].reshape(-1, 4), scores[image].reshape(-1)
        passing = torch.where(image_scores > score_threshold)[0]
        keep = torchvision.ops.batched_nms(image_boxes[passing], image_scores[passing], labels[passing], iou_threshold)
        keep = passing[keep[:max_output]]
        detections.append((image_boxes[keep], image_scores[keep], labels[keep]))
    return detections


def _detection_rows(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sorted ``(score, label, x1, y1, x2, y2)`` rows: detections as a set, ties in any order."""
    return torch.unique(torch.cat([scores[:, None], labels[:, None].to(scores), boxes], dim=1), dim=0)


def compare_padded_detections(ours, expected) -> Comparison:
    """:func:`~tritondet.ops.batched_nms_padded`'s padded outputs against one
    ``(boxes, scores, labels)`` per image: the same detections, as sets."""
    boxes, scores, labels, _, num_valid = ours
    ours_rows = [
        _detection_rows(boxes[i, :valid], scores[i, :valid], labels[i, :valid])
        for i, valid in enumerate(num_valid.tolist())
    ]
    return compare_close(ours_rows, [_detection_rows(*image) for image in expected])


def _batched_nms_padded(real: bool, device: torch.device) -> list[Check]:
    # The box head's output: 2 images x 1000 proposals x 91 classes, softmax-like scores (most
    # below the 0.05 threshold), top 100 per image.
    images, n, classes = (2, 1000, 91) if real else (2, 24, 3)
    generator = _generator()
    boxes = random_boxes(images, n, classes, image=REAL_IMAGE if real else SMALL_IMAGE, generator=generator).to(device)
    scores = (torch.rand(images, n, classes, generator=generator) ** 8).to(device)
    return [
        Check(
            "batched_nms_padded",
            f"{images}x{n}x{classes}cls",
            "torchvision",
            (boxes, scores),
            lambda b, s: ops.batched_nms_padded(b, s, 0.5, 100, score_threshold=0.05),
            lambda b, s: _torchvision_padded(b, s, 0.5, 100, 0.05),
            compare_padded_detections,
            compare_reference=compare_close,
        )
    ]


def _soft_nms(real: bool, device: torch.device) -> list[Check]:
    n = 2000 if real else 48  # the RPN's proposals per image in training
    generator = _generator()
    boxes = random_boxes(n, image=REAL_IMAGE if real else SMALL_IMAGE, generator=generator).to(device)
    scores = torch.rand(n, generator=generator).to(device)
    call = lambda b, s: ops.soft_nms(b, s)
    return [Check("soft_nms", str(n), "reference", (boxes, scores), call, _on_reference(call), compare_close)]


def _roi_features(real: bool, channels: int, device: torch.device):
    """Two images' stride-16 feature maps and RoIs in image coordinates (spatial_scale 1/16)."""
    # 512 RoIs per image batch, 256 channels, a 50x68 map: C4 of an 800x1088 image.
    count, height, width = (512, 50, 68) if real else (16, 7, 9)
    generator = _generator()
    features = torch.randn(2, channels, height, width, generator=generator).to(device)
    rois = _rois(count, 2, (height * 16, width * 16), generator).to(device)
    return features, rois, f"{count}x{channels}ch {height}x{width}"


def _roi_pooling(real: bool, device: torch.device) -> list[Check]:
    checks = []
    features, rois, size = _roi_features(real, 256 if real else 8, device)
    pooled = {
        "roi_align": (
            lambda x, r: ops.roi_align(x, r, 7, 1 / 16, 2, aligned=True),
            lambda x, r: torchvision.ops.roi_align(x, r, 7, 1 / 16, 2, aligned=True),
        ),
        "roi_pool": (
            lambda x, r: ops.roi_pool(x, r, 7, 1 / 16),
            lambda x, r: torchvision.ops.roi_pool(x, r, 7, 1 / 16),
        ),
    }
    for name, (ours, theirs) in pooled.items():
        checks.append(Check(name, size, "torchvision", (features, rois), ours, theirs, compare_close))
    return checks


def _position_sensitive(real: bool, device: torch.device) -> list[Check]:
    # R-FCN: (20 classes + background) x 7x7 score maps; small: 2 x 3x3.
    groups, bins = (21, 7) if real else (2, 3)
    features, rois, size = _roi_features(real, groups * bins * bins, device)
    return [
        Check("ps_roi_align", size, "torchvision", (features, rois),
              lambda x, r: ops.ps_roi_align(x, r, bins, 1 / 16, 2),
              lambda x, r: torchvision.ops.ps_roi_align(x, r, bins, 1 / 16, 2), compare_close),
        Check("ps_roi_pool", size, "torchvision", (features, rois),
              lambda x, r: ops.ps_roi_pool(x, r, bins, 1 / 16),
              lambda x, r: torchvision.ops.ps_roi_pool(x, r, bins, 1 / 16), compare_close),
    ]  # fmt: skip


def _crop_pool(real: bool, device: torch.device) -> list[Check]:
    features, rois, size = _roi_features(real, 256 if real else 8, device)
    call = lambda x, r: ops.crop_pool(x, r, 7, 1 / 16)
    return [Check("crop_pool", size, "reference", (features, rois), call, _on_reference(call), compare_close)]


FPN_LEVELS = ("0", "1", "2", "3")


def _multiscale_roi_align(real: bool, device: torch.device) -> list[Check]:
    # R50-FPN's box pooler: 2 images x 512 RoIs from 256-channel maps at strides 4..32.
    image, channels, count = (REAL_IMAGE, 256, 512) if real else (SMALL_IMAGE, 8, 12)
    generator = _generator()
    features = {
        name: torch.randn(
            2, channels, image[0] // 2 ** (level + 2), image[1] // 2 ** (level + 2), generator=generator
        ).to(device)
        for level, name in enumerate(FPN_LEVELS)
    }
    boxes = [random_boxes(count, image=image, generator=generator).to(device) for _ in range(2)]
    shapes = [image, image]
    ours = ops.MultiScaleRoIAlign(list(FPN_LEVELS), 7, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(list(FPN_LEVELS), 7, 2)
    return [
        Check("MultiScaleRoIAlign", f"2x{count}x{channels}ch {image[0]}x{image[1]}", "torchvision",
              (features, boxes, shapes), ours, theirs, compare_close)
    ]  # fmt: skip


def _box_coding(real: bool, device: torch.device) -> list[Check]:
    # Every anchor of an 800x1088 R50-FPN image (about 242,000) against its matched ground truth.
    n = 242_991 if real else 200
    image = REAL_IMAGE if real else SMALL_IMAGE
    generator = _generator()
    anchors = random_boxes(n, image=image, generator=generator).to(device)
    gt = random_boxes(n, image=image, generator=generator).to(device)
    deltas = (torch.randn(n, 4, generator=generator) * 0.5).to(device)
    weights = (1.0, 1.0, 1.0, 1.0)
    coder = detection_utils.BoxCoder(weights)
    return [
        Check("encode_boxes", str(n), "torchvision", (gt, anchors),
              lambda g, a: ops.encode_boxes(g, a, weights),
              lambda g, a: detection_utils.encode_boxes(g, a, torch.tensor(weights, device=device)), compare_close),
        Check("decode_boxes", str(n), "torchvision", (deltas, anchors),
              lambda d, a: ops.decode_boxes(d, a, weights), coder.decode_single, compare_close),
    ]  # fmt: skip


def _anchor_generator(real: bool, device: torch.device) -> list[Check]:
    image = REAL_IMAGE if real else SMALL_IMAGE
    sizes, ratios = ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5
    features = [torch.empty(2, 1, image[0] // s, image[1] // s, device=device) for s in (4, 8, 16, 32, 64)]
    images = ImageList(torch.empty(2, 3, *image, device=device), [image, image])
    ours = ops.AnchorGenerator(sizes, ratios)
    theirs = anchor_utils.AnchorGenerator(sizes, ratios)
    return [
        Check("AnchorGenerator", f"2x{image[0]}x{image[1]} FPN", "torchvision", (images, features), ours, theirs, compare_close)
    ]  # fmt: skip


def _rpn_proposals(real: bool, device: torch.device) -> list[Check]:
    # R50-FPN test time: 5 levels, 3 anchors per position, 1000 best per level, 1000 proposals.
    image, top_n = (REAL_IMAGE, 1000) if real else (SMALL_IMAGE, 16)
    strides = (4, 8, 16, 32, 64)
    sizes, ratios = ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5
    generator = _generator()
    shapes = [(image[0] // s, image[1] // s) for s in strides]
    objectness = [torch.randn(2, 3, h, w, generator=generator).to(device) for h, w in shapes]
    deltas = [(torch.randn(2, 12, h, w, generator=generator) * 0.3).to(device) for h, w in shapes]
    image_sizes = torch.tensor([image, (image[0] - 32, image[1] - 64)], device=device)
    call = lambda o, d, s: ops.rpn_proposals(o, d, s, sizes, ratios, list(strides), top_n, top_n)
    return [
        Check("rpn_proposals", f"2x{image[0]}x{image[1]} top{top_n}", "reference",
              (objectness, deltas, image_sizes), call, _on_reference(call), compare_close)
    ]  # fmt: skip


def _postprocess_detections(real: bool, device: torch.device) -> list[Check]:
    # R50-FPN's box head at test time: 2 images x 1000 proposals x 91 classes, top 100.
    proposals_per_image, classes = (1000, 91) if real else (16, 3)
    image = REAL_IMAGE if real else SMALL_IMAGE
    generator = _generator()
    proposals = random_boxes(2, proposals_per_image, image=image, generator=generator).to(device)
    logits = (torch.randn(2 * proposals_per_image, classes, generator=generator) * 3).to(device)
    regression = (torch.randn(2 * proposals_per_image, 4 * classes, generator=generator) * 0.5).to(device)
    num_valid = torch.tensor([proposals_per_image, proposals_per_image - 3], device=device)
    image_sizes = torch.tensor([image, image], device=device)
    call = lambda c, r, p, n, s: ops.postprocess_detections(c, r, p, n, s)
    return [
        Check("postprocess_detections", f"2x{proposals_per_image}x{classes}cls", "reference",
              (logits, regression, proposals, num_valid, image_sizes), call, _on_reference(call), compare_close)
    ]  # fmt: skip


def _torchvision_match(anchors, gt_boxes, high, low):
    matcher = detection_utils.Matcher(high, low, allow_low_quality_matches=True)
    return torch.stack([matcher(torchvision.ops.box_iou(gt, anchors)) for gt in gt_boxes])


def _match_boxes(real: bool, device: torch.device) -> list[Check]:
    # The RPN's matching: every R50-FPN anchor of an 800x1088 image against 20 ground-truth boxes.
    anchors_count, gt_count = (242_991, 20) if real else (300, 4)
    image = REAL_IMAGE if real else SMALL_IMAGE
    generator = _generator()
    anchors = random_boxes(anchors_count, image=image, generator=generator).to(device)
    gt = random_boxes(2, gt_count, image=image, generator=generator).to(device)
    return [
        Check("match_boxes", f"2x{anchors_count}x{gt_count}", "torchvision", (anchors, gt),
              lambda a, g: ops.match_boxes(a, g, [gt_count, gt_count], 0.7, 0.3, True),
              lambda a, g: _torchvision_match(a, g, 0.7, 0.3), compare_close)
    ]  # fmt: skip


def _training_targets(real: bool, device: torch.device) -> list[Check]:
    """The RPN's and the box head's target layers; their sampler draws the same numbers on both
    backends from equally seeded generators, so the reference is an exact oracle."""
    # R50-FPN training: every anchor of an 800x1088 image, 20 ground-truth boxes, 256 sampled
    # anchors; 2000 proposals per image, 91 classes, 512 sampled RoIs.
    anchors_count, proposals_count, gt_count, classes = (242_991, 2000, 20, 91) if real else (300, 40, 4, 5)
    anchors_per_image, rois_per_image = (256, 512) if real else (64, 32)
    image = REAL_IMAGE if real else SMALL_IMAGE
    generator = _generator()
    anchors = random_boxes(anchors_count, image=image, generator=generator).to(device)
    proposals = random_boxes(2, proposals_count, image=image, generator=generator).to(device)
    gt = random_boxes(2, gt_count, image=image, generator=generator).to(device)
    labels = torch.randint(1, classes, (2, gt_count), generator=generator).to(device)
    counts = [gt_count, gt_count - 1]
    seeded = lambda: torch.Generator(device).manual_seed(1)
    rpn_targets = lambda a, g: ops.anchor_targets(
        a, g, counts, batch_size_per_image=anchors_per_image, generator=seeded()
    )
    head_targets = lambda p, g, c: ops.proposal_targets(
        p, g, c, counts, classes, batch_size_per_image=rois_per_image, generator=seeded()
    )
    return [
        Check("anchor_targets", f"2x{anchors_count}x{gt_count}", "reference", (anchors, gt),
              rpn_targets, _on_reference(rpn_targets), compare_close),
        Check("proposal_targets", f"2x{proposals_count}x{gt_count} {classes}cls", "reference", (proposals, gt, labels),
              head_targets, _on_reference(head_targets), compare_close),
    ]  # fmt: skip


def _torchvision_mask_targets(gt_masks, proposals, matched):
    return torch.stack(
        [
            roi_heads.project_masks_on_boxes(g, p, i, MASK_SIZE)
            for g, p, i in zip(gt_masks, proposals, matched, strict=True)
        ]
    )


def _torchvision_mask_loss(logits, labels, targets):
    picked = logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return torch.nn.functional.binary_cross_entropy_with_logits(picked, targets)


def _torchvision_paste_per_image(masks, boxes, image):
    return torch.stack(
        [roi_heads.paste_masks_in_image(m[:, None], b, image)[:, 0] for m, b in zip(masks, boxes, strict=True)]
    )


MASK_SIZE = 28  # Mask R-CNN's mask head output and target side


def _masks(real: bool, device: torch.device) -> list[Check]:
    """Mask R-CNN's mask ops. Test time: 100 detections per image with 28x28 masks pasted into the
    800x1088 image; training: 20 ground-truth masks per image, 128 positive RoIs per image (a
    quarter of 512 sampled), 91 classes."""
    detections, gt_count, positives, classes = (100, 20, 128, 91) if real else (8, 3, 6, 4)
    image = REAL_IMAGE if real else SMALL_IMAGE
    generator = _generator()
    masks = torch.rand(2, detections, MASK_SIZE, MASK_SIZE, generator=generator).to(device)
    boxes = random_boxes(2, detections, image=image, generator=generator).to(device)
    num_valid = torch.tensor([detections, detections], device=device)
    image_sizes = torch.tensor([image, image], device=device)
    gt_masks = (torch.rand(2, gt_count, *image, generator=generator) > 0.5).to(device)
    proposals = random_boxes(2, positives, image=image, generator=generator).to(device)
    matched = torch.randint(gt_count, (2, positives), generator=generator).to(device)
    counts, valid = torch.tensor([gt_count] * 2, device=device), torch.tensor([positives] * 2, device=device)
    logits = (torch.randn(2 * positives, classes, MASK_SIZE, MASK_SIZE, generator=generator) * 3).to(device)
    labels = torch.randint(classes, (2 * positives,), generator=generator).to(device)
    targets = (torch.rand(2 * positives, MASK_SIZE, MASK_SIZE, generator=generator) > 0.5).float().to(device)
    paste_size = f"{detections}x{MASK_SIZE}x{MASK_SIZE} {image[0]}x{image[1]}"
    return [
        Check("paste_masks_in_image", paste_size, "torchvision", (masks[0, :, None], boxes[0]),
              lambda m, b: ops.paste_masks_in_image(m, b, image),
              lambda m, b: roi_heads.paste_masks_in_image(m, b, image), compare_close),
        Check("paste_masks_padded", "2x" + paste_size, "torchvision", (masks, boxes),
              lambda m, b: ops.paste_masks_padded(m, b, num_valid, image_sizes, image, None, torch.float32),
              lambda m, b: _torchvision_paste_per_image(m, b, image), compare_close),
        Check("mask_targets", f"2x{positives} of {gt_count} {MASK_SIZE}x{MASK_SIZE}", "torchvision",
              (gt_masks, proposals, matched),
              lambda g, p, i: ops.mask_targets(g, counts, p, i, valid, MASK_SIZE), _torchvision_mask_targets,
              compare_close),
        Check("mask_loss", f"{2 * positives}x{classes}cls", "torchvision", (logits, labels, targets),
              ops.mask_loss, _torchvision_mask_loss, compare_close),
    ]  # fmt: skip


# Every op name ``--only`` accepts -> the builder of its checks (a builder may serve several ops:
# one set of inputs for both RoI poolings, the four pairwise IoUs, the two box codings).
BUILDERS: dict[str, Callable[[bool, torch.device], list[Check]]] = {
    "box_iou": _pairwise_checks,
    "generalized_box_iou": _pairwise_checks,
    "distance_box_iou": _pairwise_checks,
    "complete_box_iou": _pairwise_checks,
    "batched_box_iou": _batched_box_iou,
    "nms": _nms,
    "batched_nms": _batched_nms,
    "batched_nms_padded": _batched_nms_padded,
    "soft_nms": _soft_nms,
    "roi_align": _roi_pooling,
    "roi_pool": _roi_pooling,
    "ps_roi_align": _position_sensitive,
    "ps_roi_pool": _position_sensitive,
    "crop_pool": _crop_pool,
    "MultiScaleRoIAlign": _multiscale_roi_align,
    "encode_boxes": _box_coding,
    "decode_boxes": _box_coding,
    "AnchorGenerator": _anchor_generator,
    "rpn_proposals": _rpn_proposals,
    "postprocess_detections": _postprocess_detections,
    "match_boxes": _match_boxes,
    "anchor_targets": _training_targets,
    "proposal_targets": _training_targets,
    "paste_masks_in_image": _masks,
    "paste_masks_padded": _masks,
    "mask_targets": _masks,
    "mask_loss": _masks,
}
CAPTURE_OP = "forward_padded"
OP_NAMES = (*BUILDERS, CAPTURE_OP)


# ---------------------------------------------------------------------------------------------------------------------
# Running the checks
# ---------------------------------------------------------------------------------------------------------------------


def _median_ms(function: Callable[[], Any]) -> float:
    import triton.testing

    return triton.testing.do_bench(function, return_mode="median")


def run_check(check: Check, timed: bool) -> Row:
    """Compare our op (Triton backend) with ``check``'s expected side and, where that is
    torchvision, with our reference backend too; on a GPU (``timed``) time ours and torchvision's."""
    ours = lambda: check.ours(*check.inputs)
    with backend("triton"):
        try:
            result = ours()
            comparison = check.compare(result, check.expected(*check.inputs))
            reference = None
            if check.against == "torchvision":
                compare_reference = check.compare_reference or check.compare
                reference = compare_reference(result, _on_reference(check.ours)(*check.inputs)).passed
            ratio = None
            if timed and check.against == "torchvision":
                ratio = _median_ms(lambda: check.expected(*check.inputs)) / _median_ms(ours)
        except Exception as error:  # a crash is a failing row, not the end of the self-test
            note = f"{type(error).__name__}: {error}"
            return Row(check.op, check.size, check.against, None, None, False, None, None, note)
    return Row(
        check.op,
        check.size,
        check.against,
        comparison.match,
        comparison.max_abs_diff,
        comparison.passed,
        reference,
        ratio,
    )


def capture_row(real: bool, device: torch.device) -> Row:
    """``FasterRCNN.forward_padded`` (random weights, every score kept) captured in a CUDA graph
    after a warm-up on a side stream; the replay's outputs compared with the eager call's."""
    from .detector import FasterRCNN, resnet50_fpn, tiny

    size = "2x800x1088 R50-FPN" if real else "2x64x96 tiny"
    if device.type != "cuda":
        return Row(CAPTURE_OP, size, "eager", None, None, None, None, None, "CUDA graph capture skipped: no GPU")
    config = (resnet50_fpn() if real else tiny()).replace(roi_heads=dict(score_thresh=0.0))
    model = FasterRCNN(config).eval().to(device)
    image = REAL_IMAGE if real else SMALL_IMAGE
    images = torch.rand(2, 3, *image, generator=_generator()).to(device)
    image_sizes = torch.tensor([image, (image[0] - 32, image[1] - 64)], device=device)
    try:
        with torch.inference_mode(), backend("triton"):
            warm_up = torch.cuda.Stream()
            warm_up.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(warm_up):
                for _ in range(3):  # lazy initialisations (cuDNN, kernel compilation) must not be captured
                    model.forward_padded(images, image_sizes)
            torch.cuda.current_stream().wait_stream(warm_up)
            eager = model.forward_padded(images, image_sizes)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = model.forward_padded(images, image_sizes)
            graph.replay()
            torch.cuda.synchronize()
            comparison = compare_close(replayed, eager, atol=0.0, rtol=0.0)  # the same kernels: bit for bit
            eager_ms = _median_ms(lambda: model.forward_padded(images, image_sizes))
            replay_ms = _median_ms(graph.replay)
    except Exception as error:
        return Row(CAPTURE_OP, size, "eager", None, None, False, None, None, f"{type(error).__name__}: {error}")
    note = f"CUDA graph replay {replay_ms:.2f} ms, eager {eager_ms:.2f} ms"
    return Row(
        CAPTURE_OP, size, "eager", comparison.match, comparison.max_abs_diff, comparison.passed, None, None, note
    )


def unknown_ops(only: Sequence[str]) -> list[str]:
    """The names in ``only`` that are no op of the self-test."""
    return sorted(set(only) - set(OP_NAMES))


def run(
    sizes: str,
    only: Sequence[str] = (),
    device: torch.device | None = None,
    on_row: Callable[[Row], None] = lambda row: None,
) -> list[Row]:
    """One row per check of the ops in ``only`` (every op when empty) at ``sizes`` ("small" or "real");
    ``on_row`` sees each row as it is done."""
    if sizes not in SIZES:
        raise ValueError(f"sizes must be one of {SIZES}, got {sizes!r}")
    if unknown_ops(only):
        raise ValueError(f"unknown op(s) {unknown_ops(only)}; choose from {', '.join(OP_NAMES)}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    selected = set(only or OP_NAMES)
    real = sizes == "real"
    rows = []
    builders = list(dict.fromkeys(BUILDERS[op] for op in BUILDERS if op in selected))
    for build in builders:
        for check in build(real, device):
            if check.op in selected:
                rows.append(run_check(check, timed=device.type == "cuda"))
                on_row(rows[-1])
    if CAPTURE_OP in selected:
        rows.append(capture_row(real, device))
        on_row(rows[-1])
    return rows


# Column widths of the table, fixed so that rows can be printed as they finish: the longest op
# name, the longest size label, then the header's own widths; the note runs to the end of the line.
WIDTHS = (22, 26, 11, 11, 12, 11, 7, 24, 0)


def format_line(cells: Sequence[str]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, WIDTHS, strict=True)).rstrip()


def write_csv(rows: Sequence[Row], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(HEADER)
        writer.writerows(row.cells() for row in rows)


def describe_environment(device: torch.device) -> str:
    import triton

    from . import __version__

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter, no timing)"
    return (
        f"tritondet {__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"triton {triton.__version__}; device: {where}"
    )


def _restart_under_interpreter(sizes: str | None, only: Sequence[str], csv_path: Path | None) -> int:
    """Run ``tritondet selftest`` again in a process with ``TRITON_INTERPRET=1``; its exit code."""
    argv = ["selftest", *(["--sizes", sizes] if sizes else []), *(["--only", ",".join(only)] if only else [])]
    argv += ["--csv", str(csv_path)] if csv_path else []
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "tritondet.cli", *argv], env=environment).returncode


def main(sizes: str | None, only: Sequence[str], csv_path: Path | None) -> int:
    """Print the table (a row as each check finishes); return 1 on any parity failure, 2 on an unknown op.

    Without a GPU the kernels need the Triton interpreter, which only ``TRITON_INTERPRET=1`` set
    before triton's first import turns on (``import tritondet`` imports triton): when it is off,
    the self-test runs again in a process that has the variable."""
    interpreter_missing = not torch.cuda.is_available() and not _backend.interpreter_active()
    if interpreter_missing and os.environ.get("TRITON_INTERPRET") != "1":  # set but off: no endless restarts
        return _restart_under_interpreter(sizes, only, csv_path)
    if unknown_ops(only):
        print(
            f"tritondet selftest: unknown op(s) {unknown_ops(only)}; choose from {', '.join(OP_NAMES)}", file=sys.stderr
        )
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = sizes or ("real" if device.type == "cuda" else "small")
    print(f"tritondet selftest, {sizes} sizes: {describe_environment(device)}")
    if device.type != "cuda":
        print("CPU interpreter: the Triton kernels run in the Triton interpreter; times are not compared.")
        # The interpreter evaluates masked-off lanes too (numpy divisions by zero there); their
        # values are never stored, so the warnings say nothing about the results.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    print(
        "torchvision ms / ours ms: medians of triton.testing.do_bench in this run (above 1: ours faster); '-': not timed"
    )
    print("exact match: share of output elements (NMS: of kept indices) equal to the expected ones")
    print("= reference: ours also equal to our PyTorch reference backend (rows against torchvision)\n")
    print(format_line(HEADER))
    rows = run(sizes, only, device, on_row=lambda row: print(format_line(row.cells()), flush=True))
    failed = [row for row in rows if row.failed]
    print(f"\n{len(rows)} checks, {len(failed)} failed" + (": " + ", ".join(r.op for r in failed) if failed else ""))
    if csv_path is not None:
        write_csv(rows, csv_path)
        print(f"wrote {csv_path}")
    print("\n" + REPORT_INSTRUCTIONS)
    return 1 if failed else 0
