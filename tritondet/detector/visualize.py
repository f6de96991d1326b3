"""Pictures of the detector at work: the loss chart of a run's ``log.csv``, detections (and masks) drawn on images, an
image grid, ``tritondet predict`` (:func:`predict_image`) and its ``--stages`` view (:func:`pipeline_stages`).

Shape shorthand: N boxes, H x W image height and width; images are ``[3, H, W]``, float in [0, 1] or uint8.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from .. import ops
from .backbone import backbone_features, feature_strides
from .data import read_image, resize_boxes
from .data.errors import InputError
from .engine.checkpoints import load_checkpoint
from .engine.train_config import resolve_device
from .faster_rcnn import FasterRCNN, convolution_layout
from .mask_rcnn import MASK_LOSS_NAMES

_CURVE_COLORS = ((0, 0, 0), (214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189))
# Drawn masks: how much of the colour covers the image under them.
_MASK_ALPHA = 0.45


def plot_loss_curves(csv_path: Path, out_path: Path, size: tuple[int, int] = (800, 480)) -> None:
    """The total and per-term losses of ``log.csv`` against the iteration, drawn with PIL, log-scale y."""
    with open(csv_path, newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows:
        return
    names = [name for name in ("loss", *MASK_LOSS_NAMES) if name in rows[0]]  # loss_mask: Mask R-CNN runs
    iterations = [int(r["iteration"]) for r in rows]
    # Per term, the runs of consecutive rows that log it (an alternating step trains some terms only).
    series = {n: [[]] for n in names}
    for iteration, row in zip(iterations, rows, strict=True):
        for n in names:
            if row.get(n):
                series[n][-1].append((iteration, max(float(row[n]), 1e-4)))
            elif series[n][-1]:
                series[n].append([])
    values = [v for runs in series.values() for run in runs for _, v in run]
    width, height = size
    left, right, top, bottom = 60, 170, 20, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    low = math.log10(min(values))
    high = math.log10(max(values))
    high = high if high > low else low + 1
    x_max = max(iterations[-1], iterations[0] + 1)

    def point(iteration: int, value: float) -> tuple[float, float]:
        x = left + (iteration - iterations[0]) / (x_max - iterations[0]) * (width - left - right)
        y = top + (high - math.log10(value)) / (high - low) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for exponent in range(math.floor(low), math.ceil(high) + 1):
        y = point(iterations[0], 10.0**exponent)[1]
        if top <= y <= height - bottom:
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((5, y - 6), f"1e{exponent}", fill="black")
    for fraction in (0, 0.5, 1):
        iteration = round(iterations[0] + fraction * (x_max - iterations[0]))
        x = point(iteration, 1.0)[0]
        draw.text((x - 10, height - bottom + 6), str(iteration), fill="black")
    draw.text(((width - right) // 2, height - 18), "iteration", fill="black")
    for i, name in enumerate(names):
        color = _CURVE_COLORS[i]
        for run in series[name]:
            if run:
                draw.line([point(t, v) for t, v in run], fill=color, width=2)
        draw.line([width - right + 10, top + 10 + 16 * i, width - right + 30, top + 10 + 16 * i], fill=color, width=2)
        draw.text((width - right + 35, top + 4 + 16 * i), name, fill="black")
    image.save(out_path)


def draw_detections(
    image: Tensor, prediction: dict, categories: list[str], score_thresh: float = 0.5, color: str = "red"
) -> Tensor:
    """``image`` ``[3, H, W]`` in [0, 1] with the boxes scoring at least ``score_thresh``, labelled
    ``"name score"``, and their masks (a Mask R-CNN's ``masks [N, 1, H, W]`` probabilities > 0.5,
    one colour per class) under them; returns ``uint8 [3, H, W]``."""
    keep = prediction["scores"] >= score_thresh
    boxes = prediction["boxes"][keep].detach().float().cpu()
    names = [
        f"{categories[int(label)]} {float(score):.2f}"
        for label, score in zip(prediction["labels"][keep], prediction["scores"][keep], strict=True)
    ]
    pixels = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    if "masks" in prediction and bool(keep.any()):
        masks = prediction["masks"][keep][:, 0].detach().cpu() > 0.5
        palette = [_CURVE_COLORS[1 + int(label) % (len(_CURVE_COLORS) - 1)] for label in prediction["labels"][keep]]
        pixels = draw_segmentation_masks(pixels, masks, alpha=_MASK_ALPHA, colors=palette)
    return draw_bounding_boxes(pixels, boxes, labels=names, colors=color, width=2)


def save_image_grid(images: list[Tensor], path: Path, columns: int = 4, gap: int = 4) -> None:
    """Tile ``uint8 [3, H_i, W_i]`` images of different sizes into one PNG."""
    cell_h = max(i.shape[1] for i in images)
    cell_w = max(i.shape[2] for i in images)
    rows = math.ceil(len(images) / columns)
    columns = min(columns, len(images))
    canvas = Image.new("RGB", (columns * (cell_w + gap) - gap, rows * (cell_h + gap) - gap), "white")
    for k, tile in enumerate(images):
        r, c = divmod(k, columns)
        canvas.paste(Image.fromarray(tile.permute(1, 2, 0).numpy()), (c * (cell_w + gap), r * (cell_h + gap)))
    canvas.save(path)


def plot_val_detections(model: FasterRCNN, val_set, categories, device, out_path: Path, count: int = 8) -> None:
    samples = [val_set[i] for i in range(min(count, len(val_set)))]
    images = [sample[0] for sample in samples if sample is not None]  # None: an unreadable image, skipped
    if not images:
        return
    with torch.no_grad():
        outputs = model([image.to(device) for image in images])
    save_image_grid([draw_detections(i, o, categories) for i, o in zip(images, outputs, strict=True)], out_path)


def _central_anchors(anchors: Tensor, levels: list[Tensor], per_position: int, centre: Tensor) -> Tensor:
    """Per level, the ``per_position`` anchors of the feature position whose anchors' centre is nearest
    ``centre`` (x, y); ``anchors [A, 4]`` level after level, as ``ops.grid_anchors`` lays them out."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    distance = (centres - centre).abs().sum(-1)
    central, start = [], 0
    for feature in levels:
        count = feature.shape[-2] * feature.shape[-1] * per_position
        nearest = start + int(distance[start : start + count].argmin()) // per_position * per_position
        central.append(anchors[nearest : nearest + per_position])
        start += count
    return torch.cat(central)


def _proposals_before_and_after_nms(
    model: FasterRCNN, levels: list[Tensor], anchors: Tensor, image_sizes: Tensor, top: int
) -> tuple[Tensor, Tensor]:
    """The RPN's proposals for one image, the first ``top`` of each stage of
    :meth:`RegionProposalNetwork.proposal_stages`: before NMS (the per-level candidates by
    decreasing objectness) and after it; ``[<= top, 4]`` each, in the resized image's pixels.
    ``levels``: the backbone's feature maps, ``anchors [A, 4]`` over every level."""
    objectness, deltas = model.rpn.head(levels)
    stages = model.rpn.proposal_stages(objectness, deltas, image_sizes, anchors)
    before = stages.before_nms[0, : min(int(stages.num_before_nms[0]), top)]
    return before, stages.after_nms[0, : min(int(stages.num_after_nms[0]), top)]


@torch.no_grad()
def pipeline_stages(model: FasterRCNN, image: Tensor, top: int = 30) -> dict[str, Tensor]:
    """Boxes of each stage of the detector on ``image`` ``[3, H, W]``, in its pixels (``[N, 4]`` each):

    ``anchors``: every anchor of every level at the feature position nearest the image centre;
    ``before_nms``: the ``top`` RPN candidates of highest objectness (decoded, clipped, per-level top-k);
    ``after_nms``: the first ``top`` proposals (:meth:`RegionProposalNetwork.proposals`: per-level NMS);
    ``detections``: the final boxes (with ``scores`` and ``labels``).
    """
    model.eval()
    image_list, _ = model.transform([image])
    padded = convolution_layout(image_list.tensors)
    height, width = image_list.image_sizes[0]
    levels = list(backbone_features(model.backbone, padded).values())  # as the model runs it
    strides = feature_strides(levels, tuple(padded.shape[-2:]))
    anchors = ops.grid_anchors(
        [tuple(f.shape[-2:]) for f in levels], strides, model.config.anchors.sizes,
        model.config.anchors.aspect_ratios, device=padded.device,
    )  # fmt: skip
    image_sizes = torch.tensor([[height, width]], device=padded.device)
    centre = torch.tensor([width / 2, height / 2], device=padded.device)
    central = _central_anchors(anchors, levels, model.config.anchors.num_anchors(), centre)
    before, after = _proposals_before_and_after_nms(model, levels, anchors, image_sizes, top)
    to_original = tuple(image.shape[-2:])
    stages = {
        name: resize_boxes(boxes.float(), (height, width), to_original).cpu()
        for name, boxes in (("anchors", central), ("before_nms", before), ("after_nms", after))
    }
    detections = model([image])[0]
    stages.update({k: v.cpu() for k, v in detections.items()})
    stages["detections"] = stages.pop("boxes")
    return stages


def _panel(image: Tensor, boxes: Tensor, title: str, color: str, labels: list[str] | None = None) -> Tensor:
    pixels = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    drawn = draw_bounding_boxes(pixels, boxes, labels=labels, colors=color, width=1)
    canvas = Image.fromarray(drawn.permute(1, 2, 0).numpy())
    ImageDraw.Draw(canvas).text((4, 2), title, fill="white", stroke_width=2, stroke_fill="black")
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def predict_image(
    checkpoint_path: str | os.PathLike,
    image_path: str | os.PathLike,
    out_path: str | os.PathLike,
    score_thresh: float = 0.5,
    device: str | None = None,
    stages: bool = False,
) -> dict:
    """Detect objects in one image file and write it with boxes, labels and scores drawn to ``out_path``.

    ``stages``: a 2x2 grid instead - the anchors at one position, the top RPN proposals before and
    after NMS, and the final detections (:func:`pipeline_stages`).

    Raises :class:`~.data.errors.InputError` naming the file for an unreadable checkpoint or image, or an
    ``out_path`` whose folder is missing or whose extension names no image format."""
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise InputError(f"{out_path}: its folder {out_path.parent} does not exist")
    if out_path.suffix.lower() not in Image.registered_extensions():
        raise InputError(f"{out_path}: the extension names no image format PIL writes (e.g. .png, .jpg)")
    device = resolve_device(device)
    model, checkpoint = load_checkpoint(checkpoint_path, device)
    image = read_image(image_path)
    categories = checkpoint["categories"]
    if not stages:
        with torch.no_grad():
            prediction = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
        drawn = draw_detections(image, prediction, categories, score_thresh)
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(out_path)
        return prediction
    boxes = pipeline_stages(model, image.to(device))
    final = {"boxes": boxes["detections"], "scores": boxes["scores"], "labels": boxes["labels"]}
    panels = [
        _panel(image, boxes["anchors"], "1. anchors at the centre position, every level", "yellow"),
        _panel(image, boxes["before_nms"], "2. top RPN proposals before NMS", "cyan"),
        _panel(image, boxes["after_nms"], "3. top RPN proposals after NMS", "lime"),
        _panel(
            draw_detections(image, final, categories, score_thresh).float() / 255,
            final["boxes"][:0],
            "4. detections",
            "red",
        ),
    ]
    save_image_grid(panels, Path(out_path), columns=2)
    return final
