"""Property-based fuzzing of every public op of :mod:`tritondet.ops` on every backend.

Each example draws hostile arguments for one op (empty and zero-size dimensions, NaN, +-inf and
1e30 coordinates, degenerate and inverted boxes, wrong dtypes and shapes, out-of-range indices,
scalars of the wrong type) and classifies the outcome; anything else fails:

- equal to torchvision, where torchvision has the op and is defined on the input (same dtype,
  shape and values, NaN where NaN; NMS ties compared against our reference instead);
- equal to our reference backend (ops torchvision lacks, or inputs where torchvision's C++ casts
  a non-finite or huge coordinate to int, reads out of bounds or crashes);
- a ``ValueError`` or ``TypeError`` whose message names an argument of the op.

Every example runs under a wall-clock limit (a hang fails). Sizes are tiny so the suite runs
under the Triton interpreter; CI runs a fixed, derandomized number of examples per op, and the
``slow`` mark runs many more.
"""

from __future__ import annotations

import inspect
import math
import signal
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch.nn import functional as F
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import expand_boxes, project_masks_on_boxes
from torchvision.models.detection.roi_heads import paste_masks_in_image as torchvision_paste

from tests.tolerances import TOLERANCES
from tritondet import _backend, errors, ops

NAN, INF = math.nan, math.inf
# Coordinates a detector should survive: ordinary values, degenerate ones, overflow and non-finite.
HOSTILE = (0.0, 1.0, 2.5, 4.0, 10.0, -3.0, 1e30, -1e30, NAN, INF, -INF)
# Per-example wall-clock limit (seconds): the largest example takes about 2 s in the interpreter on a
# loaded 2-core machine; a hang fails instead of stalling CI.
TIME_LIMIT = 60
# Examples per op and backend: 12 keep the whole file within about a minute with -n 2 in the interpreter.
CI_EXAMPLES = 12
SLOW_EXAMPLES = 400


class Hang(Exception):
    """An example ran past TIME_LIMIT."""


@contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def coordinate() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(HOSTILE), st.floats(-5, 20, width=32))


def float_dtype(data) -> torch.dtype:
    """Mostly fp32, sometimes another float dtype, rarely an integer (a wrong dtype)."""
    return data.draw(
        st.sampled_from((torch.float32,) * 6 + (torch.float64, torch.float16, torch.bfloat16, torch.int64)),
        label="dtype",
    )


def tensor(data, shape, elements, dtype=torch.float32, label="tensor") -> torch.Tensor:
    values = data.draw(st.lists(elements, min_size=math.prod(shape), max_size=math.prod(shape)), label=label)
    values = torch.tensor(values, dtype=torch.float64).reshape(shape)
    if not dtype.is_floating_point:  # casting NaN or 1e30 to an integer is undefined: a wrong dtype, finite values
        values = values.nan_to_num(0.0).clamp(-1000, 1000)
    return values.to(dtype)


def boxes(data, n=None, label="boxes", dtype=None) -> torch.Tensor:
    """``[n, 4]`` xyxy boxes, n in [0, 4]; sometimes a wrong last dimension or rank."""
    n = data.draw(st.integers(0, 4), label=f"{label} n") if n is None else n
    shape = data.draw(st.sampled_from(((n, 4),) * 8 + ((n, 3), (4,))), label=f"{label} shape")
    return tensor(data, shape, coordinate(), dtype or float_dtype(data), label)


def scores(data, n, label="scores") -> torch.Tensor:
    elements = st.one_of(st.sampled_from((0.5, 0.5, 0.0, 1.0, NAN, INF, -INF)), st.floats(-1, 2, width=32))
    return tensor(data, (n,), elements, float_dtype(data), label)


def scalar(data, usual, label) -> object:
    """A float argument: usually ordinary, sometimes hostile, rarely of the wrong type."""
    return data.draw(
        st.one_of(st.sampled_from(usual), st.sampled_from((0.0, -1.0, 2.0, NAN, INF, "0.5", None))),
        label=label,
    )


def small_int(data, usual, label, hostile=(0, -1, 1000, 2.5, "2")) -> object:
    return data.draw(st.one_of(st.sampled_from(usual), st.sampled_from(hostile)), label=label)


def rois(data, num_images: int, label="rois") -> torch.Tensor:
    """``[K, 5]`` rows (batch index, x1, y1, x2, y2): batch indices sometimes out of range or fractional."""
    k = data.draw(st.integers(0, 3), label=f"{label} k")
    batch = tensor(data, (k, 1), st.sampled_from((0.0,) * 4 + (1.0, -1.0, 0.5, float(num_images))), label="batch")
    corners = tensor(data, (k, 4), coordinate(), label=f"{label} corners")
    return torch.cat([batch, corners], 1).to(float_dtype(data))


def feature_map(data, channels_multiple=1) -> torch.Tensor:
    n, c, h, w = (
        data.draw(st.sampled_from(choices), label=name)
        for name, choices in (
            ("N", (1, 1, 2, 0)),
            ("C", (channels_multiple, 2 * channels_multiple, 0)),
            ("H", (5, 3, 1, 0)),
            ("W", (5, 4, 1, 0)),
        )
    )
    values = torch.randn((n, c, h, w), generator=torch.Generator().manual_seed(data.draw(st.integers(0, 9))))
    special = data.draw(st.sampled_from((None, None, NAN, INF, -INF)), label="special feature")
    if special is not None and values.numel():
        values.view(-1)[0] = special
    return values.to(data.draw(st.sampled_from((torch.float32,) * 4 + (torch.float64, torch.float16)), label="fdtype"))


def output_size(data) -> object:
    return data.draw(st.sampled_from((2, 2, (2, 3), 1, (1, 2), 0, -1, (2,), "2")), label="output_size")


# ----------------------------------------------------------------------------------------------
# One case per public op: how to draw its arguments and what to compare with
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """``draw(data) -> make``: ``make()`` builds fresh ``(args, kwargs)`` for one call (so an in-place
    op or a generator cannot leak state between the compared calls). ``twin(args, kwargs)`` is
    torchvision's result, or None where torchvision has no such op or is undefined on the input."""

    draw: Callable
    twin: Callable | None = None
    examples: int = CI_EXAMPLES


def _finite_moderate(*tensors) -> bool:
    """Every value finite and small enough for torchvision's C++ int casts and int32 indices."""
    return all(torch.isfinite(t).all() and (t.abs() < 1e4).all() for t in tensors if t.is_floating_point())


def _fixed(args, kwargs=None):
    return lambda: (args, dict(kwargs or {}))


def _draw_pair_iou(data):
    return _fixed((boxes(data, label="boxes1"), boxes(data, label="boxes2")))


def _draw_box_iou(data):
    fmt = data.draw(st.sampled_from(("xyxy",) * 6 + ("cxcywh", "xywh", "bad")), label="fmt")
    return _fixed((boxes(data, label="boxes1"), boxes(data, label="boxes2")), {"fmt": fmt})


def _draw_eps_iou(data):
    return _fixed((boxes(data, label="boxes1"), boxes(data, label="boxes2")), {"eps": scalar(data, (1e-7,), "eps")})


def _draw_batched_box_iou(data):
    b = data.draw(st.integers(0, 2))
    n, m = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3))
    dtype = float_dtype(data)
    first = tensor(data, (b, n, 4), coordinate(), dtype, "boxes1")
    second = tensor(data, (b, m, 4), coordinate(), dtype, "boxes2")
    return _fixed((first, second))


def _draw_nms(data):
    b = boxes(data)
    return _fixed((b, scores(data, b.shape[0]), scalar(data, (0.5, 0.7), "iou_threshold")))


def _nms_twin(args, kwargs):
    b, s, threshold = args
    if not isinstance(threshold, float) or s.unique().numel() != s.numel() or not torch.isfinite(s).all():
        return None  # ties and NaN ranks: compared with the reference
    return torchvision.ops.nms(b, s, threshold)


def _draw_batched_nms(data):
    b = boxes(data)
    n = b.shape[0]
    idxs = tensor(data, (n,), st.sampled_from((0, 1, 2, 1000)), torch.int64, "idxs")
    if data.draw(st.booleans(), label="float idxs"):
        idxs = idxs.float()
    return _fixed((b, scores(data, n), idxs, scalar(data, (0.5,), "iou_threshold")))


def _batched_nms_twin(args, kwargs):
    b, s, idxs, threshold = args
    if idxs.is_floating_point() or _nms_twin((b, s, threshold), {}) is None:
        return None
    return torchvision.ops.batched_nms(b, s, idxs, threshold)


def _draw_batched_nms_padded(data):
    batch, n, classes = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 4)), data.draw(st.integers(1, 3))
    dtype = float_dtype(data)
    per_class = data.draw(st.booleans(), label="per-class boxes")
    shape = (batch, n, classes, 4) if per_class else (batch, n, 4)
    b = tensor(data, shape, coordinate(), dtype, "boxes")
    s = tensor(data, (batch, n, classes), st.sampled_from((0.1, 0.5, 0.9, NAN, -INF, 2.0)), dtype, "scores")
    kwargs = {
        "score_threshold": scalar(data, (0.0, 0.3), "score_threshold"),
        "class_agnostic": data.draw(st.booleans()),
        "pre_nms_top_n": small_int(data, (None, 2), "pre_nms_top_n"),
    }
    return _fixed((b, s, scalar(data, (0.5,), "iou_threshold"), small_int(data, (3, 1), "max_output")), kwargs)


def _draw_soft_nms(data):
    b = boxes(data)
    kwargs = {
        "iou_threshold": scalar(data, (0.3,), "iou_threshold"),
        "sigma": scalar(data, (0.5,), "sigma"),
        "score_threshold": scalar(data, (0.001,), "score_threshold"),
        "method": data.draw(st.sampled_from(("gaussian", "linear", "hard")), label="method"),
    }
    return _fixed((b, scores(data, b.shape[0])), kwargs)


def _weights(data):
    return data.draw(st.sampled_from(((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (1.0, 0.0, 1.0, 1.0), (1.0,))))


def _draw_encode(data):
    n = data.draw(st.integers(0, 4))
    dtype = float_dtype(data)
    return _fixed((boxes(data, n, "reference_boxes", dtype), boxes(data, n, "proposals", dtype), _weights(data)))


def _encode_twin(args, kwargs):
    reference, proposals, weights = args
    if len(weights) != 4 or reference.shape != proposals.shape or reference.dim() != 2 or reference.shape[1] != 4:
        return None
    return BoxCoder(weights).encode_single(reference, proposals)


def _draw_decode(data):
    n = data.draw(st.integers(0, 4))
    dtype = float_dtype(data)
    deltas = tensor(data, (n, 4), st.sampled_from((0.0, 0.1, -0.5, 1.0, 10.0, NAN, INF, -INF)), dtype, "deltas")
    clip = scalar(data, (math.log(1000.0 / 16),), "bbox_xform_clip")
    return _fixed((deltas, boxes(data, n, "boxes", dtype), _weights(data)), {"bbox_xform_clip": clip})


def _decode_twin(args, kwargs):
    deltas, b, weights = args
    clip = kwargs["bbox_xform_clip"]
    if len(weights) != 4 or b.shape != deltas.shape or b.dim() != 2 or not isinstance(clip, float):
        return None
    return BoxCoder(weights, bbox_xform_clip=clip).decode_single(deltas, b)


def _pool_args(data, channels_multiple):
    x = feature_map(data, channels_multiple)
    r = rois(data, max(x.shape[0], 1))
    if data.draw(st.booleans(), label="as list"):
        r = [r[:, 1:]] + [r[:0, 1:]] * (x.shape[0] - 1) if x.shape[0] else [r[:, 1:]]
    return x, r


def _pool_twin(tv_op):
    def twin(args, kwargs):
        x, r = args[0], args[1]
        rois_tensor = r if isinstance(r, torch.Tensor) else None
        if rois_tensor is None or x.numel() == 0 or rois_tensor.dim() != 2 or rois_tensor.shape[-1] != 5:
            return None  # torchvision reads out of bounds or crashes on empty maps
        batch = rois_tensor[:, 0]
        if not ((batch >= 0) & (batch < x.shape[0]) & (batch == batch.floor())).all():
            return None  # torchvision reads out of bounds
        if not _finite_moderate(rois_tensor, torch.tensor(float(kwargs.get("spatial_scale", 1.0)))):
            return None  # torchvision casts non-finite or huge corners to int: undefined in C
        if x.dtype != rois_tensor.dtype:
            return None
        return tv_op(x, r, **kwargs)

    return twin


def _bins(size) -> int:
    """PH * PW of a valid output size, else 1: position-sensitive channels are a multiple of it."""
    if isinstance(size, int) and size > 0:
        return size * size
    if isinstance(size, tuple) and len(size) == 2:
        return math.prod(size)
    return 1


def _draw_pool(position_sensitive, sampling):
    def draw(data):
        size = output_size(data)
        x, r = _pool_args(data, _bins(size) if position_sensitive else 1)
        kwargs = {"output_size": size, "spatial_scale": scalar(data, (1.0, 0.5), "spatial_scale")}
        if sampling:
            kwargs["sampling_ratio"] = small_int(data, (2, -1, 1), "sampling_ratio", (0, 3, 2.5, "2"))
        return _fixed((x, r), kwargs)

    return draw


def _draw_roi_align(data):
    make = _draw_pool(False, True)(data)
    args, kwargs = make()
    kwargs["aligned"] = data.draw(st.sampled_from((False, True, "yes")), label="aligned")
    return _fixed(args, kwargs)


def _module_case(module, tv_module, functional_draw, init_names):
    """A module case: the functional draw's keyword arguments split into constructor and forward."""

    def draw(data):
        args, kwargs = functional_draw(data)()
        init = {name: kwargs.pop(name) for name in init_names if name in kwargs}
        return _fixed((init, *args), kwargs)

    def call(init, *args, **kwargs):
        return module(**init)(*args, **kwargs)

    def twin(args, kwargs):
        init, *rest = args
        functional = _pool_twin(lambda *a, **k: tv_module(**init)(*a))
        return functional(rest, {**init, **kwargs}) if "output_size" in init else None

    return call, Case(draw, twin)


def _draw_crop_pool(data):
    return _draw_pool(False, True)(data)


def _draw_multiscale(data):
    names = data.draw(st.sampled_from((["p2"], ["p2", "p3"], [], ["missing"])), label="featmap_names")
    n = data.draw(st.sampled_from((1, 2)), label="images")
    c = data.draw(st.sampled_from((2, 0)), label="C")
    sides = {"p2": 8, "p3": 4}
    x = {
        name: torch.randn(n, c, sides[name], sides[name], generator=torch.Generator().manual_seed(1)) for name in sides
    }
    box_list = [boxes(data, label=f"boxes{i}", dtype=torch.float32) for i in range(n)]
    shapes = [data.draw(st.sampled_from(((32, 32), (30, 20), (0, 0))), label="image_shape")] * n
    init = {
        "featmap_names": names,
        "output_size": output_size(data),
        "sampling_ratio": small_int(data, (2,), "sampling_ratio", (0, -1, 2.5)),
    }
    return _fixed((init, x, box_list, shapes))


def _multiscale_call(init, x, box_list, shapes):
    return ops.MultiScaleRoIAlign(**init)(x, box_list, shapes)


def _multiscale_twin(args, kwargs):
    init, x, box_list, shapes = args
    if init["featmap_names"] not in (["p2"], ["p2", "p3"]) or not isinstance(init["output_size"], int):
        return None
    if init["output_size"] <= 0 or init["sampling_ratio"] not in (2, -1) or min(shapes[0]) == 0:
        return None
    if any(b.dim() != 2 or b.shape[-1] != 4 or not _finite_moderate(b) for b in box_list):
        return None
    if next(iter(x.values())).shape[1] == 0:
        return None
    return torchvision.ops.MultiScaleRoIAlign(**init)(x, box_list, shapes)


def _draw_grid_anchors(data):
    grid = data.draw(st.sampled_from((((2, 3),), ((0, 2),), ((2, 2), (1, 1)), ((-1, 2),))), label="grid_sizes")
    strides = data.draw(st.sampled_from((((4, 4),) * len(grid), ((0, 4),) * len(grid), ((4, 4),))), label="strides")
    sizes = data.draw(
        st.sampled_from((((16.0,),) * len(grid), ((NAN,),) * len(grid), ((),) * len(grid))), label="sizes"
    )
    ratios = data.draw(st.sampled_from((((0.5, 1.0),) * len(grid), ((0.0,),) * len(grid), ((-1.0,),) * len(grid))))
    return _fixed((grid, strides, sizes, ratios))


def _draw_anchor_generator(data):
    sizes = data.draw(st.sampled_from((((16,),), ((16, 32),), ((NAN,),), ((0,),))), label="sizes")
    ratios = data.draw(st.sampled_from((((1.0,),), ((0.5, 2.0),), ((0.0,),))), label="aspect_ratios")
    h, w = data.draw(st.sampled_from(((8, 8), (0, 8), (5, 3))), label="feature size")
    images = ImageList(torch.zeros(1, 3, 32, 32), [(32, 32)])
    return _fixed(({"sizes": sizes, "aspect_ratios": ratios}, images, [torch.zeros(1, 4, h, w)]))


def _anchor_generator_call(init, images, features):
    return ops.AnchorGenerator(**init)(images, features)


def _anchor_generator_twin(args, kwargs):
    init, images, features = args
    if any(not math.isfinite(s) or s <= 0 for group in init["sizes"] for s in group):
        return None
    if any(r <= 0 for group in init["aspect_ratios"] for r in group):
        return None
    return torchvision.models.detection.anchor_utils.AnchorGenerator(**init)(images, features)


def _draw_match(data):
    b = data.draw(st.sampled_from((1, 1, 2, 0)), label="B")
    g = data.draw(st.integers(0, 3), label="G")
    anchors = boxes(data, label="anchors")
    gt = tensor(data, (b, g, 4), coordinate(), anchors.dtype if anchors.is_floating_point() else torch.float32, "gt")
    counts = data.draw(st.sampled_from(("all", "zero", "over", "list")), label="gt_count")
    gt_count = {
        "all": torch.full((b,), g),
        "zero": torch.zeros(b, dtype=torch.int64),
        "over": torch.full((b,), g + 1),
        "list": [g] * b,
    }[counts]
    high = scalar(data, (0.7,), "high")
    low = scalar(data, (0.3,), "low")
    allow = data.draw(st.booleans(), label="allow_low_quality_matches")
    return _fixed((anchors, gt, gt_count, high, low, allow))


def _match_twin(args, kwargs):
    anchors, gt, gt_count, high, low, allow = args
    if gt.shape[0] != 1 or gt.shape[1] == 0 or anchors.dim() != 2 or anchors.shape[-1] != 4:
        return None
    if not isinstance(gt_count, torch.Tensor) or int(gt_count[0]) != gt.shape[1]:
        return None
    if not (isinstance(high, float) and isinstance(low, float) and low <= high) or anchors.dtype != gt.dtype:
        return None
    return Matcher(high, low, allow)(torchvision.ops.box_iou(gt[0], anchors))[None]


def _draw_sample_balanced(data):
    b, a = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 6))
    matched = tensor(data, (b, a), st.sampled_from((-2, -1, 0, 1, 3)), torch.int64, "matched_idx")
    size = small_int(data, (4, 2), "batch_size_per_image")
    fraction = scalar(data, (0.5, 0.25), "positive_fraction")
    return lambda: ((matched, size, fraction), {"generator": torch.Generator().manual_seed(0)})


def _draw_anchor_targets(data):
    args, _ = _draw_match(data)()
    anchors, gt, gt_count, *_ = args
    kwargs = {
        "fg_iou_thresh": scalar(data, (0.7,), "fg_iou_thresh"),
        "bg_iou_thresh": scalar(data, (0.3,), "bg_iou_thresh"),
        "batch_size_per_image": small_int(data, (4,), "batch_size_per_image"),
        "positive_fraction": scalar(data, (0.5,), "positive_fraction"),
    }
    return lambda: ((anchors, gt, gt_count), {**kwargs, "generator": torch.Generator().manual_seed(0)})


def _draw_proposal_targets(data):
    args, _ = _draw_match(data)()
    _, gt, gt_count, *_ = args
    b = gt.shape[0]
    proposals = tensor(data, (b, data.draw(st.integers(0, 4)), 4), coordinate(), gt.dtype, "proposals")
    labels = tensor(data, gt.shape[:2], st.sampled_from((1, 2, 0, -1, 99)), torch.int64, "gt_labels")
    kwargs = {
        "num_classes": small_int(data, (3,), "num_classes"),
        "batch_size_per_image": small_int(data, (4,), "batch_size_per_image"),
        "fg_iou_thresh": scalar(data, (0.5,), "fg_iou_thresh"),
    }
    return lambda: ((proposals, gt, labels, gt_count), {**kwargs, "generator": torch.Generator().manual_seed(0)})


def _draw_rpn_proposals(data):
    b = data.draw(st.sampled_from((1, 2, 0)), label="B")
    levels = data.draw(st.sampled_from((((4, 4),), ((4, 4), (2, 2)), ((0, 3),))), label="levels")
    a = 2
    special = st.sampled_from((0.0, 0.5, -1.0, 3.0, NAN, INF, -INF))
    objectness = [tensor(data, (b, a, h, w), special, label="objectness") for h, w in levels]
    deltas = [tensor(data, (b, 4 * a, h, w), special, label="deltas") for h, w in levels]
    image_sizes = tensor(data, (b, 2), st.sampled_from((32, 16, 0)), torch.int64, "image_sizes")
    kwargs = {
        "anchor_sizes": ((16,),) * len(levels),
        "aspect_ratios": ((0.5, 1.0),) * len(levels),
        "strides": tuple((8, 8) for _ in levels),
        "pre_nms_top_n": small_int(data, (6, 2), "pre_nms_top_n"),
        "post_nms_top_n": small_int(data, (3,), "post_nms_top_n"),
        "nms_thresh": scalar(data, (0.7,), "nms_thresh"),
        "min_size": scalar(data, (1e-3,), "min_size"),
    }
    return _fixed((objectness, deltas, image_sizes), kwargs)


def _draw_postprocess(data):
    b, r, c = data.draw(st.sampled_from((1, 2, 0))), data.draw(st.integers(0, 3)), data.draw(st.sampled_from((2, 3)))
    special = st.sampled_from((0.0, 0.5, -1.0, 3.0, NAN, INF, -INF))
    logits = tensor(data, (b * r, c), special, label="class_logits")
    regression = tensor(data, (b * r, 4 * c), special, label="box_regression")
    proposals = tensor(data, (b, r, 4), coordinate(), label="proposals")
    num_valid = tensor(data, (b,), st.sampled_from((r, 0, r + 1)), torch.int64, "num_valid")
    image_sizes = tensor(data, (b, 2), st.sampled_from((32, 0)), torch.int64, "image_sizes")
    kwargs = {
        "score_thresh": scalar(data, (0.05,), "score_thresh"),
        "nms_thresh": scalar(data, (0.5,), "nms_thresh"),
        "detections_per_img": small_int(data, (3,), "detections_per_img"),
    }
    return _fixed((logits, regression, proposals, num_valid, image_sizes), kwargs)


# Mask probabilities: ordinary, the ends of [0, 1], beyond them and non-finite.
MASK_VALUES = st.one_of(st.sampled_from((0.0, 1.0, 0.25, 0.5, 2.0, -1.0, NAN, INF)), st.floats(0, 1, width=32))


def _mask_size(data) -> int:
    return data.draw(st.sampled_from((3, 3, 2, 1, 0)), label="M")


def _padded_boxes(data, batch: int, slots: int, label: str) -> torch.Tensor:
    """``[batch, slots, 4]`` xyxy boxes; sometimes a wrong last dimension or rank."""
    shape = data.draw(
        st.sampled_from(((batch, slots, 4),) * 6 + ((batch, slots, 3), (slots, 4))), label=f"{label} shape"
    )
    return tensor(data, shape, coordinate(), float_dtype(data), label)


def _pastes_inside(boxes: torch.Tensor, mask_size: int, padding: int, height: int, width: int) -> bool:
    """Every box, finite and grown as torchvision's paste grows it, overlaps the image: torchvision
    casts non-finite corners to int, and its slices fail or wrap around for a box outside the image."""
    if not _finite_moderate(boxes):
        return False
    grown = expand_boxes(boxes, (mask_size + 2 * padding) / mask_size).to(torch.int64)
    x1, y1, x2, y2 = grown.unbind(1)
    overlaps_x = x1.clamp(min=0) < (x2 + 1).clamp(max=width)
    overlaps_y = y1.clamp(min=0) < (y2 + 1).clamp(max=height)
    return bool((overlaps_x & overlaps_y).all())


def _draw_paste(data):
    k, m = data.draw(st.integers(0, 3), label="K"), _mask_size(data)
    shape = data.draw(st.sampled_from(((k, 1, m, m),) * 6 + ((k, 2, m, m), (k, m, m))), label="masks shape")
    masks = tensor(data, shape, MASK_VALUES, float_dtype(data), "masks")
    img_shape = data.draw(
        st.sampled_from(((6, 7),) * 4 + ((4, 4), (0, 5), (6, 0), (-1, 5), (6,), "67", None)), label="img_shape"
    )
    padding = small_int(data, (1, 1, 0, 2), "padding", (-1, 2.5, True, "1"))
    return _fixed((masks, boxes(data, k), img_shape, padding))


def _paste_twin(args, kwargs):
    masks, b, (height, width), padding = args
    if not _pastes_inside(b, masks.shape[-1], padding, height, width):
        return None
    return torchvision_paste(masks, b, (height, width), padding)


def _draw_paste_padded(data):
    batch, slots, m = data.draw(st.sampled_from((1, 2, 0)), label="B"), data.draw(st.integers(0, 2)), _mask_size(data)
    masks = tensor(data, (batch, slots, m, m), MASK_VALUES, float_dtype(data), "masks")
    padded_boxes = _padded_boxes(data, batch, slots, "boxes")
    counts = st.sampled_from((slots,) * 3 + (0, slots + 1, -1))
    num_valid = tensor(
        data,
        (batch,),
        counts,
        data.draw(st.sampled_from((torch.int64,) * 4 + (torch.int32, torch.float32))),
        "num_valid",
    )
    image_sizes = tensor(data, (batch, 2), st.sampled_from((6, 6, 4, 0, 9)), torch.int64, "image_sizes")
    out_hw = data.draw(st.sampled_from(((6, 6),) * 4 + ((7, 5), (0, 0), (-1, 6), "66")), label="out_hw")
    threshold = data.draw(st.sampled_from((0.5, 0.5, None, 0.0, -1.0, NAN, "0.5")), label="threshold")
    out_dtype = data.draw(
        st.sampled_from((torch.bool,) * 3 + (torch.uint8, torch.float32, torch.float64, torch.int64)), label="out_dtype"
    )
    return _fixed(
        (masks, padded_boxes, num_valid, image_sizes, out_hw), {"threshold": threshold, "out_dtype": out_dtype}
    )


def _paste_padded_twin(args, kwargs):
    """Per image, torchvision's paste at the image's size then ``> threshold``; zero elsewhere."""
    masks, padded_boxes, num_valid, image_sizes, (height, width) = args
    threshold, out_dtype = kwargs["threshold"], kwargs["out_dtype"]
    if threshold is not None and not isinstance(threshold, float):
        return None
    out = torch.zeros((*masks.shape[:2], height, width), dtype=out_dtype)
    for image, (count, (image_height, image_width)) in enumerate(
        zip(num_valid.tolist(), image_sizes.tolist(), strict=True)
    ):
        valid_boxes = padded_boxes[image, :count]
        if image_height > height or image_width > width:
            return None
        if not _pastes_inside(valid_boxes, masks.shape[-1], 1, image_height, image_width):
            return None
        pasted = torchvision_paste(masks[image, :count, None], valid_boxes, (image_height, image_width))[:, 0]
        pasted = pasted if threshold is None else pasted > threshold
        out[image, :count, :image_height, :image_width] = pasted.to(out_dtype)
    return out


def _draw_mask_targets(data):
    batch, g, slots = (
        data.draw(st.sampled_from((1, 2, 0)), label="B"),
        data.draw(st.integers(0, 2)),
        data.draw(st.integers(0, 3)),
    )
    dtype = data.draw(
        st.sampled_from((torch.uint8, torch.bool, torch.float32, torch.float64, torch.int64)), label="mask dtype"
    )
    binary = st.sampled_from((0.0, 1.0))
    if data.draw(st.booleans(), label="as list"):
        sizes = [data.draw(st.sampled_from(((6, 5), (4, 7), (0, 3))), label="mask size") for _ in range(batch)]
        gt_masks = [tensor(data, (g, *size), binary, dtype, "gt_masks") for size in sizes]
    else:
        size = data.draw(st.sampled_from(((6, 5), (6, 5), (0, 3))), label="mask size")
        gt_masks = tensor(data, (batch, g, *size), binary, dtype, "gt_masks")
    gt_count = tensor(data, (batch,), st.sampled_from((g, g, 0, g + 1)), torch.int64, "gt_count")
    proposals = _padded_boxes(data, batch, slots, "proposals")
    matched = tensor(data, (batch, slots), st.sampled_from((0, 0, 1, -1, 5)), torch.int64, "matched_idxs")
    num_valid = tensor(data, (batch,), st.sampled_from((slots, slots, 0, slots + 1)), torch.int64, "num_valid")
    return _fixed(
        (gt_masks, gt_count, proposals, matched, num_valid, small_int(data, (3, 2, 1), "M", (0, -1, 2.5, True, "3")))
    )


def _mask_targets_twin(args, kwargs):
    """Per image, torchvision's ``project_masks_on_boxes`` of the valid proposals matched to a real
    mask (fp32); zero elsewhere."""
    gt_masks, gt_count, proposals, matched, num_valid, m = args
    out = torch.zeros((*proposals.shape[:2], m, m))
    for image, (masks, count, used) in enumerate(zip(gt_masks, gt_count.tolist(), num_valid.tolist(), strict=True)):
        rows = ((matched[image, :used] >= 0) & (matched[image, :used] < count)).nonzero()[:, 0]
        if not rows.numel():
            continue
        if 0 in masks.shape[-2:] or not _finite_moderate(proposals[image, rows]):
            return None  # roi_align of an empty mask, or of corners torchvision casts to int
        out[image, rows] = project_masks_on_boxes(masks, proposals[image, rows], matched[image, rows], m).float()
    return out


def _draw_mask_loss(data):
    k, classes, m = (
        data.draw(st.integers(0, 3), label="K"),
        data.draw(st.sampled_from((1, 2))),
        data.draw(st.sampled_from((2, 3))),
    )
    dtype = float_dtype(data)
    special = st.sampled_from((0.0, 0.5, -1.0, 3.0, 100.0, NAN, INF, -INF))
    shape = data.draw(
        st.sampled_from(((k, classes, m, m),) * 6 + ((k, classes, m, m + 1), (k, m, m))), label="logits shape"
    )
    logits = tensor(data, shape, special, dtype, "mask_logits")
    labels = tensor(data, (k,), st.sampled_from((0,) * 3 + (classes - 1, -1, classes)), torch.int64, "labels")
    if data.draw(st.booleans(), label="float labels"):
        labels = labels.float()
    targets = tensor(data, (k, m, m), st.sampled_from((0.0, 1.0, 0.5, NAN)), dtype, "targets")
    weights = None
    if data.draw(st.booleans(), label="weights"):
        weights = tensor(data, (k,), st.sampled_from((1.0, 1.0, 0.0, 0.5, -1.0, NAN)), dtype, "weights")
    return _fixed((logits, labels, targets), {"weights": weights})


def _mask_loss_twin(args, kwargs):
    """``maskrcnn_loss``'s value: binary cross-entropy with logits of each RoI's labelled channel."""
    logits, labels, targets = args
    if kwargs["weights"] is not None:
        return None
    if targets.numel() == 0:
        return logits.sum() * 0
    return F.binary_cross_entropy_with_logits(logits[torch.arange(labels.shape[0]), labels], targets)


def _tv_pool(name):
    return getattr(torchvision.ops, name)


FUNCTIONS: dict[str, Callable] = {name: getattr(ops, name) for name in ops.__all__}
CASES: dict[str, Case] = {
    "box_iou": Case(_draw_box_iou, lambda a, k: torchvision.ops.box_iou(*a) if k["fmt"] == "xyxy" else None),
    "generalized_box_iou": Case(_draw_pair_iou, lambda a, k: torchvision.ops.generalized_box_iou(*a)),
    "complete_box_iou": Case(_draw_eps_iou, lambda a, k: torchvision.ops.complete_box_iou(*a, **k)),
    "distance_box_iou": Case(_draw_eps_iou, lambda a, k: torchvision.ops.distance_box_iou(*a, **k)),
    "batched_box_iou": Case(_draw_batched_box_iou),
    "nms": Case(_draw_nms, _nms_twin),
    "batched_nms": Case(_draw_batched_nms, _batched_nms_twin),
    "batched_nms_padded": Case(_draw_batched_nms_padded),
    "soft_nms": Case(_draw_soft_nms),
    "encode_boxes": Case(_draw_encode, _encode_twin),
    "decode_boxes": Case(_draw_decode, _decode_twin),
    "roi_align": Case(_draw_roi_align, _pool_twin(_tv_pool("roi_align"))),
    "roi_pool": Case(_draw_pool(False, False), _pool_twin(_tv_pool("roi_pool"))),
    "ps_roi_align": Case(_draw_pool(True, True), _pool_twin(_tv_pool("ps_roi_align"))),
    "ps_roi_pool": Case(_draw_pool(True, False), _pool_twin(_tv_pool("ps_roi_pool"))),
    "crop_pool": Case(_draw_crop_pool),
    "MultiScaleRoIAlign": Case(_draw_multiscale, _multiscale_twin, examples=20),
    "grid_anchors": Case(_draw_grid_anchors),
    "AnchorGenerator": Case(_draw_anchor_generator, _anchor_generator_twin),
    "match_boxes": Case(_draw_match, _match_twin),
    "sample_balanced": Case(_draw_sample_balanced),
    "anchor_targets": Case(_draw_anchor_targets),
    "proposal_targets": Case(_draw_proposal_targets),
    "rpn_proposals": Case(_draw_rpn_proposals, examples=20),
    "postprocess_detections": Case(_draw_postprocess, examples=20),
    "paste_masks_in_image": Case(_draw_paste, _paste_twin),
    "paste_masks_padded": Case(_draw_paste_padded, _paste_padded_twin),
    "mask_targets": Case(_draw_mask_targets, _mask_targets_twin),
    "mask_loss": Case(_draw_mask_loss, _mask_loss_twin),
}
FUNCTIONS["MultiScaleRoIAlign"] = _multiscale_call
FUNCTIONS["AnchorGenerator"] = _anchor_generator_call
MODULE_FUNCTIONAL = {
    "RoIAlign": "roi_align",
    "RoIPool": "roi_pool",
    "PSRoIAlign": "ps_roi_align",
    "PSRoIPool": "ps_roi_pool",
}
for _module, _init in (
    ("RoIAlign", ("output_size", "spatial_scale", "sampling_ratio", "aligned")),
    ("RoIPool", ("output_size", "spatial_scale")),
    ("PSRoIAlign", ("output_size", "spatial_scale", "sampling_ratio")),
    ("PSRoIPool", ("output_size", "spatial_scale")),
):
    _functional = MODULE_FUNCTIONAL[_module]
    FUNCTIONS[_module], CASES[_module] = _module_case(
        getattr(ops, _module), getattr(torchvision.ops, _module), CASES[_functional].draw, _init
    )


# What the fuzz finds that is not fixed yet, by op: the class of the outcome and an example.
KNOWN_FAILURES: dict[str, str] = {}


def _with_known_failure(name: str):
    if name not in KNOWN_FAILURES:
        return name
    return pytest.param(name, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[name], strict=False))


def _argument_names(name: str) -> set[str]:
    """The op's parameter names (a module's constructor and forward): what a named error names."""
    target = getattr(ops, name)
    functions = (target.__init__, target.forward) if isinstance(target, type) else (target,)
    if name in MODULE_FUNCTIONAL:  # the module's errors come from its functional op (``boxes`` for ``rois``)
        functions += (getattr(ops, MODULE_FUNCTIONAL[name]),)
    return {p for f in functions for p in inspect.signature(f).parameters if p != "self"}


# ----------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------


def _input_dtype(args) -> torch.dtype:
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return tensors[0].dtype if tensors else torch.float32


def assert_same(actual, expected, input_dtype: torch.dtype, where: str = "result") -> None:
    """Same structure, dtypes and shapes; values within the dtype's tolerance, NaN where NaN."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual).__name__} instead of a tensor"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        atol, rtol = TOLERANCES.get(input_dtype, TOLERANCES[torch.float32])
        torch.testing.assert_close(
            actual, expected, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{where}: {m}"
        )
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), f"{where}: structure differs"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, input_dtype, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def _call(name, make):
    args, kwargs = make()
    return FUNCTIONS[name](*args, **kwargs)


def _reference_result(name, make, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setenv(_backend.BACKEND_VARIABLE, "reference")
        return _call(name, make)


def check_example(name: str, case: Case, make, monkeypatch) -> None:
    """Run one example and fail unless its outcome is one of the three allowed classes."""
    try:
        with time_limit(TIME_LIMIT):
            result = _call(name, make)
    except (ValueError, TypeError) as error:
        names = _argument_names(name)
        assert any(n in str(error) for n in names), (
            f"{type(error).__name__} names no argument of {name} {sorted(names)}: {error}"
        )
        return
    args, kwargs = make()
    expected = None
    if case.twin is not None:
        try:
            expected = case.twin(args, kwargs)
        except Exception:  # torchvision rejects what we accept: our reference decides
            expected = None
    if expected is None:
        with time_limit(TIME_LIMIT):
            expected = _reference_result(name, make, monkeypatch)
    assert_same(result, expected, _input_dtype(args))


def _pair(n=2):
    return torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 5.0, 6.0]])[:n]


def _scalar_cases():
    """(op, the argument, a call with it None or a str): the findings of the fuzz, one per argument."""
    boxes = _pair()
    gt, count = boxes[None], torch.tensor([2])
    rpn = (
        [torch.zeros(1, 2, 2, 2)],
        [torch.zeros(1, 8, 2, 2)],
        torch.tensor([[16, 16]]),
        ((16,),),
        ((0.5, 1.0),),
        (8,),
        4,
        2,
    )
    post = (torch.zeros(2, 3), torch.zeros(2, 12), boxes[None], torch.tensor([2]), torch.tensor([[16, 16]]))
    return [
        ("eps", lambda v: ops.complete_box_iou(boxes, boxes, eps=v)),
        ("eps", lambda v: ops.distance_box_iou(boxes, boxes, eps=v)),
        ("bbox_xform_clip", lambda v: ops.decode_boxes(torch.zeros(2, 4), boxes, (1, 1, 1, 1), v)),
        ("high", lambda v: ops.match_boxes(boxes, gt, count, v, 0.3)),
        ("low", lambda v: ops.match_boxes(boxes, gt, count, 0.7, v)),
        ("fg_iou_thresh", lambda v: ops.anchor_targets(boxes, gt, count, fg_iou_thresh=v)),
        ("bg_iou_thresh", lambda v: ops.anchor_targets(boxes, gt, count, bg_iou_thresh=v)),
        ("positive_fraction", lambda v: ops.anchor_targets(boxes, gt, count, positive_fraction=v)),
        ("fg_iou_thresh", lambda v: ops.proposal_targets(gt, gt, torch.ones(1, 2, dtype=torch.int64), count, 3, fg_iou_thresh=v)),
        ("bg_iou_thresh_low", lambda v: ops.proposal_targets(gt, gt, torch.ones(1, 2, dtype=torch.int64), count, 3, bg_iou_thresh_low=v)),
        ("nms_thresh", lambda v: ops.rpn_proposals(*rpn, nms_thresh=v)),
        ("min_size", lambda v: ops.rpn_proposals(*rpn, min_size=v)),
        ("score_thresh", lambda v: ops.rpn_proposals(*rpn, score_thresh=v)),
        ("score_thresh", lambda v: ops.postprocess_detections(*post, score_thresh=v)),
        ("nms_thresh", lambda v: ops.postprocess_detections(*post, nms_thresh=v)),
        ("min_size", lambda v: ops.postprocess_detections(*post, min_size=v)),
    ]  # fmt: skip


@pytest.mark.parametrize("value", [None, "0.5"])
@pytest.mark.parametrize("name,call", _scalar_cases(), ids=[f"{i}-{case[0]}" for i, case in enumerate(_scalar_cases())])
def test_float_arguments_of_the_wrong_type_are_named(name, call, value):
    with pytest.raises(errors.ArgumentTypeError, match=f"^{name} must be a real number"):
        call(value)


@pytest.mark.parametrize("image_shapes", [[(0, 0)], [(0, 32), (0, 20)]])
def test_multiscale_roi_align_names_a_zero_image_height(image_shapes):
    """torchvision divides by the image height (ZeroDivisionError); ours names the argument."""
    x = {"p2": torch.rand(len(image_shapes), 2, 8, 8)}
    boxes = [_pair() for _ in image_shapes]
    with pytest.raises(errors.ArgumentValueError, match="image_shapes"):
        ops.MultiScaleRoIAlign(["p2"], 2, 2)(x, boxes, image_shapes)


def test_multiscale_roi_align_nan_and_inverted_boxes_pool_to_zeros_on_every_backend(monkeypatch):
    """A NaN or negative box area is on no level (torchvision's CPU LevelMapper): zeros on every
    backend, never an int64 cast of NaN (an IndexError in the reference before)."""
    generator = torch.Generator().manual_seed(2)
    x = {"p2": torch.randn(1, 2, 8, 8, generator=generator), "p3": torch.randn(1, 2, 4, 4, generator=generator)}
    boxes = [torch.tensor([[0.0, 0.0, 0.0, NAN], [9.0, 1.0, 2.0, 30.0], [1.0, 2.0, 20.0, 25.0]])]
    pooled = {}
    for backend in ("triton", "reference", "cpu"):
        monkeypatch.setenv(_backend.BACKEND_VARIABLE, backend)
        pooled[backend] = ops.MultiScaleRoIAlign(["p2", "p3"], 2, 2)(x, boxes, [(32, 32)])
    assert_same(pooled["reference"], pooled["triton"], torch.float32)
    assert_same(pooled["cpu"], pooled["triton"], torch.float32)
    assert torch.equal(pooled["triton"][:2], torch.zeros_like(pooled["triton"][:2]))


def test_every_public_op_has_a_strategy():
    assert sorted(CASES) == sorted(ops.__all__)


def _fuzz(examples_of, phases):
    @pytest.mark.parametrize("name", [_with_known_failure(name) for name in sorted(CASES)])
    def test(name, backend, monkeypatch):
        case = CASES[name]

        @settings(
            max_examples=examples_of(case),
            phases=phases,
            derandomize=True,
            database=None,
            deadline=None,  # TIME_LIMIT bounds each example, including a hang
            suppress_health_check=[
                HealthCheck.function_scoped_fixture,
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
            ],
        )
        @given(data=st.data())
        def run(data):
            check_example(name, case, case.draw(data), monkeypatch)

        run()

    return test


# CI: no shrinking (a failure prints its drawn arguments; derandomized, it reproduces as is).
test_fuzz = _fuzz(lambda case: case.examples, (Phase.explicit, Phase.generate))
test_fuzz_many = pytest.mark.slow(_fuzz(lambda case: SLOW_EXAMPLES, tuple(Phase)))
