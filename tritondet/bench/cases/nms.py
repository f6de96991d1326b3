"""NMS family: ``nms``, ``batched_nms`` and ``batched_nms_padded`` at the sizes a detector uses.

``nms`` at N = 1000 and 2000 (RPN post-NMS per level at test / train), 12000 (pre-NMS in
training) and 100000 (dense detectors); ``batched_nms`` with 80 classes at 1k/10k/100k boxes (the
box head's per-class NMS); ``batched_nms_padded`` for 8 images x 1000 proposals x 80 classes,
against torchvision's per-image loop (score filter, ``batched_nms``, top 100) as its detector
post-processing does. Boxes are proposal-like (16 to ~400 px) inside an 800x1333 image, so that
suppression really happens; IoU threshold 0.7 (RPN) for ``nms``, 0.5 (box head) otherwise.
"""

from __future__ import annotations

import torch
import torchvision

from ... import ops
from ..harness import Case
from ..inputs import proposal_like_boxes

HEIGHT, WIDTH = 800, 1333
CLASSES = 80
MAX_OUTPUT = 100  # detections per image (torchvision's box_detections_per_img)
SCORE_THRESHOLD = 0.05  # torchvision's box_score_thresh
_SIZES = {
    "tiny": {"nms": [50], "batched_nms": [200], "padded": [(2, 30)]},
    "quick": {"nms": [2000], "batched_nms": [10000], "padded": [(8, 1000)]},
    "full": {
        "nms": [1000, 2000, 12000, 100000],
        "batched_nms": [1000, 10000, 100000],
        "padded": [(8, 1000)],
    },
}
# The CPU skips the sizes that take torchvision tens of seconds.
_CPU_LIMIT = {"nms": 12000, "batched_nms": 10000}


def _same_kept_set(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """The same kept indices; their order may differ only where scores tie (random fp32 scores tie
    a few times in 10k), which torchvision's own tests accept."""
    torch.testing.assert_close(ours.sort().values, theirs.sort().values)


def _nms_case(n: int, dtype: torch.dtype, device: torch.device) -> Case:
    def inputs():
        generator = torch.Generator().manual_seed(n)
        return proposal_like_boxes(n, height=HEIGHT, width=WIDTH, generator=generator).to(device, dtype), torch.rand(
            n, generator=generator
        ).to(device, dtype)

    return Case(
        op="nms",
        size=str(n),
        dtype=dtype,
        device=device,
        inputs=inputs,
        ours=lambda boxes, scores: ops.nms(boxes, scores, 0.7),
        torchvision=lambda boxes, scores: torchvision.ops.nms(boxes, scores, 0.7),
        min_bytes=n * 5 * dtype.itemsize,  # boxes and scores read once (the kept indices are few)
        check=_same_kept_set,
    )


def _batched_case(n: int, dtype: torch.dtype, device: torch.device) -> Case:
    def inputs():
        generator = torch.Generator().manual_seed(n)
        boxes = proposal_like_boxes(n, height=HEIGHT, width=WIDTH, generator=generator).to(device, dtype)
        scores = torch.rand(n, generator=generator).to(device, dtype)
        return boxes, scores, torch.randint(CLASSES, (n,), generator=generator).to(device)

    return Case(
        op="batched_nms",
        size=f"{n}/{CLASSES}cls",
        dtype=dtype,
        device=device,
        inputs=inputs,
        ours=lambda boxes, scores, idxs: ops.batched_nms(boxes, scores, idxs, 0.5),
        torchvision=lambda boxes, scores, idxs: torchvision.ops.batched_nms(boxes, scores, idxs, 0.5),
        min_bytes=n * (5 * dtype.itemsize + 8),  # boxes, scores and class ids read once
        check=_same_kept_set,
    )


def _torchvision_padded(boxes: torch.Tensor, scores: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """torchvision's detector post-processing per image: score filter, batched_nms, top 100."""
    images, n, classes = scores.shape
    labels = torch.arange(classes, device=scores.device).repeat(n)
    kept = []
    for image in range(images):
        image_boxes, image_scores = boxes[image].reshape(-1, 4), scores[image].reshape(-1)
        passing = torch.where(image_scores > SCORE_THRESHOLD)[0]
        keep = torchvision.ops.batched_nms(image_boxes[passing], image_scores[passing], labels[passing], 0.5)
        keep = passing[keep[:MAX_OUTPUT]]
        kept.append((image_boxes[keep], image_scores[keep]))
    return kept


def _rows(boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(score, box) rows in lexicographic order: detections compared as a set (ties in any order)."""
    return torch.unique(torch.cat([scores[:, None], boxes], dim=1), dim=0)


def _check_padded(ours, theirs) -> None:
    boxes, scores, num_valid = ours[0], ours[1], ours[-1]
    for image, (their_boxes, their_scores) in enumerate(theirs):
        valid = int(num_valid[image])
        torch.testing.assert_close(scores[image, :valid], their_scores)  # by decreasing score
        torch.testing.assert_close(_rows(boxes[image, :valid], scores[image, :valid]), _rows(their_boxes, their_scores))


def _padded_case(images: int, n: int, dtype: torch.dtype, device: torch.device) -> Case:
    def inputs():
        generator = torch.Generator().manual_seed(images * n)
        boxes = proposal_like_boxes(images, n, CLASSES, height=HEIGHT, width=WIDTH, generator=generator).to(
            device, dtype
        )
        # Softmax-like scores: most classes low, a few above the threshold.
        scores = (torch.rand(images, n, CLASSES, generator=generator) ** 8).to(device, dtype)
        return boxes, scores

    return Case(
        op="batched_nms_padded",
        size=f"{images}x{n}x{CLASSES}cls",
        dtype=dtype,
        device=device,
        inputs=inputs,
        ours=lambda boxes, scores: ops.batched_nms_padded(
            boxes, scores, 0.5, MAX_OUTPUT, score_threshold=SCORE_THRESHOLD
        ),
        torchvision=_torchvision_padded,
        # Boxes and scores read once; padded boxes, scores, labels, indices written once.
        min_bytes=images * n * CLASSES * 5 * dtype.itemsize + images * MAX_OUTPUT * (5 * dtype.itemsize + 16),
        check=_check_padded,
    )


def cases(device: torch.device, sizes: str) -> list[Case]:
    table = _SIZES[sizes]
    fits = lambda family, n: device.type == "cuda" or n <= _CPU_LIMIT[family]
    dtype = torch.float32
    return (
        [_nms_case(n, dtype, device) for n in table["nms"] if fits("nms", n)]
        + [_batched_case(n, dtype, device) for n in table["batched_nms"] if fits("batched_nms", n)]
        + [_padded_case(images, n, dtype, device) for images, n in table["padded"]]
    )
