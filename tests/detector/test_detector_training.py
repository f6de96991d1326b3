"""The lean Faster R-CNN in training: torchvision's losses (deterministic sampling), the same step
on both backends, empty and bad targets, bf16 autocast, the paper's loss option, crop-pool joint
training. Interpreter-sized (the ``tiny`` configuration)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.detector.test_detector import tiny_images
from tritondet import _backend
from tritondet.bench.inputs import torchvision_twin
from tritondet.detector import LOSS_NAMES, FasterRCNN, paper_vgg16, tiny
from tritondet.detector.backbone import feature_strides

# Every candidate sampled, so that torchvision's random sampler and ours pick the same sets: all
# anchors of a tiny image (< 4096) and all proposals + ground truth (32 + 3 <= 64), at fraction 1.
DETERMINISTIC = dict(
    rpn=dict(batch_size_per_image=4096, positive_fraction=1.0),
    roi_heads=dict(batch_size_per_image=64, positive_fraction=1.0),
)


def tiny_targets() -> list[dict[str, torch.Tensor]]:
    """Ground truth for :func:`tiny_images` (original image coordinates); the last image has none."""
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 78.0, 40.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[10.0, 12.0, 30.0, 66.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},
    ]


def _step(model, images, targets, generator=None):
    model.zero_grad()
    losses = model(images, targets, generator=generator) if generator is not None else model(images, targets)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def test_losses_and_gradients_match_torchvision_when_sampling_is_deterministic(backend):
    theirs = torchvision_twin(**DETERMINISTIC).train()
    ours = FasterRCNN.from_torchvision(theirs).train()
    images, targets = tiny_images(), tiny_targets()
    expected, expected_grads = _step(theirs, images, targets)
    actual, actual_grads = _step(ours, images, targets)
    assert set(actual) == set(LOSS_NAMES) == set(expected)
    for name in LOSS_NAMES:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert set(actual_grads) == set(expected_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_one_training_step_is_the_same_on_both_backends(monkeypatch):
    images, targets = tiny_images(), tiny_targets()
    results = []
    for backend in ("reference", "triton"):
        monkeypatch.setenv(_backend.BACKEND_VARIABLE, backend)
        torch.manual_seed(0)
        model = FasterRCNN(tiny()).train()
        results.append(_step(model, images, targets, generator=torch.Generator().manual_seed(5)))
    (reference, reference_grads), (triton, triton_grads) = results
    for name in LOSS_NAMES:
        torch.testing.assert_close(triton[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    assert set(triton_grads) == set(reference_grads)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(triton_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_images_without_ground_truth_train(backend):
    model = FasterRCNN(tiny()).train()
    images = tiny_images()[:2]
    empty = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}] * 2
    losses, grads = _step(model, images, empty)
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert losses["loss_rpn_box_reg"] == 0 and losses["loss_box_reg"] == 0
    assert losses["loss_objectness"] > 0 and losses["loss_classifier"] > 0
    assert grads  # the background terms still train


def test_losses_are_reproducible_with_a_generator():
    torch.manual_seed(0)
    model = FasterRCNN(tiny()).train()
    images, targets = tiny_images(), tiny_targets()
    first, _ = _step(model, images, targets, torch.Generator().manual_seed(1))
    again, _ = _step(model, images, targets, torch.Generator().manual_seed(1))
    assert first == again


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ([{"labels": torch.tensor([1])}], r"targets\[0\] is missing the field 'boxes'"),
        ([{"boxes": torch.tensor([[0.0, 0, 5, 5]])}], r"targets\[0\] is missing the field 'labels'"),
        (
            [{"boxes": torch.tensor([[0.0, 0, 5, 5], [6.0, 2, 4, 9]]), "labels": torch.tensor([1, 2])}],
            r"targets\[0\]\['boxes'\]\[1\] = \[6.0, 2.0, 4.0, 9.0\] is invalid: boxes need x2 > x1",
        ),
        (
            [{"boxes": torch.tensor([[0.0, 5, 5, 5]]), "labels": torch.tensor([1])}],
            r"targets\[0\]\['boxes'\]\[0\].*y2 > y1",
        ),
        (
            [{"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([4])}],
            r"targets\[0\]\['labels'\]\[0\] = 4 is out of range: labels must be in \[1, 4\)",
        ),
        (
            [{"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([0])}],
            r"targets\[0\]\['labels'\]\[0\] = 0 is out of range",
        ),
        (
            [{"boxes": torch.tensor([0.0, 0, 5, 5]), "labels": torch.tensor([1])}],
            r"targets\[0\]\['boxes'\] must be a floating Tensor\[G, 4\]",
        ),
        (
            [{"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([1.0])}],
            r"targets\[0\]\['labels'\] must be an integer Tensor\[G\]",
        ),
        ([], r"targets has 0 entries for 1 images"),
    ],
)
def test_bad_targets_raise_value_error_naming_the_image_and_field(targets, message):
    model = FasterRCNN(tiny()).train()
    with pytest.raises(ValueError, match=message):
        model([torch.rand(3, 64, 64)], targets)


def test_second_image_is_named():
    model = FasterRCNN(tiny()).train()
    targets = tiny_targets()[:2]
    targets[1] = {"boxes": torch.tensor([[5.0, 5, 1, 9]]), "labels": torch.tensor([1])}
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\]\[0\]"):
        model(tiny_images()[:2], targets)
    with pytest.raises(ValueError, match="targets must be given"):
        model(tiny_images()[:2])


def test_bf16_autocast_trains_and_detects_with_fp32_boxes(backend):
    torch.manual_seed(0)
    model = FasterRCNN(tiny()).train()
    images, targets = tiny_images(), tiny_targets()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(v.dtype == torch.float32 and math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = model(images)
    assert all(d["boxes"].dtype == torch.float32 for d in detections)


def test_paper_loss_normalization():
    """Eqn. (1): lambda / N_reg with N_reg the anchor locations, smooth-L1 with beta 1."""
    images, targets = tiny_images(), tiny_targets()
    losses = {}
    for loss in ("torchvision", "paper"):
        config = tiny().replace(rpn=dict(loss=loss, smooth_l1_beta=1.0))
        torch.manual_seed(0)
        model = FasterRCNN(config).train()
        losses[loss] = model(images, targets, generator=torch.Generator().manual_seed(3))
        if loss == "paper":
            image_list, _ = model.transform(images, None)
            levels = list(model.backbone(image_list.tensors).values())
            locations = len(images) * sum(f.shape[-2] * f.shape[-1] for f in levels)
    sampled = len(images) * tiny().rpn.batch_size_per_image  # plenty of negatives: every slot filled
    torch.testing.assert_close(
        losses["paper"]["loss_rpn_box_reg"], losses["torchvision"]["loss_rpn_box_reg"] * 10.0 * sampled / locations
    )
    torch.testing.assert_close(losses["paper"]["loss_objectness"], losses["torchvision"]["loss_objectness"])


def test_differentiable_proposals_equal_the_fused_ones(backend):
    torch.manual_seed(0)
    model = FasterRCNN(tiny()).train()
    with torch.no_grad():
        for parameter in model.rpn.head.parameters():
            parameter.normal_(std=0.3)
    image_list, _ = model.transform(tiny_images(), None)
    sizes = torch.tensor(image_list.image_sizes)
    levels = list(model.backbone(image_list.tensors).values())
    objectness, deltas = model.rpn.head(levels)
    strides = feature_strides(levels, tuple(image_list.tensors.shape[-2:]))
    anchors = model._anchors(levels, strides)
    boxes, num_valid = model.rpn.proposals(objectness, deltas, sizes, strides)
    joint, joint_valid = model.rpn.differentiable_proposals(objectness, deltas, sizes, anchors)
    torch.testing.assert_close(joint_valid, num_valid)
    torch.testing.assert_close(joint.detach(), boxes, rtol=1e-5, atol=1e-4)
    joint.sum().backward()
    assert model.rpn.head.bbox_pred.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("pooling", "backend"), [("roi_align", "reference"), ("crop_pool", "reference"), ("crop_pool", "triton")]
)
def test_crop_pool_sends_the_box_head_loss_into_the_rpn_boxes(pooling, backend, monkeypatch):
    """Joint training (Section 3.2 (iii)): with crop_pool the box-head losses reach the RPN's box
    regressor through the proposal coordinates; with RoIAlign they do not (approximate joint)."""
    monkeypatch.setenv(_backend.BACKEND_VARIABLE, backend)
    config = tiny().replace(roi_heads=dict(box_pooling=pooling, featmap_names=("0",)))
    torch.manual_seed(0)
    model = FasterRCNN(config).train()
    losses = model(tiny_images(), tiny_targets(), generator=torch.Generator().manual_seed(0))
    (losses["loss_classifier"] + losses["loss_box_reg"]).backward()
    grad = model.rpn.head.bbox_pred.weight.grad
    if pooling == "crop_pool":
        assert grad is not None and grad.abs().sum() > 0
    else:
        assert grad is None or not grad.any()


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.slow)])
def test_paper_single_level_model_with_roi_pool_trains_and_detects(backend, monkeypatch):
    """The paper's single-level model (9 anchors at stride 16, 7x7 RoI max pooling, 128-RoI
    sampling with background IoU in [0.1, 0.5)) on a ResNet-18 C4 at test size (256 channels:
    ~90 s in the interpreter, hence slow there)."""
    monkeypatch.setenv(_backend.BACKEND_VARIABLE, backend)
    config = paper_vgg16(num_classes=4).replace(
        transform=dict(min_size=96, max_size=128),
        backbone=dict(name="resnet18", trainable_layers=3),
        rpn=dict(pre_nms_top_n=(64, 32), post_nms_top_n=(32, 16), batch_size_per_image=32),
        roi_heads=dict(representation_size=32, batch_size_per_image=16),
    )
    assert config.roi_heads.box_pooling == "roi_pool" and config.anchors.num_anchors() == 9
    torch.manual_seed(0)
    model = FasterRCNN(config).train()
    losses, grads = _step(model, tiny_images(), tiny_targets(), torch.Generator().manual_seed(0))
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert any(name.startswith("backbone.") for name in grads) and "roi_heads.box_head.fc6.weight" in grads
    model.eval()
    with torch.no_grad():
        detections = model(tiny_images())
    assert all(d["boxes"].shape[1] == 4 for d in detections)
