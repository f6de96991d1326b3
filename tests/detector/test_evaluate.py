"""COCO box evaluation: perfect, shifted, empty and mislabelled predictions; per-class AP; the table."""

import math
import multiprocessing

import pytest
import torch
import torch.distributed as dist

from tritondet.detector.config import TransformConfig
from tritondet.detector.data import (
    CocoDetection,
    ensure_synthetic_dataset,
    make_data_loader,
    resize_boxes,
)
from tritondet.detector.data.coco import make_coco
from tritondet.detector.evaluate import (
    SUMMARY_KEYS,
    evaluate_coco,
    evaluate_model,
    format_coco_table,
    gather_predictions,
    predict,
    predictions_to_coco_results,
)
from tritondet.detector.faster_rcnn import build_transform

# Non-contiguous category ids, to exercise the label -> category id mapping; "zebra" has no instance.
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "zebra"}]
LABEL_TO_CATEGORY_ID = {1: 3, 2: 7, 3: 11}
# (image id, category id, xyxy): small (< 32²), medium and large (> 96²) objects.
OBJECTS = [
    (1, 3, (10, 10, 30, 30)),
    (1, 7, (40, 50, 100, 140)),
    (1, 3, (200, 100, 380, 290)),
    (2, 7, (5, 5, 25, 20)),
    (2, 7, (100, 20, 160, 60)),
    (3, 3, (50, 60, 250, 200)),
]


@pytest.fixture(scope="module")
def ground_truth():
    annotations = []
    for ann_id, (image_id, category_id, (x1, y1, x2, y2)) in enumerate(OBJECTS, start=1):
        w, h = x2 - x1, y2 - y1
        annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [x1, y1, w, h],
                "area": w * h,
                "iscrowd": 0,
            }
        )
    images = [{"id": i, "file_name": f"{i}.png", "width": 400, "height": 300} for i in (1, 2, 3)]
    return make_coco({"images": images, "annotations": annotations, "categories": CATEGORIES})


def perfect_predictions(shift=0.0):
    predictions = []
    category_to_label = {c: label for label, c in LABEL_TO_CATEGORY_ID.items()}
    for image_id in (1, 2, 3):
        objects = [o for o in OBJECTS if o[0] == image_id]
        predictions.append(
            {
                "image_id": image_id,
                "boxes": torch.tensor([o[2] for o in objects], dtype=torch.float32) + shift,
                "scores": torch.linspace(0.9, 0.5, len(objects)),
                "labels": torch.tensor([category_to_label[o[1]] for o in objects]),
            }
        )
    return predictions


def test_perfect_predictions_give_ap_one(ground_truth):
    results = evaluate_coco(ground_truth, perfect_predictions(), LABEL_TO_CATEGORY_ID)
    for key in (*SUMMARY_KEYS, "AR100"):
        assert results[key] == pytest.approx(1.0), key
    assert list(results["per_class_AP"]) == ["cat", "dog", "zebra"]  # the categories, in id order
    assert results["per_class_AP"]["cat"] == pytest.approx(1.0)
    assert results["per_class_AP"]["dog"] == pytest.approx(1.0)
    assert math.isnan(results["per_class_AP"]["zebra"])  # no ground truth: nothing to measure


def test_shifted_boxes_lower_ap(ground_truth):
    perfect = evaluate_coco(ground_truth, perfect_predictions(), LABEL_TO_CATEGORY_ID)
    slightly = evaluate_coco(ground_truth, perfect_predictions(shift=3.0), LABEL_TO_CATEGORY_ID)
    far = evaluate_coco(ground_truth, perfect_predictions(shift=40.0), LABEL_TO_CATEGORY_ID)
    assert far["AP"] < slightly["AP"] < perfect["AP"]
    assert slightly["APs"] < slightly["APl"]  # a 3-pixel shift hurts small boxes most
    assert far["AP50"] < 1.0


def test_empty_predictions_give_zero(ground_truth):
    for predictions in ([], [{"image_id": 1, "boxes": torch.zeros(0, 4), "scores": [], "labels": []}]):
        results = evaluate_coco(ground_truth, predictions, LABEL_TO_CATEGORY_ID)
        for key in (*SUMMARY_KEYS, "AR100"):
            assert results[key] == 0.0, key
        assert results["per_class_AP"]["cat"] == results["per_class_AP"]["dog"] == 0.0
        assert math.isnan(results["per_class_AP"]["zebra"])


def test_labels_map_to_category_ids(ground_truth):
    swapped = {1: 7, 2: 3, 3: 11}  # cats reported as dogs and the other way round
    assert evaluate_coco(ground_truth, perfect_predictions(), swapped)["AP"] == 0.0
    as_category_ids = [
        {**p, "labels": torch.tensor([LABEL_TO_CATEGORY_ID[int(x)] for x in p["labels"]])}
        for p in perfect_predictions()
    ]
    assert evaluate_coco(ground_truth, as_category_ids)["AP"] == pytest.approx(1.0)


def test_missing_images_count_as_no_detections_unless_left_out(ground_truth):
    only_first = perfect_predictions()[:1]
    everywhere = evaluate_coco(ground_truth, only_first, LABEL_TO_CATEGORY_ID)
    assert everywhere["AP"] < 1.0
    subset = evaluate_coco(ground_truth, only_first, LABEL_TO_CATEGORY_ID, image_ids=[1])
    assert subset["AP"] == pytest.approx(1.0)


def test_duplicate_images_keep_their_first_entry(ground_truth):
    predictions = perfect_predictions()
    wrong = {**predictions[0], "boxes": predictions[0]["boxes"] + 50}
    results = evaluate_coco(ground_truth, [*predictions, wrong], LABEL_TO_CATEGORY_ID)
    assert results["AP"] == pytest.approx(1.0)


def test_bad_predictions_raise(ground_truth):
    with pytest.raises(ValueError, match="image ids"):
        evaluate_coco(ground_truth, [{**perfect_predictions()[0], "image_id": 99}], LABEL_TO_CATEGORY_ID)
    with pytest.raises(ValueError, match="differ in length"):
        predictions_to_coco_results([{"image_id": 1, "boxes": torch.zeros(2, 4), "scores": [1.0], "labels": [1, 1]}])
    with pytest.raises(ValueError, match="lacks"):
        predictions_to_coco_results([{"image_id": 1, "boxes": torch.zeros(2, 4)}])
    with pytest.raises(ValueError, match="label 9 has no category id"):
        predictions_to_coco_results([{"image_id": 1, "boxes": torch.zeros(1, 4), "scores": [1], "labels": [9]}], {1: 3})


def test_coco_results_are_xywh():
    (record,) = predictions_to_coco_results(
        [{"image_id": 4, "boxes": torch.tensor([[1.0, 2.0, 11.0, 7.0]]), "scores": torch.tensor([0.5]), "labels": [2]}],
        {2: 7},
    )
    assert record == {"image_id": 4, "category_id": 7, "bbox": [1.0, 2.0, 10.0, 5.0], "score": 0.5}


def test_table_lists_summary_and_classes(ground_truth):
    table = format_coco_table(evaluate_coco(ground_truth, perfect_predictions(shift=3.0), LABEL_TO_CATEGORY_ID))
    lines = table.splitlines()
    assert lines[1].split() == [*SUMMARY_KEYS, "AR100"]
    assert len(lines[3].split()) == 7
    assert any(line.split()[:1] == ["cat"] for line in lines)
    assert any(line.split() == ["zebra", "-"] for line in lines)


def resize_as_the_model(min_size: int, max_size: int):
    """A data set transform resizing image and boxes as the detector's transform does: predictions on
    these images must be mapped back to the files' pixels (``orig_size``) for evaluation."""
    resize = build_transform(TransformConfig(min_size=min_size, max_size=max_size)).eval().resize

    def transform(image, target):
        image, resized = resize(image, {"boxes": target["boxes"]})
        return image, {**target, "boxes": resized["boxes"]}

    return transform


def test_synthetic_val_targets_mapped_back_score_ap_one(tmp_path):
    """End to end: the targets of resized images, mapped back to the files' pixels, score AP 1."""
    paths = ensure_synthetic_dataset(tmp_path, image_size=40, num_train=0, num_val=4)
    dataset = CocoDetection(paths.val_images, paths.val_annotations, transforms=resize_as_the_model(64, 90))
    predictions = []
    for image, target in (dataset[i] for i in range(len(dataset))):
        assert min(image.shape[1:]) == 64
        boxes = resize_boxes(target["boxes"], image.shape[1:], target["orig_size"])
        scores = torch.ones(len(boxes))
        predictions.append(
            {"image_id": target["image_id"], "boxes": boxes, "scores": scores, "labels": target["labels"]}
        )
    results = evaluate_coco(dataset.coco, predictions, dataset.label_to_category_id)
    assert results["AP"] == pytest.approx(1.0)
    assert set(results["per_class_AP"]) == set(dataset.categories[1:])


class WholeImageModel(torch.nn.Module):
    """Predicts one box, the whole image, with label 1 (a stand-in for the detector's interface)."""

    def forward(self, images):
        assert not self.training
        return [
            {
                "boxes": torch.tensor([[0.0, 0.0, image.shape[-1], image.shape[-2]]]),
                "scores": torch.tensor([0.9]),
                "labels": torch.tensor([1]),
            }
            for image in images
        ]


@pytest.fixture(scope="module")
def resized_val(tmp_path_factory):
    paths = ensure_synthetic_dataset(tmp_path_factory.mktemp("val"), image_size=40, num_train=0, num_val=5)
    return CocoDetection(paths.val_images, paths.val_annotations, transforms=resize_as_the_model(64, 90))


def test_predict_maps_boxes_to_the_image_files(resized_val):
    model = WholeImageModel().train()
    predictions = predict(model, make_data_loader(resized_val, batch_size=2, shuffle=False))
    assert model.training, "the model's mode is restored"
    assert [p["image_id"] for p in predictions] == resized_val.image_ids
    for prediction in predictions:
        info = resized_val.coco.imgs[prediction["image_id"]]
        torch.testing.assert_close(prediction["boxes"], torch.tensor([[0.0, 0.0, info["width"], info["height"]]]))


def test_evaluate_model_scores_the_predicted_images(resized_val, tmp_path):
    loader = make_data_loader(torch.utils.data.Subset(resized_val, [0, 1]), batch_size=2, shuffle=False)
    results = evaluate_model(WholeImageModel(), loader, resized_val.coco, resized_val.label_to_category_id)
    expected = evaluate_coco(
        resized_val.coco, predict(WholeImageModel(), loader), resized_val.label_to_category_id, [1, 2]
    )
    assert results == expected
    everything = evaluate_model(WholeImageModel(), make_data_loader(resized_val, batch_size=3, shuffle=False))
    assert set(everything["per_class_AP"]) == set(resized_val.categories[1:])


def test_gather_predictions_in_a_process_group(tmp_path):
    predictions = [{"image_id": 1, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}]
    assert gather_predictions(predictions) == predictions
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        gathered = gather_predictions(predictions)
        assert len(gathered) == 1 and gathered[0]["image_id"] == 1
    finally:
        dist.destroy_process_group()


def _gather_on_rank(rank, rendezvous, queue):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        mine = [{"image_id": 10 + rank, "boxes": torch.full((1, 4), float(rank)), "scores": [0.5], "labels": [1]}]
        queue.put((rank, [(p["image_id"], p["boxes"].tolist()) for p in gather_predictions(mine)]))
    finally:
        dist.destroy_process_group()


def test_gather_predictions_across_two_processes(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    processes = [context.Process(target=_gather_on_rank, args=(r, tmp_path / "rendezvous", queue)) for r in (0, 1)]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    expected = [(10, [[0.0] * 4]), (11, [[1.0] * 4])]
    assert results == {0: expected, 1: expected}
