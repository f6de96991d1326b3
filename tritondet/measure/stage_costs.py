"""What the post-processing stages cost on the host, ours against torchvision's, counted exactly.

Two stages (three for a Mask R-CNN), bounded the same way on both sides (everything before a stage
runs unmeasured, on the same images, through each model's own transform, backbone and heads):

- **RPN proposals**: from the RPN head's per-level outputs (objectness logits ``L x [B, A, H, W]``,
  deltas ``L x [B, 4A, H, W]``) and the image sizes to the proposals of every image. Ours:
  ``model.rpn.proposals`` (:func:`tritondet.ops.rpn_proposals`: anchors implicit, decode, clip,
  small-box and score filter, NMS per level, top P; padded ``[B, P, 4]``). torchvision's: what its
  ``RegionProposalNetwork.forward`` does between the head and the proposals at inference - anchor
  generation (``rpn.anchor_generator``), ``concat_box_prediction_layers``, ``box_coder.decode`` and
  ``rpn.filter_proposals`` (per-level top-k, then per image: clip, ``remove_small_boxes``, score
  threshold, ``batched_nms``, top P; a list of ``[P_i, 4]``). The anchors are inside the stage on
  both sides, since ours are computed inside ``rpn_proposals``.
- **RoI post-processing**: from the box predictor's outputs (class logits ``[R, K]`` and box
  regression ``[R, 4K]``) plus the proposals to the final detections in the resized images'
  coordinates. Ours: ``model.roi_heads.postprocess`` (decode, clip, softmax, filter,
  :func:`tritondet.ops.batched_nms_padded`; padded ``[B, D, ...]``). torchvision's:
  ``roi_heads.postprocess_detections`` (decode, softmax, then per image: clip, score threshold,
  ``remove_small_boxes``, ``batched_nms``, top D). Neither side's rescaling to the original image
  sizes (``transform.postprocess``) is included.
- **Mask branch** (Mask R-CNN only): from the features and the detections (boxes in the resized
  images' coordinates, labels) to every detection's mask pasted into its resized image. Ours:
  ``model.roi_heads.mask_probabilities`` (``ops.MultiScaleRoIAlign``, the mask head and predictor,
  the label's map through a sigmoid; padded ``[B, D, M, M]``) and ``model.paste_padded``
  (:func:`tritondet.ops.paste_masks_padded`, thresholded, one launch), as ``forward_padded``.
  torchvision's: what ``RoIHeads.forward`` does for masks at inference (``mask_roi_pool``,
  ``mask_head``, ``mask_predictor``, ``maskrcnn_inference``) and the ``paste_masks_in_image`` of
  ``transform.postprocess`` per image (a Python loop over the detections, with host reads of every
  box), at the resized size: as above, the boxes' rescaling is left out on both sides.

Counts (:class:`tritondet.measure.dispatch_audit.Costs`): all ATen ops (and net of the Triton
interpreter's argument copies, which a GPU launch does not make), device launches (Triton launches
plus ATen ops that launch a kernel), host syncs. They count calls, not time, so they are the same
on every machine, except that our Triton path only runs on the CPU in the Triton interpreter
(``TRITON_INTERPRET=1`` before triton is imported, and ``TRITONDET_BACKEND=triton``); otherwise our
CPU path, the PyTorch reference, is what is counted (:func:`tritondet._backend.backend_name`).

torchvision's counts grow with the batch (a Python loop over images) and depend on the data and
the device: its ``batched_nms`` runs a Python loop over the classes (levels in the RPN) - a
``unique``, then a ``where`` and an NMS per class, each a sync - when there are more than 1000 boxes
on the CPU (25000 on CUDA), and one NMS on offset boxes otherwise; empty images take shorter
paths. For ``fasterrcnn_resnet50_fpn`` on one random 480x640 image (resized by its transform to
800x1067), with the RPN head and the predictor drawn at torchvision's initial scale N(0, 0.01^2), so
that all ~4.7k pre-NMS proposals pass the filters (a trained RPN's regime) and detections above the
0.05 score threshold fall in many classes, this measures on the CPU 319 ATen ops, 14 syncs and 193
device launches in the RPN stage, and 300 ATen ops, 48 syncs and 216 device launches in the RoI
post-processing. The RoI figure moves by about 8 ops and 2 syncs per class that reaches the
per-class loop (the image decides how many do).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from torchvision.models.detection import transform
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.rpn import concat_box_prediction_layers

from ..detector.backbone import backbone_features, feature_strides
from ..detector.faster_rcnn import FasterRCNN, convolution_layout
from ..detector.mask_rcnn import MaskRCNN
from .dispatch_audit import Costs, measure_costs


@dataclasses.dataclass
class StageCosts:
    """The costs of the post-processing stages of one detector on one batch."""

    rpn: Costs  # RPN proposals: head outputs (+ anchors) -> proposals
    roi: Costs  # RoI post-processing: class logits, box regression, proposals -> detections
    mask: Costs | None = None  # mask branch: features, detections -> pasted masks (a Mask R-CNN's only)


def _check_inference(model: nn.Module, images) -> None:
    if model.training:
        raise ValueError("model must be in eval mode: the post-processing stages are inference's")
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"images must be a non-empty list of [3, H, W] tensors, got {type(images).__name__}")


def post_processing_costs(model: FasterRCNN, images: list[Tensor]) -> StageCosts:
    """The costs of our ``model``'s RPN proposal stage, RoI post-processing and, for a
    :class:`~tritondet.detector.MaskRCNN`, mask branch on ``images`` (a
    list of ``[3, H, W]`` tensors, resized and batched by ``model.transform`` as ``model(images)``
    does). On the backend ops choose for the images' device (:mod:`tritondet._backend`)."""
    _check_inference(model, images)
    with torch.no_grad():
        image_list, _ = model.transform(list(images))
        padded = convolution_layout(image_list.tensors)
        shapes = [tuple(int(v) for v in size) for size in image_list.image_sizes]
        image_sizes = torch.tensor(shapes, dtype=torch.int64, device=padded.device)
        features = backbone_features(model.backbone, padded)  # as the model runs it
        levels = list(features.values())
        objectness, deltas = model.rpn.head(levels)
        strides = feature_strides(levels, tuple(padded.shape[-2:]))
        with measure_costs() as rpn:
            proposals, num_valid = model.rpn.proposals(objectness, deltas, image_sizes, strides)
        class_logits, box_regression = model.roi_heads.predict(model.roi_heads.pool(features, proposals, shapes))
        with measure_costs() as roi:
            boxes, _, labels, num_valid = model.roi_heads.postprocess(
                class_logits, box_regression, proposals, num_valid, image_sizes
            )
        mask = None
        if isinstance(model, MaskRCNN):
            with measure_costs() as mask:
                masks = model.roi_heads.mask_probabilities(features, boxes, labels, shapes)
                model.paste_padded(masks, boxes, num_valid, image_sizes, tuple(padded.shape[-2:]))
    return StageCosts(rpn, roi, mask)


def torchvision_post_processing_costs(model: nn.Module, images: list[Tensor]) -> StageCosts:
    """The same stages of a torchvision ``FasterRCNN`` (e.g. ``fasterrcnn_resnet50_fpn``) or
    ``MaskRCNN`` (the mask branch too) on ``images``, bounded as in this module's docstring."""
    _check_inference(model, images)
    rpn, heads = model.rpn, model.roi_heads
    with torch.no_grad():
        image_list, _ = model.transform(list(images))
        features = model.backbone(image_list.tensors)
        levels = list(features.values())
        objectness, deltas = rpn.head(levels)
        with measure_costs() as rpn_costs:
            # torchvision's RegionProposalNetwork.forward from the head's outputs on (inference).
            anchors = rpn.anchor_generator(image_list, levels)
            num_anchors_per_level = [o[0].numel() for o in objectness]
            flat_objectness, flat_deltas = concat_box_prediction_layers(objectness, deltas)
            boxes = rpn.box_coder.decode(flat_deltas.detach(), anchors).view(len(anchors), -1, 4)
            proposals, _ = rpn.filter_proposals(boxes, flat_objectness, image_list.image_sizes, num_anchors_per_level)
        pooled = heads.box_roi_pool(features, proposals, image_list.image_sizes)
        class_logits, box_regression = heads.box_predictor(heads.box_head(pooled))
        with measure_costs() as roi_costs:
            boxes, _, labels = heads.postprocess_detections(
                class_logits, box_regression, proposals, image_list.image_sizes
            )
        mask_costs = None
        if heads.has_mask():
            with measure_costs() as mask_costs:
                # RoIHeads.forward's mask branch at inference, then transform.postprocess's pasting.
                pooled = heads.mask_roi_pool(features, boxes, image_list.image_sizes)
                masks = maskrcnn_inference(heads.mask_predictor(heads.mask_head(pooled)), labels)
                for image_masks, image_boxes, size in zip(masks, boxes, image_list.image_sizes, strict=True):
                    transform.paste_masks_in_image(image_masks, image_boxes, size)
    return StageCosts(rpn_costs, roi_costs, mask_costs)
