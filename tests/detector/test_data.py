"""Detection data: the synthetic set's determinism and COCO validity, the COCO and VOC datasets (bad data
included), the paper's resize/flip preprocessing, and the loader."""

import json
import warnings
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from tritondet.detector import data
from tritondet.detector.config import TransformConfig
from tritondet.detector.data import (
    SYNTHETIC_CLASSES,
    CocoDetection,
    DetectionTransform,
    SyntheticConfig,
    VOCDetection,
    collate_detection,
    ensure_synthetic_dataset,
    make_data_loader,
    read_image,
    resize_boxes,
    synthetic,
)
from tritondet.detector.faster_rcnn import build_transform

TINY = {"image_size": 48, "num_train": 6, "num_val": 3}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), **TINY)


@pytest.fixture(scope="module")
def varied_set(tmp_path_factory):
    """Enough small images to see every class, tall and wide objects, and occlusion."""
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("varied"), image_size=64, num_train=40, num_val=0)


def folder_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------------
# The synthetic set
# ---------------------------------------------------------------------------------------------------------------------


def test_synthetic_set_is_byte_identical_for_a_seed(tmp_path, tiny_set):
    again = ensure_synthetic_dataset(tmp_path / "again", **TINY)
    first, second = folder_bytes(tiny_set.root), folder_bytes(again.root)
    assert tiny_set.root.name == again.root.name
    assert len(first) == TINY["num_train"] + TINY["num_val"] + 3  # images, two JSONs, the stamp
    assert first == second


def test_worker_processes_draw_the_same_bytes(tmp_path):
    config = SyntheticConfig(image_size=24, num_train=synthetic._MIN_IMAGES_PER_POOL, num_val=0)
    for workers in (0, 2):
        data.generate_synthetic_split(config, "train", tmp_path / f"{workers}", tmp_path / f"{workers}.json", workers)
    assert folder_bytes(tmp_path / "0") == folder_bytes(tmp_path / "2")
    assert (tmp_path / "0.json").read_bytes() == (tmp_path / "2.json").read_bytes()


def test_another_seed_gives_other_images(tmp_path, tiny_set):
    other = ensure_synthetic_dataset(tmp_path, seed=1, **TINY)
    assert other.root != tiny_set.root
    assert other.train_annotations.read_bytes() != tiny_set.train_annotations.read_bytes()
    assert (other.train_images / "000000.png").read_bytes() != (tiny_set.train_images / "000000.png").read_bytes()


def test_train_and_val_differ_and_images_do_not_depend_on_counts(tmp_path, tiny_set):
    assert (tiny_set.train_images / "000000.png").read_bytes() != (tiny_set.val_images / "000000.png").read_bytes()
    fewer = ensure_synthetic_dataset(tmp_path, **{**TINY, "num_train": 2})
    assert (fewer.train_images / "000001.png").read_bytes() == (tiny_set.train_images / "000001.png").read_bytes()


def test_generates_only_when_missing_and_regenerates_for_a_new_recipe(tmp_path, monkeypatch):
    paths = ensure_synthetic_dataset(tmp_path, **TINY)
    calls = []
    monkeypatch.setattr(synthetic, "generate_synthetic_split", lambda *args: calls.append(args))
    assert ensure_synthetic_dataset(tmp_path, **TINY) == paths
    assert calls == []
    monkeypatch.undo()
    changed = ensure_synthetic_dataset(tmp_path, **{**TINY, "max_objects": 2})
    assert changed.root != paths.root and changed.train_annotations.is_file()
    stamp = json.loads((changed.root / "stamp.json").read_text())
    assert stamp["max_objects"] == 2 and stamp["version"] == data.SYNTHETIC_VERSION
    assert not list(tmp_path.glob(".*tmp*")), "the staging folder must be gone"


def test_a_folder_without_stamp_is_regenerated(tmp_path):
    paths = ensure_synthetic_dataset(tmp_path, **TINY)
    (paths.root / "stamp.json").unlink()
    (paths.train_images / "000000.png").unlink()
    again = ensure_synthetic_dataset(tmp_path, **TINY)
    assert (again.train_images / "000000.png").is_file() and (again.root / "stamp.json").is_file()
    # A stamp torn by a crash (not JSON) is no stamp either.
    (paths.root / "stamp.json").write_bytes(b'{"vers')
    (paths.train_images / "000000.png").unlink()
    third = ensure_synthetic_dataset(tmp_path, **TINY)
    assert (third.train_images / "000000.png").is_file() and json.loads((third.root / "stamp.json").read_text())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' annToMask under numpy 2
@pytest.mark.parametrize("split", ["train", "val"])
def test_annotations_are_valid_coco(tiny_set, split):
    annotation_file = tiny_set.train_annotations if split == "train" else tiny_set.val_annotations
    image_dir = tiny_set.train_images if split == "train" else tiny_set.val_images
    coco = COCO(str(annotation_file))
    assert [coco.cats[c]["name"] for c in sorted(coco.cats)] == list(SYNTHETIC_CLASSES)
    assert len(coco.imgs) == TINY[f"num_{split}"]
    assert len(coco.anns) >= len(coco.imgs)  # at least one object per image
    assert len({ann["id"] for ann in coco.anns.values()}) == len(coco.anns)
    for ann in coco.anns.values():
        image = coco.imgs[ann["image_id"]]
        with Image.open(image_dir / image["file_name"]) as png:
            assert png.size == (image["width"], image["height"]) and png.mode == "RGB"
        assert min(image["width"], image["height"]) == TINY["image_size"]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= image["width"] and y + h <= image["height"]
        assert ann["iscrowd"] == 0 and ann["category_id"] in coco.cats
        # The box and the area are those of the visible mask.
        assert coco_mask.toBbox(ann["segmentation"]).tolist() == ann["bbox"]
        assert coco_mask.area(ann["segmentation"]) == ann["area"] == coco.annToMask(ann).sum()


def test_synthetic_set_has_every_class_tall_wide_and_occluded_objects(varied_set):
    coco = COCO(str(varied_set.train_annotations))
    anns = list(coco.anns.values())
    assert {ann["category_id"] for ann in anns} == set(coco.cats)
    aspects = np.array([ann["bbox"][2] / ann["bbox"][3] for ann in anns])
    assert (aspects > 2).sum() >= 3 and (aspects < 0.5).sum() >= 3
    sides = np.sqrt([ann["bbox"][2] * ann["bbox"][3] for ann in anns])
    assert sides.min() < 12 and sides.max() > 25  # varied scales
    # Occlusion: some objects' visible area is well below what their shape fills of the box
    # (a square fills all of it, a circle pi/4, a star at least ~30%).
    fill = np.array([ann["area"] / (ann["bbox"][2] * ann["bbox"][3]) for ann in anns])
    names = [coco.cats[ann["category_id"]]["name"] for ann in anns]
    squares = fill[[name in ("square", "rectangle") for name in names]]
    assert (squares < 0.95).any()


def test_synthetic_config_rejects_bad_recipes():
    with pytest.raises(ValueError, match="min_objects"):
        SyntheticConfig(min_objects=0)
    with pytest.raises(ValueError, match="max_occlusion"):
        SyntheticConfig(max_occlusion=1.0)
    with pytest.raises(ValueError, match="split"):
        data.generate_synthetic_split(SyntheticConfig(), "test", None, None)


# ---------------------------------------------------------------------------------------------------------------------
# COCO dataset
# ---------------------------------------------------------------------------------------------------------------------


def test_coco_dataset_samples(tiny_set):
    dataset = CocoDetection(tiny_set.train_images, tiny_set.train_annotations)
    assert len(dataset) == TINY["num_train"]
    assert dataset.categories == ["__background__", *SYNTHETIC_CLASSES] and dataset.num_classes == 7
    assert dataset.label_to_category_id == {k: k for k in range(1, 7)}
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == 3
    assert image.min() >= 0 and image.max() <= 1
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
    assert target["labels"].dtype == torch.int64 and target["labels"].shape == target["boxes"].shape[:1]
    assert (target["labels"] >= 1).all() and (target["labels"] <= 6).all()
    assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()
    assert target["image_id"] == 1 and target["orig_size"].tolist() == list(image.shape[1:])
    ann = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=[1]))[0]
    x, y, w, h = ann["bbox"]
    assert target["boxes"][0].tolist() == [x, y, x + w, y + h]


def test_image_cache_serves_the_uncached_samples(tiny_set, tmp_path):
    """Cached decoded images give the same samples, flips included, however many epochs; the cache
    stops growing at its byte budget and a kept image no longer needs its file."""
    import shutil

    image_dir = tmp_path / "train"
    shutil.copytree(tiny_set.train_images, image_dir)

    def dataset(cache_bytes):
        transform = DetectionTransform(train=True, generator=torch.Generator().manual_seed(0))
        return CocoDetection(image_dir, tiny_set.train_annotations, transform, image_cache_bytes=cache_bytes)

    uncached, cached = dataset(0), dataset(2**30)
    for _ in range(3):  # the first epoch fills the cache, the next ones read it
        for index in range(len(uncached)):
            (image, target), (cached_image, cached_target) = uncached[index], cached[index]
            assert torch.equal(cached_image, image)
            assert torch.equal(cached_target["boxes"], target["boxes"])
            assert torch.equal(cached_target["labels"], target["labels"])
            assert cached_target["image_id"] == target["image_id"]
    first_image_bytes = cached[0][0].numel()
    budget = CocoDetection(image_dir, tiny_set.train_annotations, image_cache_bytes=first_image_bytes)
    budget[0], budget[1]
    assert list(budget._decoded) == [0] and budget._decoded_bytes == first_image_bytes
    path = budget._samples[0].path
    expected = read_image(path)
    path.unlink()
    assert torch.equal(budget[0][0], expected)  # served from memory
    with pytest.raises(ValueError, match="image_cache_bytes"):
        dataset(-1)


def write_coco(tmp_path, images, annotations, categories):
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    annotation_file = tmp_path / "instances.json"
    content = {"images": images, "annotations": annotations, "categories": categories}
    annotation_file.write_text(json.dumps(content))
    return image_dir, annotation_file


@pytest.fixture
def bad_coco(tmp_path):
    """Category ids 5 and 9 (labels 1 and 2); image 3's file is missing; annotations 11-13 are bad."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 20, "height": 16} for i in (1, 2, 3)]
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 9, "bbox": [1, 2, 5, 6], "area": 30, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 5, "bbox": [4, 4, -3, 5], "area": 15, "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 77, "bbox": [4, 4, 3, 5], "area": 15, "iscrowd": 0},
        {"id": 13, "image_id": 2, "category_id": 5, "bbox": [4, 4, 3, 0], "area": 0, "iscrowd": 0},
        {"id": 14, "image_id": 2, "category_id": 5, "bbox": [3, 1, 4, 4], "area": 16, "iscrowd": 0},
        {"id": 15, "image_id": 2, "category_id": 9, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 1},
        {"id": 16, "image_id": 3, "category_id": 5, "bbox": [3, 1, 4, 4], "area": 16, "iscrowd": 0},
    ]
    categories = [{"id": 9, "name": "nine"}, {"id": 5, "name": "five"}]
    image_dir, annotation_file = write_coco(tmp_path, images, annotations, categories)
    for i in (1, 2):
        Image.new("RGB", (20, 16), (10 * i, 0, 0)).save(image_dir / f"{i}.png")
    return image_dir, annotation_file


def test_bad_coco_data_raises_naming_file_and_annotation(bad_coco):
    image_dir, annotation_file = bad_coco
    with pytest.raises(ValueError) as error:
        CocoDetection(image_dir, annotation_file, on_bad="raise")
    message = str(error.value)
    assert "4 problems" in message and str(annotation_file) in message
    assert "annotation id 11 (image 1.png): non-positive width" in message
    assert "annotation id 12 (image 2.png): unknown category id 77" in message
    assert "annotation id 13" in message
    assert "image id 3" in message and "3.png is missing" in message


def test_bad_coco_data_is_skipped_with_a_warning(bad_coco):
    image_dir, annotation_file = bad_coco
    with pytest.warns(UserWarning, match=r"annotation id 11 \(image 1.png\): non-positive width") as record:
        dataset = CocoDetection(image_dir, annotation_file, on_bad="skip")
    assert "unknown category id 77" in str(record[0].message)
    assert dataset.categories == ["__background__", "five", "nine"]  # in category id order
    assert dataset.label_to_category_id == {1: 5, 2: 9}
    assert len(dataset) == 2 and dataset.image_ids == [1, 2]
    _, first = dataset[0]
    _, second = dataset[1]
    assert first["boxes"].tolist() == [[1, 2, 6, 8]] and first["labels"].tolist() == [2]
    # The crowd annotation 15 is no training target, but stays in the evaluation ground truth.
    assert second["boxes"].tolist() == [[3, 1, 7, 5]] and second["labels"].tolist() == [1]
    assert sorted(dataset.coco.anns) == [10, 14, 15] and sorted(dataset.coco.imgs) == [1, 2]


def test_coco_options(bad_coco):
    image_dir, annotation_file = bad_coco
    with pytest.raises(ValueError, match="on_bad"):
        CocoDetection(image_dir, annotation_file, on_bad="ignore")


@pytest.mark.parametrize("damage", ["not a png", "truncated", "empty"])
def test_unreadable_image_skipped_with_a_warning_or_refused(tmp_path, damage):
    images = [{"id": i, "file_name": f"{i}.png", "width": 20, "height": 16} for i in (1, 2)]
    annotations = [
        {"id": i, "image_id": i, "category_id": 1, "bbox": [1, 2, 5, 6], "area": 30, "iscrowd": 0} for i in (1, 2)
    ]
    image_dir, annotation_file = write_coco(tmp_path, images, annotations, [{"id": 1, "name": "a"}])
    for i in (1, 2):
        Image.new("RGB", (20, 16), (10 * i, 0, 0)).save(image_dir / f"{i}.png")
    whole = (image_dir / "2.png").read_bytes()
    damaged = {"not a png": b"not a png", "truncated": whole[: len(whole) // 2], "empty": b""}[damage]
    (image_dir / "2.png").write_bytes(damaged)
    refusing = CocoDetection(image_dir, annotation_file, on_bad="raise")
    with pytest.raises(ValueError, match=r"cannot read image .*2.png \(image id 2\)"):
        refusing[1]
    # By default it is skipped: None, left out of its batch, with a warning naming it (once per file).
    dataset = CocoDetection(image_dir, annotation_file)
    with pytest.warns(UserWarning, match=r"cannot read image .*2.png \(image id 2\)"):
        assert dataset[1] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert dataset[1] is None
    images, targets = collate_detection([dataset[0], dataset[1]])
    assert len(images) == len(targets) == 1 and targets[0]["image_id"] == 1


def test_read_image_gives_rgb_floats_in_unit_range(tmp_path):
    """PNGs in RGBA, grayscale and palette modes all read as PIL's ``convert("RGB")`` pixels / 255."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8))
    for mode in ("RGB", "RGBA", "L", "P"):
        path = tmp_path / f"{mode}.png"
        rgb.convert(mode).save(path)
        expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
        image = read_image(path)
        assert image.dtype == torch.float32 and image.shape == (3, 5, 7), mode
        torch.testing.assert_close(image, expected, atol=0, rtol=0, msg=mode)


def test_hand_made_coco_without_iscrowd_or_area(tmp_path):
    images = [{"id": 1, "file_name": "1.png", "width": 8, "height": 8}]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 3]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, "one", 2, 3]},
    ]
    image_dir, annotation_file = write_coco(tmp_path, images, annotations, [{"id": 1, "name": "a"}])
    Image.new("RGB", (8, 8)).save(image_dir / "1.png")
    with pytest.warns(UserWarning, match=r"annotation id 2 \(image 1.png\): bbox must hold numbers"):
        dataset = CocoDetection(image_dir, annotation_file)
    assert dataset.coco.anns[1]["iscrowd"] == 0 and dataset.coco.anns[1]["area"] == 6
    assert dataset[0][1]["boxes"].tolist() == [[1, 1, 3, 4]]


def test_images_without_annotations_kept_or_removed(tmp_path):
    """As torchvision's references: for training, images with no annotation, only crowd ones, or only boxes
    at most 1 pixel wide or tall are left out; evaluation keeps them."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in (1, 2, 3, 4)]
    annotations = [
        {"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0},
        {"id": 2, "image_id": 3, "category_id": 1, "bbox": [1, 1, 1, 5], "area": 5, "iscrowd": 0},
        {"id": 3, "image_id": 4, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 1},
    ]
    image_dir, annotation_file = write_coco(tmp_path, images, annotations, [{"id": 1, "name": "a"}])
    for i in (1, 2, 3, 4):
        Image.new("RGB", (8, 8)).save(image_dir / f"{i}.png")
    kept = CocoDetection(image_dir, annotation_file)
    assert kept.image_ids == [1, 2, 3, 4]
    _, empty = kept[0]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty["boxes"].dtype == torch.float32 and empty["labels"].dtype == torch.int64
    removed = CocoDetection(image_dir, annotation_file, remove_images_without_annotations=True)
    assert removed.image_ids == [2] and sorted(removed.coco.imgs) == [2]


# ---------------------------------------------------------------------------------------------------------------------
# VOC dataset
# ---------------------------------------------------------------------------------------------------------------------


def voc_xml(file_name, objects, size=(40, 30)):
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = file_name
    size_node = ET.SubElement(root, "size")
    ET.SubElement(size_node, "width").text = str(size[0])
    ET.SubElement(size_node, "height").text = str(size[1])
    ET.SubElement(size_node, "depth").text = "3"
    for name, box, difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "difficult").text = str(difficult)
        bndbox = ET.SubElement(obj, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True):
            ET.SubElement(bndbox, key).text = str(value)
    return ET.tostring(root, encoding="unicode")


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    objects = {
        "000005": [("chair", (10, 5, 20, 25), 0), ("person", (1, 1, 40, 30), 1), ("unicorn", (2, 2, 5, 5), 0)],
        "000007": [("car", (5, 5, 4, 9), 0), ("dog", (3, 4, 13, 14), 0)],
        "000009": [("cat", (3, 4, 13, 14), 0)],  # its image is missing
    }
    for name, objs in objects.items():
        (root / "Annotations" / f"{name}.xml").write_text(voc_xml(f"{name}.jpg", objs))
    for name in ("000005", "000007"):
        Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "JPEGImages" / f"{name}.jpg")
    (root / "Annotations" / "000011.xml").write_text("<annotation><object>")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n000007\n000009\n000011\n000013\n")
    return root


def test_voc_dataset_keeps_difficult_and_reports_bad_objects(voc_root):
    with pytest.warns(UserWarning) as record:
        dataset = VOCDetection(voc_root, "trainval")
    message = str(record[0].message)
    assert "000005.xml: object 2: unknown class name 'unicorn'" in message
    assert "000007.xml: object 0 (car): non-positive width" in message
    assert "000009.jpg is missing" in message
    assert "000011.xml: malformed XML" in message and "000013.xml: annotation file is missing" in message
    assert len(dataset) == 2 and dataset.num_classes == 21 and dataset.image_ids == [1, 2]
    image, target = dataset[0]
    assert image.shape == (3, 30, 40)
    assert target["boxes"].tolist() == [[9, 4, 20, 25], [0, 0, 40, 30]]  # 1-based inclusive -> continuous
    chair, person = dataset.categories.index("chair"), dataset.categories.index("person")
    assert target["labels"].tolist() == [chair, person]
    assert target["difficult"].tolist() == [False, True]
    # For evaluation, difficult objects are crowd regions, which COCOeval ignores.
    anns = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=[1]))
    assert [ann["iscrowd"] for ann in anns] == [0, 1] and anns[0]["bbox"] == [9, 4, 11, 21]


def test_voc_without_difficult_and_raise(voc_root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = VOCDetection(voc_root, "trainval", keep_difficult=False)
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[9, 4, 20, 25]] and target["difficult"].tolist() == [False]
    with pytest.raises(ValueError, match=r"000005.xml: object 2: unknown class name"):
        VOCDetection(voc_root, "trainval", on_bad="raise")
    with pytest.raises(ValueError, match="split file"):
        VOCDetection(voc_root, "test")


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,min_size,max_size,expected",
    [
        ((30, 50), 60, 1000, (60, 100)),  # shorter side to min_size
        ((50, 30), 60, 1000, (100, 60)),
        ((10, 50), 60, 100, (20, 100)),  # longer side capped at max_size
        ((600, 800), 600, 1000, (600, 800)),  # already there: unchanged
        ((375, 500), 600, 1000, (600, 800)),  # a VOC image at the paper's scale
        ((33, 47), 17, 1000, (17, 24)),  # odd sizes: the longer side floors (24.2 -> 24)
    ],
)
def test_resize_follows_the_paper(size, min_size, max_size, expected):
    """Images are resized once, by the model's transform; data sets serve them at their file's size."""
    transform = build_transform(TransformConfig(min_size=min_size, max_size=max_size)).eval()
    image = torch.rand(3, *size)
    boxes = torch.tensor([[0.0, 0.0, size[1], size[0]], [1.0, 2.0, 3.0, 5.0]])
    resized, target = transform.resize(image, {"boxes": boxes})
    new_boxes = target["boxes"]
    assert resized.shape == (3, *expected)
    assert new_boxes[0].tolist() == [0, 0, expected[1], expected[0]]  # the whole image stays the whole image
    torch.testing.assert_close(resize_boxes(new_boxes, expected, size), boxes)
    if expected == size:
        assert torch.equal(resized, image)


def test_transform_flips_only_in_training():
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 12).expand(3, 2, 12) / 24
    target = {"boxes": torch.tensor([[1.0, 0.0, 4.0, 2.0]]), "labels": torch.tensor([1]), "image_id": 3}
    keep = DetectionTransform(train=False, flip_prob=1.0)
    same_image, same = keep(image, target)
    assert torch.equal(same_image, image) and torch.equal(same["boxes"], target["boxes"])
    flip = DetectionTransform(train=True, flip_prob=1.0)
    flipped_image, flipped = flip(image, target)
    assert torch.equal(flipped_image, image.flip(-1))
    assert flipped["boxes"].tolist() == [[8.0, 0.0, 11.0, 2.0]]
    assert flipped["labels"] is target["labels"] and flipped["image_id"] == 3
    assert torch.equal(target["boxes"], torch.tensor([[1.0, 0.0, 4.0, 2.0]])), "the input target is not modified"
    # The flipped box still covers the same pixels of the flipped image.
    mask = torch.zeros(2, 12)
    mask[0:2, 1:4] = 1
    assert torch.equal(mask.flip(-1)[:, 8:11], torch.ones(2, 3))


def test_flips_are_reproducible_from_the_generator():
    image, target = torch.rand(3, 8, 8), {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]])}

    def flips(seed):
        transform = DetectionTransform(train=True, generator=torch.Generator().manual_seed(seed))
        return [transform(image, target)[1]["boxes"][0, 0].item() == 6.0 for _ in range(40)]

    assert flips(0) == flips(0)
    assert flips(0) != flips(1)
    assert 8 < sum(flips(0)) < 32  # about half


# ---------------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------------


def test_collate_keeps_images_of_different_sizes(tiny_set):
    dataset = CocoDetection(tiny_set.train_images, tiny_set.train_annotations)
    images, targets = collate_detection([dataset[i] for i in range(4)])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 4
    assert len({tuple(image.shape) for image in images}) > 1
    assert [t["image_id"] for t in targets] == [1, 2, 3, 4]


def loader_ids(loader):
    return [t["image_id"] for _, targets in loader for t in targets]


def test_loader_is_reproducible_from_its_seed(tiny_set):
    transform = DetectionTransform(train=True)
    dataset = CocoDetection(tiny_set.train_images, tiny_set.train_annotations, transforms=transform)

    def run(seed, num_workers):
        if num_workers == 0:
            torch.manual_seed(100 + seed)  # the flips' generator without workers; workers are seeded by the loader
        loader = make_data_loader(dataset, batch_size=4, shuffle=True, num_workers=num_workers, seed=seed)
        batches = list(loader)
        assert [len(images) for images, _ in batches] == [4, 2]
        return [t["image_id"] for _, targets in batches for t in targets], [b for _, ts in batches for b in ts]

    ids, targets = run(0, 0)
    ids_again, targets_again = run(0, 0)
    assert ids == ids_again and sorted(ids) == list(range(1, 7))
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, targets_again, strict=True))
    assert run(1, 0)[0] != ids or run(2, 0)[0] != ids
    # With a worker process, the loader's seed makes the flips reproducible too.
    worker_ids, worker_targets = run(0, 1)
    torch.manual_seed(12345)  # the main process's generator does not matter with workers
    worker_ids_again, worker_targets_again = run(0, 1)
    assert worker_ids == worker_ids_again == ids
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(worker_targets, worker_targets_again, strict=True))


def test_loader_without_shuffle_and_bad_arguments(tiny_set):
    dataset = CocoDetection(tiny_set.val_images, tiny_set.val_annotations)
    assert loader_ids(make_data_loader(dataset, batch_size=2, shuffle=False)) == [1, 2, 3]
    with pytest.raises(ValueError, match="batch_size"):
        make_data_loader(dataset, batch_size=0, shuffle=False)


def test_distributed_loader_uses_a_distributed_sampler(tiny_set, tmp_path):
    dataset = CocoDetection(tiny_set.train_images, tiny_set.train_annotations)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        loader = make_data_loader(dataset, batch_size=2, shuffle=True, seed=3, distributed=True)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        loader.sampler.set_epoch(0)
        first = loader_ids(loader)
        loader.sampler.set_epoch(1)
        second = loader_ids(loader)
        assert sorted(first) == sorted(second) == list(range(1, 7)) and first != second
    finally:
        dist.destroy_process_group()
