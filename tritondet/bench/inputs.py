"""Inputs shared by the benchmark cases and the tests: box sets, torchvision's detector twin, the parity check.

- :func:`random_boxes`, :func:`special_boxes`: random, degenerate and adversarial xyxy box sets;
  ``random_boxes(n, scale=IMAGE_SCALE)``: boxes spread over an 800x1333 image, as anchors,
  proposals and ground truth are;
- :func:`proposal_like_boxes`: boxes of 16 to ~400 px inside an image, small ones the likelier;
- :func:`torchvision_twin`: torchvision's ``FasterRCNN`` built from one of our configurations with
  random weights (``FasterRCNN.from_torchvision`` then gives ours the same weights);
- :func:`assert_same_detections`: our detections against torchvision's, within the parity bounds.
"""

from __future__ import annotations

import torch
from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN

from ..detector.backbone import build_backbone
from ..detector.compat import to_torchvision
from ..detector.config import tiny

# Detector parity bounds: box corners in pixels at image scale, scores as probabilities.
BOX_ATOL, SCORE_ATOL = 1e-3, 1e-4
# random_boxes' scale for boxes spread over an 800x1333 image (corners and sides up to 600 px).
IMAGE_SCALE = 600.0


def random_boxes(n: int, *, scale: float = 100.0, generator: torch.Generator | None = None, batch=()) -> torch.Tensor:
    """``[*batch, n, 4]`` valid xyxy boxes (x1 < x2, y1 < y2) in fp32 inside ``[0, 2 * scale]``."""
    corner = torch.rand(*batch, n, 2, generator=generator) * scale
    size = torch.rand(*batch, n, 2, generator=generator) * scale + scale * 1e-3
    return torch.cat([corner, corner + size], dim=-1)


def proposal_like_boxes(*shape: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """``[*shape, 4]`` proposal-like xyxy boxes in fp32 inside a ``height x width`` image: a corner
    in its first 80%, sides of 16 px plus up to half the shorter side (~400 px at 800x1333), small
    ones the likelier (so that boxes overlap and suppress each other as proposals do)."""
    corner = torch.rand(*shape, 2, generator=generator) * torch.tensor([width * 0.8, height * 0.8])
    size = 16 + torch.rand(*shape, 2, generator=generator) ** 2 * (min(height, width) * 0.5)
    return torch.cat([corner, corner + size], dim=-1)


def special_boxes() -> torch.Tensor:
    """``[12, 4]``: zero-width, zero-height, point, inverted, identical, disjoint, huge and tiny boxes."""
    return torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 10.0],  # identical to the first
            [5.0, 5.0, 5.0, 15.0],  # zero width
            [5.0, 5.0, 15.0, 5.0],  # zero height
            [3.0, 3.0, 3.0, 3.0],  # a point
            [10.0, 10.0, 0.0, 0.0],  # inverted
            [100.0, 100.0, 110.0, 110.0],  # disjoint from the rest
            [0.0, 0.0, 1e6, 1e6],  # huge
            [-1e6, -1e6, 1e6, 1e6],  # huge, around the origin
            [1.0, 1.0, 1.001, 1.001],  # tiny
            [10.0, 0.0, 20.0, 10.0],  # touches the first along an edge
            [2.0, 2.0, 8.0, 8.0],  # inside the first
        ]
    )


def torchvision_twin(config=None, seed: int = 0, spread: float = 0.3, **overrides) -> TorchvisionFasterRCNN:
    """torchvision's ``FasterRCNN`` configured as ``config`` (``tiny()`` by default, with
    ``config.replace(**overrides)``) with random weights; the RPN head and predictor get wider
    weights (std ``spread``) so that scores and boxes differ from one anchor or class to the next
    (a fresh detector scores everything alike)."""
    config = (config or tiny()).replace(**overrides)
    torch.manual_seed(seed)
    model = to_torchvision(config, build_backbone(config.backbone))
    with torch.no_grad():
        for module in (model.rpn.head.cls_logits, model.rpn.head.bbox_pred, model.roi_heads.box_predictor):
            for parameter in module.parameters():
                parameter.normal_(std=spread)
    return model


def assert_same_detections(ours: list[dict], theirs: list[dict]) -> None:
    """Per image (``boxes [D, 4]``, ``scores [D]``, ``labels [D]``, by decreasing score): the same
    detections, scores within ``SCORE_ATOL`` position by position and each of ours paired with one of
    theirs of the same label, a box within ``BOX_ATOL`` and a score within ``SCORE_ATOL``. Detections
    whose scores tie within ``SCORE_ATOL`` may so come in either order: rounding that differs between
    two computations of the same model (a convolution's memory layout, a GPU) reorders them."""
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a["labels"].shape == b["labels"].shape, f"image {i}: {a['labels'].shape} vs {b['labels'].shape}"
        for key in ("boxes", "scores", "labels"):
            assert a[key].dtype == b[key].dtype, f"image {i} {key}: {a[key].dtype} vs {b[key].dtype}"
        torch.testing.assert_close(a["scores"], b["scores"], atol=SCORE_ATOL, rtol=0, msg=f"image {i} scores")
        scores_close = (a["scores"][:, None] - b["scores"][None, :]).abs() <= SCORE_ATOL
        labels_equal = a["labels"][:, None] == b["labels"][None, :]
        boxes_close = ((a["boxes"][:, None] - b["boxes"][None, :]).abs() <= BOX_ATOL).all(dim=-1)
        counterparts = (scores_close & labels_equal & boxes_close).tolist()
        unpaired = set(range(len(counterparts)))
        for k, row in enumerate(counterparts):
            paired = next((j for j in sorted(unpaired) if row[j]), None)
            assert paired is not None, (
                f"image {i}: detection {k} (label {int(a['labels'][k])}, score {float(a['scores'][k]):.6f}, box "
                f"{a['boxes'][k].tolist()}) has no counterpart among torchvision's"
            )
            unpaired.remove(paired)
