"""The synthetic shapes data set: generated once, deterministically from a seed, into a cache folder
in COCO format (read it with :class:`~.coco.CocoDetection`); it needs no download.

Shape shorthand: H x W image height and width.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask

from ...ops._checks import check_choice

SYNTHETIC_CLASSES = ("circle", "square", "triangle", "star", "ellipse", "rectangle")
# Bump when the drawing recipe changes: the cache folder name includes it, so old caches are not reused.
SYNTHETIC_VERSION = 1


@dataclass(frozen=True)
class SyntheticConfig:
    """The synthetic data set's recipe. Every field goes into the cache folder's name (a hash).

    Objects (``SYNTHETIC_CLASSES``): circles and squares (aspect 1), stars (aspect 0.8-1.25),
    triangles (0.5-2, pointing up/down/left/right), ellipses and rectangles (tall or wide, aspect
    ratios 1.6-3.5 and 1.8-4 either way) -- so all three anchor ratios (1:2, 1:1, 2:1) have objects.
    Later objects may hide up to ``max_occlusion`` of earlier ones; boxes and areas are those of the
    visible pixels (COCO's convention). Backgrounds are textured (smooth colour noise, stripes, checks,
    gradients) with clutter (lines, crosses, scribbles, arcs) that belongs to no class.
    """

    seed: int = 0
    num_train: int = 2000  # sized for a ~15-minute CPU run (~1 min to generate on 2 cores); not yet tuned by training
    num_val: int = 200
    image_size: int = 256  # shorter side in pixels; small for CPU training
    max_aspect: float = 4 / 3  # the longer side is uniform in [image_size, image_size * max_aspect]
    min_objects: int = 1
    max_objects: int = 6
    min_scale: float = 0.1  # sqrt(object box area) / shorter image side
    max_scale: float = 0.5
    max_occlusion: float = 0.5  # the largest fraction of an object's pixels later objects may cover
    max_distractors: int = 6  # clutter items per image, uniform in [0, max_distractors]

    def __post_init__(self) -> None:
        if self.num_train < 0 or self.num_val < 0:
            raise ValueError(f"num_train and num_val must be non-negative, got {self.num_train}, {self.num_val}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {self.image_size}")
        if self.max_aspect < 1:
            raise ValueError(f"max_aspect must be at least 1, got {self.max_aspect}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_scale <= self.max_scale <= 0.9:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 0.9, got {self.min_scale}, {self.max_scale}")
        if not 0 <= self.max_occlusion < 1:
            raise ValueError(f"max_occlusion must be in [0, 1), got {self.max_occlusion}")

    def stamp(self) -> dict:
        return {"version": SYNTHETIC_VERSION, **dataclasses.asdict(self)}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.stamp(), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SyntheticPaths:
    """Where :func:`ensure_synthetic_dataset` put the data set; pass a pair to :class:`CocoDetection`."""

    root: Path
    train_images: Path
    train_annotations: Path
    val_images: Path
    val_annotations: Path
    config: SyntheticConfig = field(default_factory=SyntheticConfig)


def default_cache_dir() -> Path:
    """``$TRITONDET_CACHE/data`` if set, else ``~/.cache/tritondet/data``."""
    base = os.environ.get("TRITONDET_CACHE")
    return Path(base) / "data" if base else Path.home() / ".cache" / "tritondet" / "data"


def _paths(folder: Path, config: SyntheticConfig) -> SyntheticPaths:
    return SyntheticPaths(
        root=folder,
        train_images=folder / "train",
        train_annotations=folder / "annotations" / "instances_train.json",
        val_images=folder / "val",
        val_annotations=folder / "annotations" / "instances_val.json",
        config=config,
    )


def ensure_synthetic_dataset(
    root: str | os.PathLike | None = None,
    config: SyntheticConfig | None = None,
    workers: int | None = None,
    **overrides,
) -> SyntheticPaths:
    """Generate the synthetic data set under ``root`` unless it is already there; return its paths.

    ``overrides`` replace fields of ``config`` (default :class:`SyntheticConfig`), e.g.
    ``ensure_synthetic_dataset(root, seed=0, num_train=500, num_val=100)``. The data set lives in
    ``root/synthetic-v<version>-<hash of the recipe>``, so a changed recipe or version regenerates
    into a new folder. Generation writes to a temporary folder renamed into place at the end: an
    interrupted run leaves no half data set, and processes racing (e.g. ranks of one job) are safe.
    ``workers`` processes draw the images (default: the CPU count, at most 8); the bytes do not
    depend on it.
    """
    config = dataclasses.replace(config or SyntheticConfig(), **overrides)
    root = Path(root) if root is not None else default_cache_dir()
    folder = root / f"synthetic-v{SYNTHETIC_VERSION}-{config.digest()}"
    stamp_file = folder / "stamp.json"
    if _stamped(stamp_file, config):
        return _paths(folder, config)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    paths = _paths(staging, config)
    paths.train_annotations.parent.mkdir(parents=True)
    generate_synthetic_split(config, "train", paths.train_images, paths.train_annotations, workers)
    generate_synthetic_split(config, "val", paths.val_images, paths.val_annotations, workers)
    (staging / "stamp.json").write_text(json.dumps(config.stamp(), sort_keys=True, indent=1) + "\n")
    if folder.exists() and not _stamped(stamp_file, config):
        shutil.rmtree(folder)  # without a valid stamp it is not ours to keep (e.g. copied by hand, incomplete)
    try:
        staging.rename(folder)
    except OSError:
        if not _stamped(stamp_file, config):  # not another process finishing first: a real error
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return _paths(folder, config)


def _stamped(stamp_file: Path, config: SyntheticConfig) -> bool:
    """Whether ``stamp_file`` holds ``config``'s stamp (a missing or unreadable one does not)."""
    try:
        return json.loads(stamp_file.read_text()) == config.stamp()
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return False


_SPLIT_CODES = {"train": 0, "val": 1}  # part of every image's seed, so the splits never share an image
# PNG compression level 1: 3x faster to write than the default 6 for files ~35% larger (~45 KB at 256 px).
_PNG_COMPRESS_LEVEL = 1
# Below this many images a process pool costs more than it saves.
_MIN_IMAGES_PER_POOL = 64


def generate_synthetic_split(
    config: SyntheticConfig, split: str, image_dir: Path, annotation_file: Path, workers: int | None = None
) -> None:
    """Draw the ``split`` ("train" or "val") images into ``image_dir`` as PNGs and write the COCO JSON.

    Image i is drawn from ``numpy.random.default_rng([seed, split code, i])`` alone, so images are
    independent of each other, of the split sizes and of the number of ``workers`` processes.
    """
    check_choice("split", split, _SPLIT_CODES)
    count = config.num_train if split == "train" else config.num_val
    image_dir.mkdir(parents=True, exist_ok=True)
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    draw = functools.partial(_write_synthetic_image, config, _SPLIT_CODES[split], image_dir)
    if workers > 1 and count >= _MIN_IMAGES_PER_POOL:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            drawn = pool.map(draw, range(count), chunksize=16)
    else:
        drawn = [draw(index) for index in range(count)]
    images, annotations = [], []
    for image, objects in drawn:
        images.append(image)
        for ann in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], **ann})
    coco = {
        "info": {"description": "tritondet synthetic shapes", "split": split, **config.stamp()},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SYNTHETIC_CLASSES)
        ],
    }
    annotation_file.write_text(json.dumps(coco, separators=(",", ":")))


def _write_synthetic_image(config: SyntheticConfig, split_code: int, image_dir: Path, index: int):
    """Draw and save image ``index``; return its COCO image record and annotations (without ids)."""
    pixels, objects = _draw_image(np.random.default_rng([config.seed, split_code, index]), config)
    file_name = f"{index:06d}.png"
    Image.fromarray(pixels).save(image_dir / file_name, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    height, width = pixels.shape[:2]
    image = {"id": index + 1, "file_name": file_name, "width": width, "height": height}
    annotations = []
    for category, visible in objects:
        rows, cols = np.nonzero(visible.any(axis=1))[0], np.nonzero(visible.any(axis=0))[0]
        x1, y1, x2, y2 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
        rle = coco_mask.encode(np.asfortranarray(visible.astype(np.uint8)))
        annotations.append(
            {
                "category_id": category + 1,
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "area": float(visible.sum()),
                "iscrowd": 0,
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
            }
        )
    return image, annotations


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _object_aspect(rng: np.random.Generator, name: str) -> float:
    """Width / height of an object's box."""
    tall_or_wide = 1.0 if rng.random() < 0.5 else -1.0
    if name == "ellipse":
        return _log_uniform(rng, 1.6, 3.5) ** tall_or_wide  # clearly not a circle
    if name == "rectangle":
        return _log_uniform(rng, 1.8, 4.0) ** tall_or_wide  # clearly not a square
    if name == "triangle":
        return _log_uniform(rng, 0.5, 2.0)
    if name == "star":
        return _log_uniform(rng, 0.8, 1.25)
    return 1.0


def _shape_mask(rng: np.random.Generator, name: str, box: tuple[float, float, float, float], size: tuple[int, int]):
    """Boolean ``[H, W]`` mask of shape ``name`` filling ``box`` (x1, y1, x2, y2)."""
    height, width = size
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1, x2, y2 = box
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    if name in ("circle", "ellipse"):
        draw.ellipse(box, fill=255)
    elif name in ("square", "rectangle"):
        draw.rectangle(box, fill=255)
    elif name == "triangle":
        apex = [(cx, y1), (x2, y2), (x1, y2)]  # pointing up; then one of four orientations
        direction = int(rng.integers(4))
        if direction == 1:
            apex = [(cx, y2), (x1, y1), (x2, y1)]
        elif direction == 2:
            apex = [(x1, cy), (x2, y1), (x2, y2)]
        elif direction == 3:
            apex = [(x2, cy), (x1, y1), (x1, y2)]
        draw.polygon(apex, fill=255)
    elif name == "star":
        inner = rng.uniform(0.38, 0.5)  # inner/outer radius: a clear five-pointed star
        turn = rng.uniform(0, 2 * math.pi)
        angles = turn + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        draw.polygon(
            list(zip(cx + hw * radii * np.cos(angles), cy + hh * radii * np.sin(angles), strict=True)), fill=255
        )
    return np.asarray(canvas) > 127


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: int, channels: int) -> np.ndarray:
    """``[H, W, channels]`` smooth noise in [0, 1]: a ``cells``-wide random grid upsampled bilinearly."""
    height, width = size
    grid = rng.uniform(0, 255, size=(cells, cells, channels)).astype(np.uint8)
    layers = [
        np.asarray(Image.fromarray(grid[..., c]).resize((width, height), Image.BILINEAR)) for c in range(channels)
    ]
    return np.stack(layers, axis=-1).astype(np.float32) / 255.0


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """``[H, W, 3]`` float32 textured background."""
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    color_a, color_b = _random_color(rng), _random_color(rng)
    kind = int(rng.integers(4))
    if kind == 0:  # smooth colour noise
        return _smooth_noise(rng, size, int(rng.integers(3, 10)), 3)
    if kind == 1:  # stripes at a random angle
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 40)
        mix = 0.5 + 0.5 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    elif kind == 2:  # checks
        cell = int(rng.integers(8, 40))
        mix = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
    else:  # linear gradient
        angle = rng.uniform(0, 2 * math.pi)
        ramp = xx * math.cos(angle) + yy * math.sin(angle)
        mix = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    # Low-contrast textures keep objects the most salient things in the image.
    color_b = color_a + rng.uniform(0.2, 0.5) * (color_b - color_a)
    image = color_a + mix[..., None] * (color_b - color_a)
    return 0.8 * image + 0.2 * _smooth_noise(rng, size, int(rng.integers(3, 10)), 3)


def _draw_distractors(rng: np.random.Generator, canvas: Image.Image, count: int, short: int) -> None:
    """Clutter of no class: lines, crosses, scribbles and arcs."""
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    for _ in range(count):
        color = tuple(int(v) for v in rng.integers(0, 256, size=3))
        line_width = int(rng.integers(1, 4))
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        extent = float(rng.uniform(0.05, 0.3)) * short
        kind = int(rng.integers(4))
        if kind == 0:  # a line
            angle = rng.uniform(0, 2 * math.pi)
            draw.line(
                [(x, y), (x + extent * math.cos(angle), y + extent * math.sin(angle))], fill=color, width=line_width
            )
        elif kind == 1:  # a cross
            half = extent / 4
            draw.line([(x - half, y), (x + half, y)], fill=color, width=line_width)
            draw.line([(x, y - half), (x, y + half)], fill=color, width=line_width)
        elif kind == 2:  # a scribble: a short random walk
            steps = rng.normal(0, extent / 4, size=(int(rng.integers(3, 8)), 2)).cumsum(axis=0) + np.array([x, y])
            draw.line([tuple(p) for p in steps.tolist()], fill=color, width=line_width)
        else:  # an open arc
            start = float(rng.uniform(0, 360))
            draw.arc(
                [x, y, x + extent, y + extent], start, start + float(rng.uniform(60, 200)), fill=color, width=line_width
            )


def _draw_image(rng: np.random.Generator, config: SyntheticConfig) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One synthetic image ``uint8 [H, W, 3]`` and its objects as (class index, visible mask ``bool [H, W]``)."""
    short = config.image_size
    long = int(rng.integers(short, int(short * config.max_aspect) + 1))
    height, width = (short, long) if rng.random() < 0.5 else (long, short)
    background = _background(rng, (height, width))
    canvas = Image.fromarray((background.clip(0, 1) * 255).astype(np.uint8))
    _draw_distractors(rng, canvas, int(rng.integers(0, config.max_distractors + 1)), short)
    image = np.asarray(canvas).astype(np.float32) / 255.0

    owner = np.full((height, width), -1, dtype=np.int32)  # which object each pixel shows (-1: background)
    full_areas: list[int] = []
    classes: list[int] = []
    wanted = int(rng.integers(config.min_objects, config.max_objects + 1))
    for _ in range(wanted * 10):  # placement attempts; a crowded image may end up with fewer objects
        if len(classes) == wanted:
            break
        category = int(rng.integers(len(SYNTHETIC_CLASSES)))
        name = SYNTHETIC_CLASSES[category]
        scale = _log_uniform(rng, config.min_scale, config.max_scale) * short
        aspect = _object_aspect(rng, name)
        box_w, box_h = min(scale * math.sqrt(aspect), width - 2), min(scale / math.sqrt(aspect), height - 2)
        x1, y1 = rng.uniform(0, width - box_w), rng.uniform(0, height - box_h)
        mask = _shape_mask(rng, name, (x1, y1, x1 + box_w, y1 + box_h), (height, width))
        area = int(mask.sum())
        if area < 16:
            continue
        if classes:
            covered = np.bincount(owner[mask] + 1, minlength=len(classes) + 1)[1:]
            remaining = np.bincount(owner.ravel() + 1, minlength=len(classes) + 1)[1:] - covered
            if np.any(remaining < (1 - config.max_occlusion) * np.asarray(full_areas)):
                continue
        under = image[mask].mean(axis=0)
        for _ in range(10):  # a fill colour that stands out from what it covers
            color = _random_color(rng)
            if np.linalg.norm(color - under) > 0.45:
                break
        shading = _smooth_noise(rng, (height, width), 4, 1)[mask]  # mild texture on the object
        image[mask] = color * (0.85 + 0.3 * shading)
        owner[mask] = len(classes)
        full_areas.append(area)
        classes.append(category)
    pixels = (image.clip(0, 1) * 255 + 0.5).astype(np.uint8)
    return pixels, [(category, owner == i) for i, category in enumerate(classes)]
