"""COCO box and mask evaluation (pycocotools' ``COCOeval``) of a detector's predictions, and the AP table.

Shape shorthand: D detections in an image, K object classes (labels 1..K).

Predictions are one dict per image, as the detector returns them, plus the image id:
``{"image_id": int, "boxes": Tensor[D, 4] (x1, y1, x2, y2), "scores": Tensor[D], "labels": Tensor[D] int}``,
with boxes in the pixels of the *original* image (the ground truth's): map boxes predicted on a
resized image back with ``tritondet.detector.data.resize_boxes(boxes, image.shape[-2:], target["orig_size"])``.
Labels are mapped to the ground truth's category ids with ``label_to_category_id`` (the dataset's).
A Mask R-CNN's predictions also carry ``"segmentation"``: one COCO RLE per detection (its mask
probability > 0.5 at the original image's size, :func:`encode_masks`); they are then evaluated with
``iouType="segm"`` too.

The metrics are COCO's: AP is the mean over IoU thresholds 0.50:0.05:0.95 of the 101-point
interpolated precision, AP50/AP75 at one threshold, APs/APm/APl for ground truth areas below 32²,
between 32² and 96², and above 96² pixels; up to 100 detections per image.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .data import CocoDetection, make_data_loader, resize_boxes
from .data.errors import InputError
from .engine.checkpoints import load_checkpoint
from .engine.train_config import TrainConfig, dataset_paths, resolve_device

__all__ = [
    "SUMMARY_KEYS",
    "encode_masks",
    "evaluate_checkpoint",
    "evaluate_coco",
    "evaluate_model",
    "format_coco_table",
    "gather_predictions",
    "predict",
    "predictions_to_coco_results",
]

# Names for COCOeval.stats[0:6] and [8] (bbox), in COCOeval's order.
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_AR100_INDEX = 8
# Mask R-CNN's binarization of the predicted mask probabilities (torchvision's reference evaluation).
MASK_THRESHOLD = 0.5


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """``masks [D, 1, H, W]`` probabilities -> D COCO RLEs of ``masks > MASK_THRESHOLD`` (``counts`` as str)."""
    binary = (masks[:, 0] > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
    rles = coco_mask.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    return [{"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")} for rle in rles]


def predictions_to_coco_results(
    predictions: Iterable[Mapping], label_to_category_id: Mapping[int, int] | None = None
) -> list[dict]:
    """Per-image predictions -> COCO result records ``{"image_id", "category_id", "bbox" (xywh), "score"}``
    (and ``"segmentation"`` when the predictions carry it)."""
    results = []
    for prediction in predictions:
        missing = {"image_id", "boxes", "scores", "labels"} - set(prediction)
        if missing:
            raise ValueError(f"predictions: an entry lacks {sorted(missing)}")
        image_id = int(prediction["image_id"])
        boxes = torch.as_tensor(prediction["boxes"], dtype=torch.float64).detach().cpu().reshape(-1, 4)
        scores = torch.as_tensor(prediction["scores"]).detach().cpu().reshape(-1).tolist()
        labels = torch.as_tensor(prediction["labels"]).detach().cpu().reshape(-1).tolist()
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f"predictions for image {image_id}: boxes, scores and labels differ in length "
                f"({len(boxes)}, {len(scores)}, {len(labels)})"
            )
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        segmentations = prediction.get("segmentation")
        if segmentations is not None and len(segmentations) != len(scores):
            raise ValueError(
                f"predictions for image {image_id}: {len(segmentations)} segmentations for {len(scores)} boxes"
            )
        for k, (box, score, label) in enumerate(zip(xywh, scores, labels, strict=True)):
            if label_to_category_id is not None:
                if int(label) not in label_to_category_id:
                    raise ValueError(f"predictions for image {image_id}: label {label} has no category id")
                category_id = label_to_category_id[int(label)]
            else:
                category_id = int(label)
            result = {"image_id": image_id, "category_id": category_id, "bbox": box, "score": float(score)}
            if segmentations is not None:
                result["segmentation"] = segmentations[k]
            results.append(result)
    return results


def evaluate_coco(
    coco_gt: COCO,
    predictions: Iterable[Mapping],
    label_to_category_id: Mapping[int, int] | None = None,
    image_ids: Sequence[int] | None = None,
    verbose: bool = False,
) -> dict:
    """COCO box AP (and mask AP, for predictions with ``segmentation``) of ``predictions`` against
    ``coco_gt`` (e.g. ``dataset.coco``).

    Args:
        coco_gt: the ground truth.
        predictions: one dict per image (see the module docstring); images without an entry count
            as having no detections. Duplicate image ids (e.g. from a padded ``DistributedSampler``)
            keep their first entry.
        label_to_category_id: label -> category id (``dataset.label_to_category_id``); ``None``
            when labels already are category ids.
        image_ids: evaluate these images only (default: every image in ``coco_gt``).
        verbose: print COCOeval's own summary.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100": float, "per_class_AP": {name: float}}``
        for the boxes, with ``"segm"``: the same dict for the masks when the predictions have them. A value is ``nan`` where the ground truth has nothing to measure (e.g. no small objects, or
        no instance of a class), as COCOeval's -1.
    """
    unique, seen = [], set()
    for prediction in predictions:
        image_id = int(prediction["image_id"])
        if image_id not in seen:
            seen.add(image_id)
            unique.append(prediction)
    unknown = seen - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"predictions: image ids {sorted(unknown)[:10]} are not in the ground truth")
    results = predictions_to_coco_results(unique, label_to_category_id)
    category_ids = sorted(coco_gt.getCatIds())
    image_ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    if not image_ids or not category_ids:
        raise ValueError("coco_gt: the ground truth has no images or no categories to evaluate")
    # One result list per IoU type, as torchvision's reference evaluation: a segm result's area is its mask's.
    box_results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    summary = _summarize(coco_gt, box_results, "bbox", image_ids, verbose)
    if any("segmentation" in prediction for prediction in unique):
        segm_results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        summary["segm"] = _summarize(coco_gt, segm_results, "segm", image_ids, verbose)
    return summary


def _summarize(coco_gt: COCO, results: list[dict], iou_type: str, image_ids: list[int], verbose: bool) -> dict:
    """COCOeval of ``results`` with ``iou_type`` ("bbox" or "segm"): the summary dict of :func:`evaluate_coco`."""
    category_ids = sorted(coco_gt.getCatIds())
    if not results:
        # pycocotools cannot load an empty result list: stand in one detection that overlaps nothing, so
        # every AP is 0 where there is ground truth and nan where there is none, exactly as COCOeval scores.
        stand_in = {"image_id": image_ids[0], "category_id": category_ids[0], "score": 0.0}
        if iou_type == "bbox":
            stand_in["bbox"] = [-10.0, -10.0, 1.0, 1.0]
        else:
            info = coco_gt.imgs[image_ids[0]]
            empty = np.zeros((info["height"], info["width"], 1), dtype=np.uint8, order="F")
            rle = coco_mask.encode(empty)[0]
            stand_in["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
        results = [stand_in]

    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    if verbose:
        print(output.getvalue(), end="")

    def clean(value: float) -> float:
        return math.nan if value < 0 else float(value)

    summary = {key: clean(evaluator.stats[i]) for i, key in enumerate(SUMMARY_KEYS)}
    summary["AR100"] = clean(evaluator.stats[_AR100_INDEX])
    # precision: [IoU thresholds, recall points, categories, area ranges (all first), max dets (100 last)]
    precision = evaluator.eval["precision"]
    per_class = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        per_class[coco_gt.cats[category_id]["name"]] = float(np.mean(values)) if values.size else math.nan
    summary["per_class_AP"] = per_class
    return summary


def format_coco_table(results: Mapping, title: str = "COCO box evaluation") -> str:
    """The :func:`evaluate_coco` result as a printable table: the summary row, then AP per class.

    Values are percentages with one decimal; ``-`` marks ``nan`` (nothing to measure).
    """

    def cell(value: float) -> str:
        return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"

    keys = [key for key in (*SUMMARY_KEYS, "AR100") if key in results]
    summary = [keys, [cell(results[key]) for key in keys]]
    widths = [max(len(row[i]) for row in summary) for i in range(len(keys))]
    lines = [title, "  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.append("  ".join(v.rjust(w) for v, w in zip(summary[1], widths, strict=True)))
    per_class = results.get("per_class_AP", {})
    if per_class:
        name_width = max(len("class"), *(len(name) for name in per_class))
        lines += ["", f"{'class'.ljust(name_width)}  {'AP':>5}", f"{'-' * name_width}  {'-' * 5}"]
        lines += [f"{name.ljust(name_width)}  {cell(ap):>5}" for name, ap in per_class.items()]
    return "\n".join(lines)


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Iterable, device: torch.device | str | None = None) -> list[dict]:
    """Run ``model`` over ``loader``'s ``(images, targets)`` batches; return predictions for :func:`evaluate_coco`.

    ``model(images)`` takes a list of ``Tensor[3, H, W]`` and returns one dict per image with ``boxes``
    (in the pixels of the image it was given), ``scores`` and ``labels`` (torchvision's interface).
    Boxes are mapped back to the image files' pixels with ``target["orig_size"]`` and moved to the CPU;
    masks (a Mask R-CNN's ``[D, 1, H, W]`` probabilities) are resized likewise and kept as RLEs
    (``"segmentation"``, :func:`encode_masks`). The model is put in eval mode and its mode restored
    afterwards. Batches left empty (every image unreadable, skipped by the dataset) are passed over.
    """
    was_training = model.training
    model.eval()
    predictions = []
    try:
        for images, targets in loader:
            if not images:
                continue
            if device is not None:
                images = [image.to(device, non_blocking=True) for image in images]
            outputs = model(images)
            for image, target, output in zip(images, targets, outputs, strict=True):
                size = target.get("orig_size", image.shape[-2:])
                prediction = {
                    "image_id": int(target["image_id"]),
                    "boxes": resize_boxes(output["boxes"].float(), image.shape[-2:], size).cpu(),
                    "scores": output["scores"].float().cpu(),
                    "labels": output["labels"].cpu(),
                }
                if "masks" in output:  # RLEs right away: D full-image masks per image would fill the memory
                    masks = output["masks"].float()
                    if tuple(masks.shape[-2:]) != tuple(int(v) for v in size):
                        masks = F.interpolate(masks, size=tuple(int(v) for v in size), mode="bilinear")
                    prediction["segmentation"] = encode_masks(masks)
                predictions.append(prediction)
    finally:
        model.train(was_training)
    return predictions


def gather_predictions(predictions: list[dict]) -> list[dict]:
    """All ranks' predictions on every rank (``torch.distributed``); the input itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(predictions)
    gathered: list[list[dict] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(predictions))
    return [prediction for part in gathered for prediction in part]


def evaluate_model(
    model: torch.nn.Module,
    loader: Iterable,
    coco_gt: COCO | None = None,
    label_to_category_id: Mapping[int, int] | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """:func:`predict` over ``loader``, gathered from every rank, then :func:`evaluate_coco`.

    ``coco_gt`` and ``label_to_category_id`` default to ``loader.dataset``'s. Only the images that
    were predicted (on any rank) are evaluated, so a loader over part of a data set scores that part.
    """
    dataset = getattr(loader, "dataset", None)
    coco_gt = coco_gt if coco_gt is not None else dataset.coco
    if label_to_category_id is None:
        label_to_category_id = dataset.label_to_category_id
    predictions = gather_predictions(predict(model, loader, device))
    image_ids = sorted({int(p["image_id"]) for p in predictions})
    if not image_ids:
        raise InputError(f"{getattr(dataset, 'annotation_file', 'the data set')}: no image could be read to evaluate")
    return evaluate_coco(coco_gt, predictions, label_to_category_id, image_ids=image_ids)


def evaluate_checkpoint(
    checkpoint_path: str | os.PathLike,
    val_images: str | None = None,
    val_annotations: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    on_bad: str = "skip",
) -> dict:
    """COCO AP of a training checkpoint on ``val_images``/``val_annotations`` (default: the val split
    of the data it was trained on; the synthetic set is regenerated if missing).

    ``batch_size`` defaults to the training run's: images in a batch are padded to a common size, and
    the padding changes the features near the borders slightly, so the same batch size reproduces
    the AP printed at the end of training. ``on_bad``: bad annotations and unreadable images are
    skipped with a warning, or raise (``"raise"``), as in :class:`~.data.CocoDetection`."""
    device = resolve_device(device)
    model, checkpoint = load_checkpoint(checkpoint_path, device)
    if (val_images is None) != (val_annotations is None):
        raise InputError("val_images and val_annotations must be given together")
    if val_annotations is None:
        try:
            train_config = TrainConfig(**{**checkpoint["train_config"], "resume": None})
        except TypeError as error:  # an option this version does not know
            raise InputError(
                f"{checkpoint_path}: its train_config is not this tritondet's ({error}); give --val-images and "
                "--val-annotations"
            ) from error
        _, _, val_images, val_annotations = dataset_paths(train_config)
    val_set = CocoDetection(val_images, val_annotations, on_bad=on_bad)
    batch_size = checkpoint["train_config"]["batch_size"] if batch_size is None else batch_size
    loader = make_data_loader(val_set, batch_size, shuffle=False)
    return evaluate_model(model, loader, device=device)
