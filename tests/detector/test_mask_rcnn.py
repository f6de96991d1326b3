"""Mask R-CNN on tritondet's ops: torchvision parity (random weights, eval and losses), the sync-free
padded interface and torch.compile, instance masks in the data (synthetic RLE, COCO polygons, RLE
and crowd regions), a tiny mask training run with box and mask AP.

Interpreter-sized: the ``tiny`` configuration with a mask branch (``with_masks``); torchvision's
``maskrcnn_resnet50_fpn`` at a 96-pixel short side.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pycocotools import mask as coco_mask

from tests.detector.test_detector import _padded_batch, assert_forward_padded_compiles, padded_and_listed, tiny_images
from tests.detector.test_detector_training import DETERMINISTIC, _step, tiny_targets
from tritondet import cli
from tritondet.bench.inputs import assert_same_detections, torchvision_twin
from tritondet.detector import MASK_LOSS_NAMES, MaskRCNN, resnet50_fpn_masks, tiny, with_masks
from tritondet.detector import data as detection_data
from tritondet.detector.compat import config_from_torchvision, maskrcnn_resnet50_fpn
from tritondet.detector.engine import TrainConfig, load_checkpoint, train
from tritondet.detector.evaluate import encode_masks, evaluate_coco
from tritondet.detector.visualize import draw_detections

# Mask probabilities: both sides paste 28x28 maps at boxes equal within BOX_ATOL. Our convolutions run
# channels-last on the CPU, and their rounding (~1e-6 relative) reaches the pasted probabilities as up
# to 2e-4 through the mask head's five convolutions and the maps' steepest slopes.
MASK_ATOL = 5e-4


def mask_twin(**overrides):
    """torchvision's ``MaskRCNN`` configured as ``with_masks(tiny())``, random weights; the mask
    predictor gets wider weights too (std 0.3), so that masks differ from pixel to pixel."""
    model = torchvision_twin(with_masks(tiny()), **overrides)
    with torch.no_grad():
        for parameter in model.roi_heads.mask_predictor.mask_fcn_logits.parameters():
            parameter.normal_(std=0.3)
    return model


def with_box_masks(images, targets):
    """``targets`` plus ``masks [G, H, W]`` uint8: the left half of each box, one column more."""
    out = []
    for image, target in zip(images, targets, strict=True):
        height, width = image.shape[-2:]
        masks = torch.zeros((len(target["boxes"]), height, width), dtype=torch.uint8)
        for j, (x1, y1, x2, y2) in enumerate(target["boxes"].round().int().tolist()):
            masks[j, y1:y2, x1 : (x1 + x2) // 2 + 1] = 1
        out.append({**target, "masks": masks})
    return out


def assert_same_masks(ours: list[dict], theirs: list[dict]) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a["masks"].shape == b["masks"].shape, f"image {i}"
        torch.testing.assert_close(a["masks"], b["masks"], atol=MASK_ATOL, rtol=0, msg=f"image {i} masks")


# ----------------------------------------------------------------------------------------------
# torchvision parity
# ----------------------------------------------------------------------------------------------


def test_eval_matches_torchvision_masks(backend):
    theirs = mask_twin(roi_heads=dict(score_thresh=0.0)).eval()
    ours = MaskRCNN.from_torchvision(theirs).eval()
    images = tiny_images()
    with torch.no_grad():
        expected, actual = theirs(images), ours(images)
    assert sum(len(d["boxes"]) for d in expected) > 60
    assert_same_detections(actual, expected)
    assert_same_masks(actual, expected)
    for detection, image in zip(actual, images, strict=True):
        assert detection["masks"].shape[1:] == (1, *image.shape[-2:]) and detection["masks"].dtype == torch.float32


def test_losses_and_gradients_match_torchvision(backend):
    theirs = mask_twin(**DETERMINISTIC).train()
    ours = MaskRCNN.from_torchvision(theirs).train()
    images = tiny_images()
    targets = with_box_masks(images, tiny_targets())
    expected, expected_grads = _step(theirs, images, targets)
    actual, actual_grads = _step(ours, images, targets)
    assert set(actual) == set(MASK_LOSS_NAMES) == set(expected)
    assert actual["loss_mask"] > 0
    for name in MASK_LOSS_NAMES:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert set(actual_grads) == set(expected_grads)
    assert any(name.startswith("roi_heads.mask_head.") for name in actual_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_images_without_ground_truth_give_zero_mask_loss():
    torch.manual_seed(0)
    model = MaskRCNN(with_masks(tiny())).train()
    images = tiny_images()[:2]
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    targets = [{**empty, "masks": torch.zeros((0, *image.shape[-2:]), dtype=torch.uint8)} for image in images]
    losses, _ = _step(model, images, targets)
    assert losses["loss_mask"] == 0 and all(math.isfinite(v.item()) for v in losses.values())


def test_maskrcnn_resnet50_fpn_matches_torchvision():
    torch.manual_seed(0)
    theirs = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=96, max_size=128, box_score_thresh=0.0
    ).eval()
    config = config_from_torchvision(theirs)
    expected_config = resnet50_fpn_masks(5).replace(
        transform=dict(min_size=96, max_size=128), roi_heads=dict(score_thresh=0.0)
    )
    assert dataclasses.replace(config, backbone=expected_config.backbone) == expected_config
    ours = MaskRCNN.from_torchvision(theirs).eval()
    assert set(MaskRCNN(resnet50_fpn_masks(5)).state_dict()) == {
        k for k in theirs.state_dict() if not k.endswith("num_batches_tracked")
    }
    image = torch.rand(3, 96, 120, generator=torch.Generator().manual_seed(0))
    # Ours runs its convolutions channels-last on the CPU; torchvision's model in that layout computes
    # the same floats. In NCHW the rounding differs by ~1e-6, enough to swap this untrained model's
    # tied scores (0.9749 twice in its first six detections) and so their labels' order.
    theirs = theirs.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, actual = theirs([image]), ours([image])
    assert len(expected[0]["boxes"]) > 0
    assert_same_detections(actual, expected)
    assert_same_masks(actual, expected)


def test_state_dict_loader_builds_maskrcnn_resnet50_fpn():
    theirs = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    ours = maskrcnn_resnet50_fpn(state_dict=theirs.state_dict())
    assert isinstance(ours, MaskRCNN) and ours.config.roi_heads.num_classes == 3
    torch.testing.assert_close(
        ours.roi_heads.mask_predictor.mask_fcn_logits.weight, theirs.roi_heads.mask_predictor.mask_fcn_logits.weight
    )


def test_from_torchvision_needs_a_mask_head_and_config_a_mask_section():
    with pytest.raises(ValueError, match="mask head"):
        MaskRCNN.from_torchvision(torchvision_twin())
    with pytest.raises(ValueError, match=r"config\.mask is None"):
        MaskRCNN(tiny())


# ----------------------------------------------------------------------------------------------
# The padded, sync-free interface
# ----------------------------------------------------------------------------------------------


def test_forward_padded_masks_equal_the_list_interface_without_host_sync(backend, monkeypatch):
    ours = MaskRCNN.from_torchvision(mask_twin(roi_heads=dict(score_thresh=0.0))).eval()
    sizes, expected, (*_, num_valid, masks) = padded_and_listed(ours, backend, monkeypatch)
    detections = ours.config.roi_heads.detections_per_img
    assert masks.shape == (3, detections, 64, 96) and masks.dtype == torch.bool
    for i, n in enumerate(num_valid.tolist()):
        h, w = sizes[i].tolist()
        binary = expected[i]["masks"][:, 0] > ours.config.mask.mask_threshold
        # Pixels whose probability lies within MASK_ATOL of the threshold may go either way.
        settled = (expected[i]["masks"][:, 0] - ours.config.mask.mask_threshold).abs() > MASK_ATOL
        assert torch.equal(masks[i, :n, :h, :w][settled], binary[settled])
        assert not masks[i, n:].any() and not masks[i, :, h:].any() and not masks[i, :, :, w:].any()


def test_forward_padded_masks_at_original_sizes():
    ours = MaskRCNN.from_torchvision(mask_twin(roi_heads=dict(score_thresh=0.0))).eval()
    images, sizes = _padded_batch()
    with torch.no_grad():
        boxes, *_, masks = ours.forward_padded(images, sizes)
        scaled, *_, scaled_masks = ours.forward_padded(
            images, sizes, original_image_sizes=sizes * 2, mask_size=(128, 192)
        )
    torch.testing.assert_close(scaled, boxes * 2)
    assert scaled_masks.shape[-2:] == (128, 192)
    assert scaled_masks.sum() > 3 * masks.sum()  # four times the area, up to the borders' rounding
    with pytest.raises(ValueError, match="mask_size"):
        ours.forward_padded(images, sizes, original_image_sizes=sizes * 2)


def test_forward_padded_compiles_fullgraph():
    assert_forward_padded_compiles(MaskRCNN.from_torchvision(mask_twin(roi_heads=dict(score_thresh=0.0))).eval())


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        (None, "missing the field 'masks'"),
        (torch.zeros((1, 64, 80)), r"uint8 or bool Tensor\[G, H, W\] = \[2, 64, 80\]"),
        (torch.zeros((2, 32, 80), dtype=torch.uint8), r"targets\[0\]\['masks'\] must be"),
    ],
)
def test_bad_mask_targets_raise_value_error(masks, message):
    model = MaskRCNN(with_masks(tiny())).train()
    target = dict(tiny_targets()[0])
    if masks is not None:
        target["masks"] = masks
    with pytest.raises(ValueError, match=message):
        model(tiny_images()[:1], [target])


# ----------------------------------------------------------------------------------------------
# Instance masks in the data
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    detection_data.ensure_synthetic_dataset(root, seed=0, num_train=8, num_val=4, workers=1)
    return root


def test_synthetic_masks_match_their_boxes(synthetic_root):
    paths = detection_data.ensure_synthetic_dataset(synthetic_root, seed=0, num_train=8, num_val=4, workers=1)
    dataset = detection_data.CocoDetection(paths.train_images, paths.train_annotations, masks=True)
    for index in range(len(dataset)):
        image, target = dataset[index]
        masks = target["masks"]
        assert masks.dtype == torch.uint8 and masks.shape == (len(target["boxes"]), *image.shape[-2:])
        for mask, box in zip(masks, target["boxes"], strict=True):
            rows, cols = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
            tight = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
            torch.testing.assert_close(tight, box)
    assert "masks" not in detection_data.CocoDetection(paths.train_images, paths.train_annotations)[0][1]


def test_flip_flips_the_masks():
    image = torch.rand(3, 8, 10)
    masks = torch.zeros((1, 8, 10), dtype=torch.uint8)
    masks[0, 2:5, 1:4] = 1
    target = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 5.0]]), "masks": masks}
    _, flipped = detection_data.DetectionTransform(train=True, flip_prob=1.0)(image, target)
    assert torch.equal(flipped["masks"], masks.flip(-1))
    assert flipped["boxes"].tolist() == [[6.0, 2.0, 9.0, 5.0]]


@pytest.fixture
def coco_with_segmentations(tmp_path):
    """One 20x30 image with a polygon, a compressed RLE, an uncompressed-RLE crowd region and an
    annotation without segmentation."""
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    square = np.zeros((20, 30), dtype=np.uint8)
    square[5:10, 12:20] = 1
    rle = coco_mask.encode(np.asfortranarray(square))
    crowd = np.zeros((20, 30), dtype=np.uint8)
    crowd[12:18, 2:8] = 1
    runs = [len(list(group)) for _, group in itertools.groupby(crowd.flatten(order="F"))]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 6, 4], "segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]]},
        {
            "id": 2,
            "image_id": 1,
            "category_id": 2,
            "bbox": [12, 5, 8, 5],
            "segmentation": {"size": [20, 30], "counts": rle["counts"].decode("ascii")},
        },
        {
            "id": 3,
            "image_id": 1,
            "category_id": 1,
            "bbox": [2, 12, 6, 6],
            "iscrowd": 1,
            "segmentation": {"size": [20, 30], "counts": runs},
        },
        {"id": 4, "image_id": 1, "category_id": 2, "bbox": [20, 10, 5, 5]},
    ]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return tmp_path, path, square


def test_coco_polygons_rle_and_crowd_regions(coco_with_segmentations):
    folder, path, square = coco_with_segmentations
    with pytest.warns(UserWarning, match="annotation id 4 .*no segmentation"):
        dataset = detection_data.CocoDetection(folder, path, masks=True)
    _, target = dataset[0]
    assert target["labels"].tolist() == [1, 2]  # the crowd region is not a training target
    masks = target["masks"]
    assert masks.shape == (2, 20, 30) and masks.dtype == torch.uint8
    assert masks[0, 2:6, 2:8].all() and masks[0].sum() <= 7 * 5  # the polygon, edges included by pycocotools
    assert torch.equal(masks[1], torch.from_numpy(square))
    assert {ann["id"] for ann in dataset.coco.dataset["annotations"]} == {1, 2, 3}  # crowd kept for evaluation
    with pytest.raises(ValueError, match="no segmentation"):
        detection_data.CocoDetection(folder, path, masks=True, on_bad="raise")
    # Without masks the annotation without segmentation is fine.
    assert len(detection_data.CocoDetection(folder, path)[0][1]["boxes"]) == 3


def test_segm_evaluation_of_exact_masks_is_perfect_and_ignores_crowd(coco_with_segmentations):
    folder, path, _ = coco_with_segmentations
    with pytest.warns(UserWarning, match="no segmentation"):
        dataset = detection_data.CocoDetection(folder, path, masks=True)
    _, target = dataset[0]
    masks = target["masks"][:, None].float()
    on_crowd = torch.zeros((1, 1, 20, 30))
    on_crowd[0, 0, 12:18, 2:8] = 1  # matched to the crowd region: ignored, no false positive
    prediction = {
        "image_id": 1,
        "boxes": torch.cat([target["boxes"], torch.tensor([[2.0, 12.0, 8.0, 18.0]])]),
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "labels": torch.tensor([1, 2, 1]),
        "segmentation": encode_masks(torch.cat([masks, on_crowd])),
    }
    metrics = evaluate_coco(dataset.coco, [prediction], dataset.label_to_category_id)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    shifted = dict(prediction, segmentation=encode_masks(torch.cat([masks.roll(3, -1), on_crowd])))
    assert evaluate_coco(dataset.coco, [shifted], dataset.label_to_category_id)["segm"]["AP"] < 1.0
    assert "segm" not in evaluate_coco(dataset.coco, [{k: v for k, v in prediction.items() if k != "segmentation"}])


def test_draw_detections_draws_masks():
    image = torch.zeros(3, 20, 30)
    masks = torch.zeros((1, 1, 20, 30))
    masks[0, 0, 5:10, 5:10] = 0.9
    prediction = {"boxes": torch.tensor([[5.0, 5, 10, 10]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    plain = draw_detections(image, prediction, ["bg", "a"])
    drawn = draw_detections(image, {**prediction, "masks": masks}, ["bg", "a"])
    assert (drawn[:, 7, 7] > 0).any() and not (plain[:, 7, 7] > 0).any()
    assert torch.equal(drawn[:, 15:, 15:], plain[:, 15:, 15:])


# ----------------------------------------------------------------------------------------------
# Training with masks
# ----------------------------------------------------------------------------------------------


def test_tiny_mask_training_lowers_the_loss_and_evaluates_segm(synthetic_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITONDET_BACKEND", "reference")  # the kernels have their own tests
    config = TrainConfig(
        output_dir=str(tmp_path / "run"),
        data_root=str(synthetic_root),
        num_train=8,
        num_val=4,
        model="tiny",
        masks=True,
        batch_size=2,
        iterations=12,
        lr=0.01,
        warmup_iters=2,
        checkpoint_every=12,
        log_every=1,
        evaluate=False,  # the eval command below prints both tables
        plots=False,
        progress=False,
        max_minutes=None,
    )
    train(config)
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "loss_mask" in header
    column = header.index("loss_mask")
    mask_losses = [float(row.split(",")[column]) for row in rows[1:]]
    assert sum(mask_losses[-4:]) < sum(mask_losses[:4])
    model, checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert isinstance(model, MaskRCNN) and checkpoint["model_config"]["mask"] is not None
    with torch.no_grad():
        (detection,) = model([torch.rand(3, 64, 80)])
    assert detection["masks"].shape[1:] == (1, 64, 80)
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "run" / "last.pt")]) == 0
    out = capsys.readouterr().out
    assert "COCO box evaluation" in out and "COCO mask (segm) evaluation" in out
    segm_table = out.split("COCO mask (segm) evaluation")[1].splitlines()
    assert segm_table[1].split()[:3] == ["AP", "AP50", "AP75"] and segm_table[3].split()[0] != "-"
    val_image = next((synthetic_root).glob("synthetic-*/val/*.png"))
    assert cli.main(["predict", str(val_image), "--checkpoint", str(tmp_path / "run" / "last.pt"),
                     "--out", str(tmp_path / "p.png"), "--score-thresh", "0.0"]) == 0  # fmt: skip
    assert (tmp_path / "p.png").is_file()
