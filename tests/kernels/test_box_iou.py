"""The IoU family against torchvision and our reference, on both backends."""

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tolerances import FLOAT_DTYPES, assert_close
from tritondet import ops
from tritondet.bench.inputs import random_boxes, special_boxes
from tritondet.kernels.box_iou import pairwise_iou_reference

FUNCTIONS = {
    "iou": "box_iou",
    "giou": "generalized_box_iou",
    "diou": "distance_box_iou",
    "ciou": "complete_box_iou",
}


def both(kind, boxes1, boxes2, **kwargs):
    name = FUNCTIONS[kind]
    return getattr(ops, name)(boxes1, boxes2, **kwargs), getattr(torchvision.ops, name)(boxes1, boxes2, **kwargs)


@pytest.mark.parametrize("kind", list(FUNCTIONS))
@pytest.mark.parametrize("n,m", [(0, 5), (5, 0), (0, 0), (1, 1), (7, 129), (129, 7), (1000, 31)])
def test_matches_torchvision_on_random_boxes(backend, device, kind, n, m):
    generator = torch.Generator().manual_seed(n * 1000 + m)
    boxes1 = random_boxes(n, generator=generator).to(device)
    boxes2 = random_boxes(m, generator=generator).to(device)
    ours, theirs = both(kind, boxes1, boxes2)
    assert ours.shape == theirs.shape == (n, m)
    assert ours.dtype == theirs.dtype
    assert_close(ours, theirs, torch.float32)


@pytest.mark.parametrize("kind", list(FUNCTIONS))
# No uint8: torchvision subtracts uint8 corners before upcasting, which wraps around.
@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.int64, torch.int32])
def test_dtypes_follow_torchvision(backend, device, kind, dtype):
    generator = torch.Generator().manual_seed(7)
    boxes1 = random_boxes(33, generator=generator, scale=60.0).to(device)
    boxes2 = random_boxes(65, generator=generator, scale=60.0).to(device)
    if not dtype.is_floating_point:
        boxes1, boxes2 = boxes1.round(), boxes2.round()
    boxes1, boxes2 = boxes1.to(dtype), boxes2.to(dtype)
    ours, theirs = both(kind, boxes1, boxes2)
    assert ours.dtype == theirs.dtype
    assert_close(ours, theirs, dtype if dtype in FLOAT_DTYPES else torch.float32)
    # Against our own reference the kernel is exact up to fp32 contraction (FMA) on GPUs.
    assert_close(ours, pairwise_iou_reference(boxes1, boxes2, kind), torch.float32)


# Mixed dtypes: torchvision computes each set's areas (centers, aspect angles) in its own dtype and
# promotes afterwards; an fp32 area added to an fp64 one differs from a promoted-first fp64 area.
MIXED_DTYPES = [
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
    (torch.float16, torch.float32),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.float64),
    (torch.int32, torch.float64),
    (torch.float64, torch.int64),
]


@pytest.mark.parametrize("kind", list(FUNCTIONS))
@pytest.mark.parametrize("dtypes", MIXED_DTYPES, ids=lambda d: "-".join(str(t).removeprefix("torch.") for t in d))
def test_mixed_dtypes_equal_torchvision_bit_for_bit(backend, device, kind, dtypes):
    """Bit for bit torchvision's CPU result (xyxy boxes: torchvision upcasts half-precision
    corners before the areas, as we do) and its dtype, in both argument orders, on the boxes' own
    values (fp64 coordinates that an fp32 area rounds)."""
    generator = torch.Generator().manual_seed(37)
    boxes1 = random_boxes(41, generator=generator).double() + torch.rand(
        41, 4, generator=generator, dtype=torch.float64
    )
    boxes2 = random_boxes(67, generator=generator).double() + torch.rand(
        67, 4, generator=generator, dtype=torch.float64
    )
    boxes1, boxes2 = boxes1.to(dtypes[0]), boxes2.to(dtypes[1])
    name = FUNCTIONS[kind]
    expected = getattr(torchvision.ops, name)(boxes1, boxes2)
    ours = getattr(ops, name)(boxes1.to(device), boxes2.to(device)).cpu()
    assert ours.dtype == expected.dtype
    assert torch.equal(ours, expected)
    if torch.float64 in dtypes and torch.float32 in dtypes:  # promoting first would not be exact
        promoted = getattr(torchvision.ops, name)(boxes1.double(), boxes2.double())
        assert not torch.equal(promoted, expected)


@pytest.mark.parametrize("fmt", ["xywh", "cxcywh"])
@pytest.mark.parametrize("dtypes", MIXED_DTYPES[:2])
def test_mixed_dtypes_in_box_formats_equal_torchvision_bit_for_bit(backend, device, fmt, dtypes):
    """The xywh and cxcywh corners, like the areas, in each set's own dtype."""
    generator = torch.Generator().manual_seed(41)
    boxes1 = random_boxes(23, generator=generator).double() / 3
    boxes2 = random_boxes(19, generator=generator).double() / 7
    boxes1, boxes2 = boxes1.to(dtypes[0]), boxes2.to(dtypes[1])
    expected = torchvision.ops.box_iou(boxes1, boxes2, fmt=fmt)
    ours = ops.box_iou(boxes1.to(device), boxes2.to(device), fmt=fmt).cpu()
    assert ours.dtype == expected.dtype
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_special_boxes_including_nan_positions(backend, device, kind):
    boxes = special_boxes().to(device)
    ours, theirs = both(kind, boxes, boxes)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert_close(ours, theirs, torch.float32)


@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_negative_zero_hull_keeps_its_sign_as_torchvision(backend, device, kind):
    # A degenerate hull of width -0: torch's clamp keeps -0, so the GIoU's hull area is -0 and
    # its quotient +inf rather than -inf.
    boxes1 = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -3.0]], device=device)
    boxes2 = torch.tensor([[0.0, 1.0, 1.0, -0.0]], device=device)
    ours, theirs = both(kind, boxes1, boxes2)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    assert torch.equal(ours.signbit(), theirs.signbit())


@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_huge_and_tiny_coordinates(backend, device, kind):
    generator = torch.Generator().manual_seed(3)
    for scale in (1e6, 1e-2):
        boxes1 = random_boxes(20, generator=generator, scale=scale).to(device)
        boxes2 = random_boxes(17, generator=generator, scale=scale).to(device)
        ours, theirs = both(kind, boxes1, boxes2)
        assert_close(ours, theirs, torch.float32)


@pytest.mark.parametrize("fmt", ["xyxy", "xywh", "cxcywh"])
def test_box_formats(backend, device, fmt):
    generator = torch.Generator().manual_seed(11)
    boxes1 = random_boxes(19, generator=generator).to(device)
    boxes2 = random_boxes(23, generator=generator).to(device)
    ours, theirs = both("iou", boxes1, boxes2, fmt=fmt)
    assert_close(ours, theirs, torch.float32)


@pytest.mark.parametrize("fmt", ["xywh", "cxcywh"])
def test_box_formats_nan_and_inf_where_torchvision(backend, device, fmt):
    """A NaN (or inf - inf) corner makes the intersection NaN while the area, from a width and a
    height, stays finite: the IoU is NaN exactly where torchvision's is."""
    nan, inf = float("nan"), float("inf")
    boxes1 = torch.tensor([[nan, 1e30, 0.08, 4e-15], [-5.0, 5.1, 0.0, 4.9], [inf, 2.0, inf, 3.0], [1.0, 1.0, 4.0, 4.0]])
    boxes2 = torch.tensor([[4.0, inf, 0.0, -4.5], [-inf, 0.25, 10.0, 1.0], [2.0, nan, 3.0, 3.0], [2.0, 2.0, 4.0, 4.0]])
    ours, theirs = both("iou", boxes1.to(device), boxes2.to(device), fmt=fmt)
    assert torch.equal(ours.isnan().cpu(), theirs.isnan().cpu())
    assert_close(ours.cpu(), theirs.cpu(), torch.float32)


@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_non_contiguous_inputs(backend, device, kind):
    generator = torch.Generator().manual_seed(5)
    wide = torch.cat([random_boxes(40, generator=generator), torch.rand(40, 3, generator=generator)], dim=1)
    boxes1 = wide.to(device)[::2, :4]  # row stride 14, sliced columns
    boxes2 = random_boxes(30, generator=generator).t().contiguous().t().to(device)  # column-major
    assert not boxes1.is_contiguous() and not boxes2.is_contiguous()
    ours, theirs = both(kind, boxes1, boxes2)
    assert_close(ours, theirs, torch.float32)


@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_leading_batch_dimensions_broadcast(backend, device, kind):
    generator = torch.Generator().manual_seed(9)
    boxes1 = random_boxes(5, generator=generator, batch=(2, 3)).to(device)
    boxes2 = random_boxes(6, generator=generator, batch=(3,)).to(device)
    ours, theirs = both(kind, boxes1, boxes2)
    assert ours.shape == (2, 3, 5, 6)
    assert_close(ours, theirs, torch.float32)


def test_batched_box_iou_equals_per_image_box_iou(backend, device):
    generator = torch.Generator().manual_seed(13)
    boxes1 = random_boxes(37, generator=generator, batch=(3,)).to(device)
    boxes2 = random_boxes(70, generator=generator, batch=(3,)).to(device)
    batched = ops.batched_box_iou(boxes1, boxes2)
    for image in range(3):
        assert_close(batched[image], torchvision.ops.box_iou(boxes1[image], boxes2[image]), torch.float32)


# (seed, boxes1 dtype): both sets fp64, and fp32 beside fp64 (each set's gradient in its own dtype).
@pytest.mark.parametrize(("seed", "dtype1"), [(17, torch.float64), (43, torch.float32)])
@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_gradients_match_torchvision(backend, device, kind, seed, dtype1):
    generator = torch.Generator().manual_seed(seed)
    boxes1 = random_boxes(6, generator=generator).to(dtype1).to(device)
    boxes2 = random_boxes(5, generator=generator).double().to(device)
    weights = torch.rand(6, 5, generator=generator, dtype=torch.float64).to(device)
    grads = []
    for fn in (getattr(ops, FUNCTIONS[kind]), getattr(torchvision.ops, FUNCTIONS[kind])):
        leaf1, leaf2 = boxes1.clone().requires_grad_(), boxes2.clone().requires_grad_()
        (fn(leaf1, leaf2) * weights).sum().backward()
        grads.append((leaf1.grad, leaf2.grad))
    for ours, theirs in zip(grads[0], grads[1], strict=True):
        assert ours.dtype == theirs.dtype
        assert_close(ours, theirs, ours.dtype)


# Not CIoU: its trade-off weight alpha is held constant in the backward by definition (torchvision
# computes it under no_grad), so its gradient is not the numerical derivative; the test above
# checks CIoU's gradient against torchvision's instead.
@pytest.mark.parametrize("kind", ["iou", "giou", "diou"])
def test_gradcheck(backend, device, kind):
    generator = torch.Generator().manual_seed(19)
    boxes1 = random_boxes(4, generator=generator).double().to(device).requires_grad_()
    boxes2 = random_boxes(3, generator=generator).double().to(device).requires_grad_()
    assert torch.autograd.gradcheck(getattr(ops, FUNCTIONS[kind]), (boxes1, boxes2))


@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_opcheck(backend, device, kind):
    generator = torch.Generator().manual_seed(23)
    boxes1 = random_boxes(9, generator=generator, batch=(2,)).to(device).requires_grad_()
    boxes2 = random_boxes(4, generator=generator, batch=(2,)).to(device)
    torch.library.opcheck(torch.ops.tritondet.pairwise_box_iou.default, (boxes1, boxes2, kind, "xyxy", 1e-7))


def test_torch_compile_fullgraph(backend, device):
    generator = torch.Generator().manual_seed(29)
    boxes1 = random_boxes(9, generator=generator).to(device)
    boxes2 = random_boxes(12, generator=generator).to(device)

    def giou_loss(a, b):
        return (1 - ops.generalized_box_iou(a, b)).mean() + ops.box_iou(a, b).max()

    compiled = torch.compile(giou_loss, fullgraph=True, backend="aot_eager")
    assert_close(compiled(boxes1, boxes2), giou_loss(boxes1, boxes2), torch.float32)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 12),
    m=st.integers(0, 12),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 1e3, 1e5]),
)
def test_property_iou_symmetric_bounded_and_equal_to_torchvision(n, m, seed, scale):
    generator = torch.Generator().manual_seed(seed)
    boxes1 = random_boxes(n, generator=generator, scale=scale)
    boxes2 = random_boxes(m, generator=generator, scale=scale)
    iou = ops.box_iou(boxes1, boxes2)
    assert_close(iou, torchvision.ops.box_iou(boxes1, boxes2), torch.float32)
    assert_close(iou.t(), ops.box_iou(boxes2, boxes1), torch.float32)
    assert bool(((iou >= 0) & (iou <= 1)).all())
    giou = ops.generalized_box_iou(boxes1, boxes2)
    assert bool(((giou >= -1) & (giou <= iou + 1e-6)).all())


def test_property_checks_also_hold_on_the_triton_backend(monkeypatch):
    """The hypothesis test above runs on the default (reference on CPU); this repeats a sample on Triton."""
    monkeypatch.setenv("TRITONDET_BACKEND", "triton")
    generator = torch.Generator().manual_seed(31)
    boxes1, boxes2 = random_boxes(11, generator=generator), random_boxes(3, generator=generator)
    assert_close(ops.box_iou(boxes1, boxes2).t(), ops.box_iou(boxes2, boxes1), torch.float32)


@pytest.mark.parametrize(
    "boxes1,boxes2,error,match",
    [
        (torch.zeros(3, 5), torch.zeros(2, 4), ValueError, "boxes1 must have shape"),
        (torch.zeros(3, 4), torch.zeros(2, 3), ValueError, "boxes2 must have shape"),
        (torch.zeros(4), torch.zeros(2, 4), ValueError, "boxes1 must have at least 2 dimensions"),
        (torch.zeros(3, 4, dtype=torch.bool), torch.zeros(2, 4), TypeError, "boxes1 must hold real numbers"),
        ([[0, 0, 1, 1]], torch.zeros(2, 4), TypeError, "boxes1 must be a torch.Tensor"),
        (torch.zeros(2, 3, 4), torch.zeros(5, 2, 4), ValueError, "do not broadcast"),
        (torch.zeros(3, 4), torch.zeros(2, 4, device="meta"), ValueError, "same device"),
    ],
)
def test_bad_input_is_named(boxes1, boxes2, error, match):
    with pytest.raises(error, match=match):
        ops.box_iou(boxes1, boxes2)


def test_bad_format_and_batch_mismatch():
    with pytest.raises(ValueError, match="fmt must be one of"):
        ops.box_iou(torch.zeros(1, 4), torch.zeros(1, 4), fmt="yxyx")
    with pytest.raises(ValueError, match="same batch size"):
        ops.batched_box_iou(torch.zeros(2, 3, 4), torch.zeros(3, 3, 4))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["iou", "giou"])
def test_fast_cpu_path_is_the_reference_bit_for_bit(monkeypatch, dtype, kind):
    """The fast CPU path's in-place passes over coordinate planes change no bit (special and
    non-finite boxes included)."""
    monkeypatch.setenv("TRITONDET_BACKEND", "cpu")
    boxes1 = torch.cat([random_boxes(50, generator=torch.Generator().manual_seed(13)), special_boxes()])
    boxes2 = torch.cat([special_boxes(), random_boxes(30, generator=torch.Generator().manual_seed(14))])
    boxes1[5, 2], boxes2[7, 0] = float("nan"), float("inf")
    boxes1, boxes2 = boxes1.to(dtype), boxes2.to(dtype)
    ours = getattr(ops, FUNCTIONS[kind])(boxes1, boxes2)
    expected = pairwise_iou_reference(boxes1, boxes2, kind)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0, equal_nan=True)
