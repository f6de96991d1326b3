"""Loop-level NMS and soft-NMS, written straight from the definitions: the tests' second oracle.

IoU comes from torchvision's ``box_iou`` on boxes upcast to fp32 (fp64 stays fp64), the precision
the ops promise; everything else is plain Python over boxes.
"""

from __future__ import annotations

import math

import torch
import torchvision


def _iou_matrix(boxes: torch.Tensor) -> list[list[float]]:
    work = boxes.double() if boxes.dtype == torch.float64 else boxes.float()
    return torchvision.ops.box_iou(work, work).tolist()


def _score_order(scores: torch.Tensor) -> list[int]:
    """Decreasing score, ties in input order, NaN last."""
    values = scores.double().tolist()
    return sorted(
        range(len(values)), key=lambda i: (math.isnan(values[i]), -values[i] if values[i] == values[i] else 0)
    )


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, idxs=None) -> torch.Tensor:
    iou = _iou_matrix(boxes)
    classes = [0] * boxes.shape[0] if idxs is None else idxs.tolist()
    suppressed = [False] * boxes.shape[0]
    keep = []
    order = _score_order(scores)
    for position, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[position + 1 :]:
            if classes[j] == classes[i] and iou[i][j] > iou_threshold:
                suppressed[j] = True
    return torch.tensor(keep, dtype=torch.int64)


def soft_nms(boxes, scores, iou_threshold, sigma, score_threshold, method):
    iou = _iou_matrix(boxes)
    dtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    current = [torch.tensor(s, dtype=dtype) for s in scores.tolist()]
    alive = [not math.isnan(s) for s in scores.tolist()]
    keep, kept_scores = [], []
    while True:
        best = None
        for i in range(len(current)):
            if alive[i] and (best is None or current[i] > current[best]):
                best = i
        if best is None or not current[best] >= score_threshold:
            break
        keep.append(best)
        kept_scores.append(current[best])
        alive[best] = False
        for j in range(len(current)):
            if not alive[j]:
                continue
            overlap = torch.tensor(iou[best][j], dtype=dtype)
            if method == "linear":
                weight = 1 - overlap if overlap > iou_threshold else torch.tensor(1.0, dtype=dtype)
            else:
                weight = torch.exp(-(overlap * overlap) / sigma)
            current[j] = current[j] * weight
            if current[j] < score_threshold:
                alive[j] = False
    new_scores = torch.stack(kept_scores) if kept_scores else torch.empty(0, dtype=dtype)
    return torch.tensor(keep, dtype=torch.int64), new_scores
