"""torchvision conformance at the API level: every op torchvision has compiles under
``torch.jit.script`` and stays one leaf under ``torch.fx``; quantized inputs go to torchvision's
kernels; argument errors are caught by the ``except`` clauses written for torchvision; the
patched ``torchvision::`` ops keep torchvision's schema, dtypes and checks."""

import warnings

import pytest
import torch
import torchvision
from torchvision.models.detection.image_list import ImageList

from tritondet import errors, ops, patch_torchvision, unpatch_torchvision
from tritondet.bench.inputs import random_boxes
from tritondet.detector import FasterRCNN, tiny


def _features():
    return torch.rand(2, 8, 10, 12, generator=torch.Generator().manual_seed(2))


def _rois():
    return torch.tensor([[0, 0, 0, 9, 9], [1, 0, 5, 4, 9], [0, 5, 5, 11.5, 9], [1, 2, 1, 3, 2]])


def _box_list():
    return [torch.tensor([[0, 0, 9, 9.0], [5, 5, 11.5, 9]]), torch.tensor([[0, 5, 4, 9.0]])]


def _nms_inputs():
    generator = torch.Generator().manual_seed(0)
    return random_boxes(30, generator=generator), torch.rand(30, generator=generator)


def _pairwise_inputs():
    generator = torch.Generator().manual_seed(1)
    return random_boxes(5, generator=generator), random_boxes(7, generator=generator)


def _multiscale_inputs():
    generator = torch.Generator().manual_seed(3)
    sizes = {"p2": 16, "p3": 8, "pool": 4}
    features = {name: torch.rand(2, 4, size, size, generator=generator) for name, size in sizes.items()}
    return features, _box_list(), [(64, 64), (60, 50)]


# (name, the op or module, its arguments): every op and module of tritondet.ops that torchvision has.
SCRIPTABLE = [
    ("nms", ops.nms, lambda: (*_nms_inputs(), 0.5)),
    ("batched_nms", ops.batched_nms, lambda: (*_nms_inputs(), torch.arange(30) % 3, 0.5)),
    ("box_iou", ops.box_iou, _pairwise_inputs),
    ("generalized_box_iou", ops.generalized_box_iou, _pairwise_inputs),
    ("distance_box_iou", ops.distance_box_iou, _pairwise_inputs),
    ("complete_box_iou", ops.complete_box_iou, _pairwise_inputs),
    ("roi_align", ops.roi_align, lambda: (_features(), _rois(), 3, 0.5, 2, True)),
    ("roi_align list", ops.roi_align, lambda: (_features(), _box_list(), [3, 2], 1.0, -1, False)),
    ("roi_pool", ops.roi_pool, lambda: (_features(), _rois(), (2, 3))),
    ("ps_roi_align", ops.ps_roi_align, lambda: (_features(), _rois(), 2, 1.0, 2)),
    ("ps_roi_pool", ops.ps_roi_pool, lambda: (_features(), _box_list(), 2)),
    ("RoIAlign", ops.RoIAlign((3, 2), 0.5, 2, True), lambda: (_features(), _rois())),
    ("RoIPool", ops.RoIPool(3, 1.0), lambda: (_features(), _box_list())),
    ("PSRoIAlign", ops.PSRoIAlign(2, 1.0, -1), lambda: (_features(), _rois())),
    ("PSRoIPool", ops.PSRoIPool([2, 2], 1.0), lambda: (_features(), _rois())),
    ("MultiScaleRoIAlign", ops.MultiScaleRoIAlign(["p2", "p3"], 3, 2), _multiscale_inputs),
]


@pytest.mark.parametrize("name,op,arguments", SCRIPTABLE, ids=[case[0] for case in SCRIPTABLE])
def test_scripted_ops_equal_eager(name, op, arguments):
    scripted = torch.jit.script(op)
    torch.testing.assert_close(scripted(*arguments()), op(*arguments()))


class _TwoInputs(torch.nn.Module):
    """Calls an op as user code does, through the ``ops`` namespace (or a module of it), with two
    traced inputs and the rest constants."""

    def __init__(self, op, constants):
        super().__init__()
        self.op, self.constants = op, constants

    def forward(self, first, second):
        return self.op(first, second, *self.constants)


class _ThreeInputs(_TwoInputs):
    def forward(self, first, second, third):
        return self.op(first, second, third, *self.constants)


@pytest.mark.parametrize("name,op,arguments", SCRIPTABLE, ids=[case[0] for case in SCRIPTABLE])
def test_fx_symbolic_trace_keeps_the_op_one_leaf(name, op, arguments):
    args = arguments()
    inputs = [a for a in args if isinstance(a, (torch.Tensor, list, dict))]
    constants = [a for a in args if not isinstance(a, (torch.Tensor, list, dict))]
    module = (_TwoInputs if len(inputs) == 2 else _ThreeInputs)(op, constants)
    graph = torch.fx.symbolic_trace(module)
    leaves = [node for node in graph.graph.nodes if node.op in ("call_function", "call_module")]
    assert len(leaves) == 1, graph.code  # none of the op's checks or shape arithmetic is traced
    torch.testing.assert_close(graph(*inputs), module(*inputs))


def test_quantized_roi_align_equals_torchvision():
    x = torch.randint(50, 100, (1, 2, 10, 10)).float()
    rois = torch.tensor([[0, 0, 0, 4, 4], [0, 1, 2, 8, 9.0], [0, 3, 3, 3, 3]])
    for dtype in (torch.qint8, torch.quint8, torch.qint32):
        qx = torch.quantize_per_tensor(x, 2.0, 10, dtype)
        qrois = torch.quantize_per_tensor(rois, 1.0, 0, dtype)
        for aligned in (False, True):
            ours = ops.roi_align(qx, qrois, 3, 1.0, -1, aligned)
            theirs = torchvision.ops.roi_align(qx, qrois, 3, 1.0, -1, aligned)
            assert ours.is_quantized and ours.dtype == theirs.dtype
            assert torch.equal(ours.int_repr(), theirs.int_repr())
    with pytest.raises(ValueError, match="boxes must be a quantized"):
        ops.roi_align(torch.quantize_per_tensor(x, 2.0, 10, torch.quint8), rois, 3)


def test_quantized_nms_equals_torchvision():
    boxes, scores = _nms_inputs()
    qboxes = torch.quantize_per_tensor(boxes * 10, 0.5, 0, torch.quint8)
    qscores = torch.quantize_per_tensor(scores * 100, 1.0, 0, torch.quint8)
    for threshold in (0.2, 0.5, 0.8):
        assert torch.equal(ops.nms(qboxes, qscores, threshold), torchvision.ops.nms(qboxes, qscores, threshold))


def test_error_classes_derive_from_what_torchvision_raises():
    assert issubclass(errors.ArgumentValueError, ValueError) and issubclass(errors.ArgumentValueError, RuntimeError)
    assert issubclass(errors.ArgumentTypeError, TypeError) and issubclass(errors.ArgumentTypeError, RuntimeError)
    assert issubclass(errors.BoxesShapeError, errors.ArgumentValueError)
    assert issubclass(errors.BoxesShapeError, AssertionError)
    for kind in (errors.ArgumentValueError, errors.ArgumentTypeError, errors.BoxesShapeError):
        assert issubclass(kind, errors.TritondetError)


# (call, the error torchvision raises for it or would raise, words of our message naming the argument)
MALFORMED = [
    (lambda: ops.nms(torch.rand(4), torch.rand(3), 0.5), RuntimeError, "boxes must have shape"),
    (lambda: ops.nms(torch.rand(3, 5), torch.rand(3), 0.5), RuntimeError, "boxes must have shape"),
    (lambda: ops.nms(torch.rand(3, 4), torch.rand(3, 2), 0.5), RuntimeError, "scores must have shape"),
    (lambda: ops.nms(torch.rand(4, 4), torch.rand(3), 0.5), RuntimeError, "scores must have shape"),
    (lambda: ops.nms(torch.rand(4, 4).int(), torch.rand(4), 0.5), RuntimeError, "boxes must be a floating"),
    (lambda: ops.roi_align(torch.rand(1, 1, 8, 8), torch.rand(1, 4), 2), AssertionError, "boxes must be a Tensor"),
    (lambda: ops.roi_pool(torch.rand(1, 1, 8, 8), [torch.rand(1, 3)], 2), AssertionError, r"boxes\[0\] must be"),
    (lambda: ops.ps_roi_align(torch.rand(1, 4, 8, 8), torch.rand(1, 4), 2), AssertionError, "boxes must be"),
    (lambda: ops.roi_align(torch.rand(1, 1, 8, 8).int(), torch.rand(1, 5), 2), RuntimeError, "input must be"),
]


@pytest.mark.parametrize("call,torchvision_error,match", MALFORMED)
def test_malformed_inputs_are_caught_as_torchvisions_errors(call, torchvision_error, match):
    with pytest.raises(torchvision_error, match=match) as caught:
        call()
    assert isinstance(caught.value, errors.TritondetError)


def _image_list():
    return ImageList(torch.rand(1, 3, 32, 32), [(32, 32)])


def _rpn_inputs(levels=1, dtypes=(torch.float32,)):
    objectness = [torch.rand(1, 3, 4, 4, dtype=dtypes[i % len(dtypes)]) for i in range(levels)]
    deltas = [torch.rand(1, 12, 4, 4, dtype=dtypes[i % len(dtypes)]) for i in range(levels)]
    return objectness, deltas, torch.tensor([[32, 32]]), ((32,),) * levels, ((0.5, 1.0, 2.0),) * levels


def _postprocess_inputs(num_valid):
    return (torch.rand(6, 3), torch.rand(6, 12), random_boxes(6).reshape(1, 6, 4), num_valid, torch.tensor([[32, 32]]))


x8 = torch.rand(1, 4, 8, 8)
box5 = torch.tensor([[0, 0, 0, 4, 4.0]])
boxes4, scores4 = torch.rand(4, 4), torch.rand(4)

# (call, expected error class, words naming the argument)
BAD_ARGUMENTS = [
    *[
        (lambda op=op: op(x8, box5, 2.0), errors.ArgumentTypeError, "output_size")
        for op in (ops.roi_align, ops.roi_pool, ops.ps_roi_align, ops.ps_roi_pool, ops.crop_pool)
    ],
    (lambda: ops.MultiScaleRoIAlign(["0"], 2.0, 2)({"0": x8}, [box5[:, 1:]], [(8, 8)]), TypeError, "output_size"),
    (lambda: ops.roi_align(x8, box5, (2, 0)), errors.ArgumentValueError, "output_size"),
    (lambda: ops.nms(boxes4, scores4, None), errors.ArgumentTypeError, "iou_threshold"),
    (lambda: ops.nms(boxes4, scores4, "0.5"), errors.ArgumentTypeError, "iou_threshold"),
    (lambda: ops.batched_nms(boxes4, scores4, torch.zeros(4, dtype=torch.int64), None), TypeError, "iou_threshold"),
    (lambda: ops.roi_align(x8, box5, 2, 1.0, 2.5), errors.ArgumentTypeError, "sampling_ratio"),
    (lambda: ops.RoIAlign(2, 1.0, 2.5)(x8, box5), errors.ArgumentTypeError, "sampling_ratio"),
    (lambda: ops.ps_roi_align(x8, box5, 2, 1.0, 2.5), errors.ArgumentTypeError, "sampling_ratio"),
    (lambda: ops.roi_align(x8, box5, 2, 1.0, 2, "no"), errors.ArgumentTypeError, "aligned"),
    (lambda: ops.roi_align(x8, box5, 2, float("nan")), errors.ArgumentValueError, "spatial_scale"),
    (lambda: ops.roi_align(x8, box5, 2, float("inf")), errors.ArgumentValueError, "spatial_scale"),
    (lambda: ops.roi_align(x8, box5, 2, 1e30), errors.ArgumentValueError, "spatial_scale"),
    (lambda: ops.roi_pool(x8, box5, 2, "1"), errors.ArgumentTypeError, "spatial_scale"),
    (lambda: ops.soft_nms(boxes4, scores4, sigma="1"), errors.ArgumentTypeError, "sigma"),
    (
        lambda: ops.batched_nms_padded(torch.rand(1, 3, 4), torch.rand(1, 3), None, 4),
        errors.ArgumentTypeError,
        "iou_threshold",
    ),
    (
        lambda: ops.batched_nms_padded(torch.rand(1, 3, 4), torch.rand(1, 3), 0.5, True),
        errors.ArgumentTypeError,
        "max_output",
    ),
    (
        lambda: ops.batched_nms_padded(torch.rand(1, 3, 4), torch.rand(1, 3), 0.5, 4, pre_nms_top_n=2.0),
        errors.ArgumentTypeError,
        "pre_nms_top_n",
    ),
    (
        lambda: ops.postprocess_detections(*_postprocess_inputs(torch.tensor([7]))),
        errors.ArgumentValueError,
        r"num_valid values must lie in \[0, 6\]",
    ),
    (
        lambda: ops.postprocess_detections(*_postprocess_inputs(torch.tensor([-1]))),
        errors.ArgumentValueError,
        "num_valid",
    ),
    (
        lambda: ops.postprocess_detections(*_postprocess_inputs(torch.tensor([3])), detections_per_img=True),
        errors.ArgumentTypeError,
        "detections_per_img",
    ),
    (lambda: ops.rpn_proposals(*_rpn_inputs(), [8.0], 10, 5), errors.ArgumentTypeError, "strides"),
    (lambda: ops.rpn_proposals(*_rpn_inputs(), [(8, 8.0)], 10, 5), errors.ArgumentTypeError, "strides"),
    (lambda: ops.rpn_proposals(*_rpn_inputs(), [0], 10, 5), errors.ArgumentValueError, "strides"),
    (lambda: ops.rpn_proposals(*_rpn_inputs(6), [8] * 6, 10, 5), errors.ArgumentValueError, "at most 5 levels"),
    (
        lambda: ops.rpn_proposals(*_rpn_inputs(2, (torch.float32, torch.float64)), [8, 16], 10, 5),
        errors.ArgumentTypeError,
        "dtype",
    ),
    (lambda: ops.rpn_proposals(*_rpn_inputs(), [8], 10.0, 5), errors.ArgumentTypeError, "pre_nms_top_n"),
    (
        lambda: ops.AnchorGenerator(((32,),), ((1.0,),))(_image_list(), [torch.rand(1, 3, 0, 4)]),
        errors.ArgumentValueError,
        r"feature_maps\[0\]",
    ),
]


@pytest.mark.parametrize("call,error,match", BAD_ARGUMENTS)
def test_bad_arguments_raise_named_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_forward_padded_rejects_image_sizes_outside_the_batch():
    model = FasterRCNN(tiny()).eval()
    images = torch.rand(1, 3, 64, 48)
    for sizes, match in (([[65, 48]], "heights"), ([[64, 0]], "widths"), ([[0, 48]], "heights")):
        with pytest.raises(errors.ArgumentValueError, match=match):
            model.forward_padded(images, torch.tensor(sizes))


def test_batched_nms_of_empty_boxes_returns_early_as_torchvision():
    expected = torchvision.ops.batched_nms(torch.empty((0,)), None, None, None)
    for boxes in (torch.empty((0,)), torch.empty((0, 4))):
        result = ops.batched_nms(boxes, None, None, None)
        assert result.dtype == expected.dtype == torch.int64 and result.shape == expected.shape == (0,)


def test_rotated_box_iou_stays_torchvisions_where_torchvision_names_are_rebound(monkeypatch):
    boxes = torch.tensor([[5.0, 5, 4, 4, 0], [6, 5, 4, 2, 30]])
    expected = torchvision.ops.box_iou(boxes, boxes, fmt="cxcywhr")
    monkeypatch.setattr(torchvision.ops.boxes, "box_iou", ops.box_iou)
    monkeypatch.setattr(torchvision.ops, "box_iou", ops.box_iou)
    torch.testing.assert_close(ops.box_iou(boxes, boxes, fmt="cxcywhr"), expected)


@pytest.fixture
def patched():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
        patch_torchvision(devices=("CUDA", "CPU"))
    yield
    unpatch_torchvision()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_patched_roi_pool_returns_an_int32_argmax_and_passes_opcheck(patched, backend, dtype):
    x = torch.rand(2, 3, 8, 9, dtype=dtype, requires_grad=True)
    rois = _rois()[:, :5].to(dtype)
    _, argmax = torch.ops.torchvision.roi_pool(x, rois, 1.0, 2, 3)
    assert argmax.dtype == torch.int32
    assert torch.ops.tritondet.roi_pool(x, rois, 1.0, 2, 3)[1].dtype == torch.int32
    torch.library.opcheck(torch.ops.torchvision.roi_pool.default, (x, rois, 1.0, 2, 3))
    torch.library.opcheck(torch.ops.tritondet.roi_pool.default, (x, rois, 1.0, 2, 3))


@pytest.mark.parametrize(
    "boxes,scores,match",
    [
        (torch.rand(4, 4), torch.rand(3), "scores must have shape"),
        (torch.rand(4), torch.rand(4), "boxes must have shape"),
        (torch.rand(4, 5), torch.rand(4), "boxes must have shape"),
        (torch.rand(4, 4), torch.rand(4, 1), "scores must have shape"),
        (torch.rand(4, 4), torch.rand(4).double(), "same dtype"),
        (torch.rand(4, 4).int(), torch.rand(4), "boxes must be a floating"),
    ],
)
def test_patched_nms_checks_its_inputs_as_torchvision(patched, backend, boxes, scores, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.torchvision.nms(boxes, scores, 0.5)


def test_patched_roi_align_raises_on_a_bad_batch_index_as_ops_does(patched):
    x, rois = _features(), torch.tensor([[5, 0, 0, 4, 4.0]])
    with pytest.raises(ValueError, match="batch index") as patched_error:
        torchvision.ops.roi_align(x, rois, 2)
    with pytest.raises(ValueError, match="batch index") as ops_error:
        ops.roi_align(x, rois, 2)
    assert type(patched_error.value) is type(ops_error.value)


def _non_finite_map(channels: int) -> torch.Tensor:
    """``[1, channels, 7, 8]`` with inf, -inf and NaN pixels, none at (0, 0): torchvision's CPU
    RoIAlign multiplies a sample off the map by 0 at pixel (0, 0) (CUDA's kernel and ours skip it)."""
    x = torch.randn(1, channels, 7, 8, generator=torch.Generator().manual_seed(4))
    x[0, 0, 3, 4] = float("inf")
    x[0, -1, 6, 7] = float("-inf")
    x[0, channels // 2, 1, 2] = float("nan")
    x[0, 1, 4, 4] = float("inf")
    return x


# Boxes on the map, inverted, partly and wholly off it, and of zero size, in half pixels (sample
# positions on whole pixels: taps of weight 0), large enough for bins of 3 samples and more.
_SIGNED_ROIS = torch.tensor(
    [
        [0, 0.0, 0.0, 7.0, 6.0],
        [0, 7.5, 6.0, 0.5, 1.0],
        [0, -2.0, -3.0, 4.5, 5.0],
        [0, -1.0, -2.0, -4.0, -4.5],
        [0, -8.0, -0.5, -0.5, -6.5],
        [0, -0.3, -0.2, -7.5, -6.5],
        [0, 3.0, 3.0, 3.0, 3.0],
        [0, 12.0, 1.0, 20.0, 5.0],
    ]
)


@pytest.mark.parametrize("spatial_scale", [1.0, -1.0, -0.5])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("op", ["roi_align", "roi_align_aligned", "ps_roi_align"])
def test_non_finite_features_and_negative_scales_pool_as_torchvision(backend, op, spatial_scale, sampling_ratio):
    """Forward and backward (with a non-finite gradient too): NaN exactly where torchvision has
    NaN, inf where inf, whatever the sign of the scale or of the boxes."""
    name = op.removesuffix("_aligned")
    kwargs = {"output_size": 2, "spatial_scale": spatial_scale, "sampling_ratio": sampling_ratio}
    if name == "roi_align":
        kwargs["aligned"] = op.endswith("_aligned")
    rois = _SIGNED_ROIS
    if sampling_ratio <= 0:
        # An adaptive grid has no sample in a box of no extent on the map: torchvision divides
        # 0 by 0 there, our ops return 0 (tests/kernels cover it).
        offset = 0.5 if kwargs.get("aligned", True) else 0.0
        width = (rois[:, 3] * spatial_scale - offset) - (rois[:, 1] * spatial_scale - offset)
        height = (rois[:, 4] * spatial_scale - offset) - (rois[:, 2] * spatial_scale - offset)
        if not kwargs.get("aligned", True):
            width, height = width.clamp(min=1.0), height.clamp(min=1.0)
        rois = rois[(width > 0) & (height > 0)]
    x = _non_finite_map(8)
    grad = torch.randn(rois.shape[0], 8 // 4 if name == "ps_roi_align" else 8, 2, 2)
    grad[1, 0, 1, 1] = float("inf")
    results = []
    for pool in (getattr(ops, name), getattr(torchvision.ops, name)):
        features = x.clone().requires_grad_()
        pooled = pool(features, rois, **kwargs)
        pooled.backward(grad)
        results.append((pooled.detach(), features.grad))
    (ours, our_grad), (theirs, their_grad) = results
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    torch.testing.assert_close(our_grad, their_grad, equal_nan=True)
