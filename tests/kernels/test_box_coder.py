"""Box coding against torchvision's BoxCoder and our reference, on both backends."""

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from tests.tolerances import FLOAT_DTYPES, assert_close
from tritondet import ops
from tritondet.bench.inputs import random_boxes
from tritondet.kernels import box_coder
from tritondet.kernels._aot import kernel_name
from tritondet.kernels.box_coder import BOX_HEAD_WEIGHTS, RPN_WEIGHTS, decode_reference, encode_reference

WEIGHTS = [RPN_WEIGHTS, BOX_HEAD_WEIGHTS]


def _pair(n, seed, scale=100.0):
    generator = torch.Generator().manual_seed(seed)
    return random_boxes(n, generator=generator, scale=scale), random_boxes(n, generator=generator, scale=scale)


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("n", [0, 1, 7, 300])
def test_encode_matches_torchvision(backend, device, weights, n):
    gt, anchors = _pair(n, n)
    gt, anchors = gt.to(device), anchors.to(device)
    ours = ops.encode_boxes(gt, anchors, weights)
    theirs = BoxCoder(weights).encode_single(gt, anchors)
    assert ours.shape == theirs.shape == (n, 4)
    assert ours.dtype == theirs.dtype
    assert_close(ours, theirs, torch.float32)
    # A weights tensor, as torchvision's encode_boxes takes it.
    assert_close(ops.encode_boxes(gt, anchors, torch.tensor(weights)), theirs, torch.float32)


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("n,k", [(0, 1), (1, 1), (7, 3), (300, 1), (33, 91)])
def test_decode_matches_torchvision(backend, device, weights, n, k):
    generator = torch.Generator().manual_seed(n + k)
    boxes = random_boxes(n, generator=generator).to(device)
    deltas = (torch.randn(n, 4 * k, generator=generator) * 2).to(device)
    ours = ops.decode_boxes(deltas, boxes, weights)
    theirs = BoxCoder(weights).decode_single(deltas, boxes)
    assert ours.shape == theirs.shape == (n, 4 * k)
    assert_close(ours, theirs, torch.float32)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_round_trip(backend, device, weights):
    # Sizes 20..120: no ratio reaches the 62.5x clamp, so decoding inverts encoding.
    generator = torch.Generator().manual_seed(3)
    corners = torch.rand(2, 50, 2, generator=generator) * 100
    gt, anchors = torch.cat([corners, corners + 20 + 100 * torch.rand(2, 50, 2, generator=generator)], dim=-1)
    gt, anchors = gt.to(device), anchors.to(device)
    assert_close(ops.decode_boxes(ops.encode_boxes(gt, anchors, weights), anchors, weights), gt, torch.float32)


def test_extreme_deltas_are_clamped_before_exp(backend, device):
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [10.0, 20.0, 30.0, 25.0]], device=device)
    deltas = torch.tensor([[0.0, 0.0, 1e4, 1e4], [1e3, -1e3, -1e4, 50.0]], device=device)
    ours = ops.decode_boxes(deltas, boxes, RPN_WEIGHTS)
    assert torch.isfinite(ours).all()
    # exp(log(1000 / 16)) * 16 = 1000: a 16 px anchor grows to at most 1000 px.
    assert_close(ours[0], torch.tensor([-492.0, -492.0, 508.0, 508.0], device=device), torch.float32)
    assert_close(ours, BoxCoder(RPN_WEIGHTS).decode_single(deltas, boxes), torch.float32)
    custom = ops.decode_boxes(deltas, boxes, RPN_WEIGHTS, bbox_xform_clip=1.0)
    assert_close(custom, BoxCoder(RPN_WEIGHTS, bbox_xform_clip=1.0).decode_single(deltas, boxes), torch.float32)


# (0.1, 0.3, 0.7, 1/3) have no exact fp32 value; neither has the default clip, log(1000 / 16).
@pytest.mark.parametrize("weights", [RPN_WEIGHTS, (0.1, 0.3, 0.7, 1 / 3)])
def test_fp64_decode_uses_fp64_weights_and_clip(backend, device, weights):
    boxes = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 2.0, 11.0, 7.0]], dtype=torch.float64, device=device)
    # Row 0: dh = 10 is clamped to the clip; row 1 decodes below it, through every weight.
    deltas = torch.tensor([[0.0, 0.0, 0.0, 10.0], [0.3, -0.7, 0.2, 0.5]], dtype=torch.float64, device=device)
    ours = ops.decode_boxes(deltas, boxes, weights)
    assert ours.dtype == torch.float64
    assert torch.equal(ours, decode_reference(deltas, boxes, list(weights), math.log(1000.0 / 16)))
    assert torch.equal(ours, BoxCoder(weights).decode_single(deltas, boxes))


# 0.1, 1/3, 7.3 and 1e-3 have no exact fp32 value: an fp32 weight would round every delta.
def test_fp64_encode_uses_fp64_weights(backend, device):
    weights = (0.1, 1 / 3, 7.3, 1e-3)
    gt = torch.tensor([[1.0, 2.0, 11.0, 7.0], [0.5, -3.0, 40.25, 9.0], [3.0, 3.0, 4.0, 5.0]], dtype=torch.float64)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, -1.0, 33.0, 12.5], [2.5, 1.0, 6.0, 4.0]], dtype=torch.float64)
    gt, anchors = gt.to(device), anchors.to(device)
    ours = ops.encode_boxes(gt, anchors, weights)
    assert ours.dtype == torch.float64
    # Our formula is torchvision's in its order of operations: the same bits.
    assert torch.equal(ours, encode_reference(gt, anchors, list(weights)))
    assert torch.equal(ours, BoxCoder(weights).encode_single(gt, anchors))


def test_fp64_kernels_take_no_fp32_scalar():
    """The interpreter computes a float argument in fp64, a GPU in fp32 (Triton types it so): an
    fp64 box coder kernel reads its weights and clip from a table in its dtype instead."""
    fp64_specs = [spec for spec in box_coder.AOT_SPECS if spec.constexprs["COMPUTE_FP64"]]
    assert {kernel_name(spec.kernel) for spec in fp64_specs} == {"_encode_kernel", "_decode_kernel"}
    for spec in fp64_specs:
        assert "fp32" not in spec.signature.values(), (spec.label, spec.signature)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes(backend, device, dtype):
    gt, anchors = _pair(65, 5, scale=60.0)
    gt, anchors = gt.to(device, dtype), anchors.to(device, dtype)
    encoded = ops.encode_boxes(gt, anchors, BOX_HEAD_WEIGHTS)
    assert encoded.dtype == dtype
    # fp32 math from upcast inputs: compare with torchvision on the upcast boxes.
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    expected = BoxCoder(BOX_HEAD_WEIGHTS).encode_single(gt.to(wide), anchors.to(wide))
    assert_close(encoded, expected.to(dtype), dtype)
    assert_close(encode_reference(gt, anchors, list(BOX_HEAD_WEIGHTS)).to(dtype), encoded, dtype)
    deltas = (torch.randn(65, 8, generator=torch.Generator().manual_seed(1))).to(device, dtype)
    decoded = ops.decode_boxes(deltas, anchors, BOX_HEAD_WEIGHTS)
    assert decoded.dtype == dtype
    expected = BoxCoder(BOX_HEAD_WEIGHTS).decode_single(deltas.to(wide), anchors.to(wide))
    assert_close(decoded, expected.to(dtype), dtype)


def test_mixed_dtypes_fp16_deltas_fp32_anchors(backend, device):
    generator = torch.Generator().manual_seed(2)
    anchors = random_boxes(40, generator=generator).to(device)
    deltas = torch.randn(40, 4, generator=generator).to(device, torch.float16)
    ours = ops.decode_boxes(deltas, anchors, RPN_WEIGHTS)
    assert ours.dtype == torch.float16
    assert_close(ours, BoxCoder(RPN_WEIGHTS).decode_single(deltas.float(), anchors).half(), torch.float16)


def test_non_contiguous_and_batched(backend, device):
    gt, anchors = _pair(24, 9)
    gt = gt.to(device).t().contiguous().t()  # column-major
    wide = torch.zeros(24, 8, device=device)
    wide[:, ::2] = anchors.to(device)
    anchors = wide[:, ::2]  # every other column of a wider buffer
    anchors = anchors.reshape(4, 6, 4)
    gt = gt.reshape(4, 6, 4)
    ours = ops.encode_boxes(gt, anchors, BOX_HEAD_WEIGHTS)
    assert ours.shape == (4, 6, 4)
    assert_close(
        ours,
        BoxCoder(BOX_HEAD_WEIGHTS).encode_single(gt.reshape(-1, 4), anchors.reshape(-1, 4)).reshape(4, 6, 4),
        torch.float32,
    )
    deltas = torch.randn(12, 24, generator=torch.Generator().manual_seed(4)).to(device).t()
    boxes = random_boxes(24, generator=torch.Generator().manual_seed(5)).to(device)
    assert not deltas.is_contiguous()
    assert_close(
        ops.decode_boxes(deltas, boxes, RPN_WEIGHTS), BoxCoder(RPN_WEIGHTS).decode_single(deltas, boxes), torch.float32
    )


def test_gradients(backend, device):
    gt, anchors = _pair(6, 13)
    gt = gt.to(device, torch.float64).requires_grad_()
    anchors = anchors.to(device, torch.float64).requires_grad_()
    torch.autograd.gradcheck(lambda g, a: ops.encode_boxes(g, a, BOX_HEAD_WEIGHTS), (gt, anchors))
    deltas = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).to(device)
    deltas.requires_grad_()
    torch.autograd.gradcheck(lambda d, a: ops.decode_boxes(d, a, BOX_HEAD_WEIGHTS), (deltas, anchors))
    # fp32 gradients equal torchvision's autograd through its formulas.
    d32 = deltas.detach().float().requires_grad_()
    a32 = anchors.detach().float().requires_grad_()
    ops.decode_boxes(d32, a32, BOX_HEAD_WEIGHTS).square().sum().backward()
    d_tv = deltas.detach().float().requires_grad_()
    a_tv = anchors.detach().float().requires_grad_()
    BoxCoder(BOX_HEAD_WEIGHTS).decode_single(d_tv, a_tv).square().sum().backward()
    assert_close(d32.grad, d_tv.grad, torch.float32)
    assert_close(a32.grad, a_tv.grad, torch.float32)


def test_opcheck(backend, device):
    gt, anchors = _pair(9, 21)
    gt, anchors = gt.to(device), anchors.to(device)
    torch.library.opcheck(torch.ops.tritondet.encode_boxes, (gt, anchors, list(RPN_WEIGHTS)))
    deltas = torch.randn(9, 8, generator=torch.Generator().manual_seed(8)).to(device)
    torch.library.opcheck(torch.ops.tritondet.decode_boxes, (deltas, anchors, list(BOX_HEAD_WEIGHTS), 4.0))


def test_torch_compile(backend, device):
    gt, anchors = _pair(10, 22)
    gt, anchors = gt.to(device), anchors.to(device)

    def fn(g, a):
        return ops.decode_boxes(ops.encode_boxes(g, a, BOX_HEAD_WEIGHTS), a, BOX_HEAD_WEIGHTS)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_close(compiled(gt, anchors), fn(gt, anchors), torch.float32)


def test_reference_is_torchvision_exact(device):
    deltas = torch.randn(50, 4, generator=torch.Generator().manual_seed(1)).to(device)
    boxes = random_boxes(50, generator=torch.Generator().manual_seed(2)).to(device)
    expected = BoxCoder(RPN_WEIGHTS).decode_single(deltas, boxes)
    torch.testing.assert_close(decode_reference(deltas, boxes, list(RPN_WEIGHTS), math.log(1000 / 16)), expected)


def test_bad_input(device):
    boxes = torch.zeros(3, 4, device=device)
    with pytest.raises(ValueError, match="weights"):
        ops.encode_boxes(boxes, boxes, (1.0, 1.0, 1.0))
    with pytest.raises(TypeError, match="weights"):
        ops.decode_boxes(boxes, boxes, "abcd")
    with pytest.raises(ValueError, match="weights"):
        ops.decode_boxes(boxes, boxes, (0.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="proposals"):
        ops.encode_boxes(boxes, torch.zeros(2, 4, device=device), RPN_WEIGHTS)
    with pytest.raises(ValueError, match="deltas"):
        ops.decode_boxes(torch.zeros(3, 6, device=device), boxes, RPN_WEIGHTS)
    with pytest.raises(ValueError, match="deltas and boxes"):
        ops.decode_boxes(torch.zeros(2, 4, device=device), boxes, RPN_WEIGHTS)
    with pytest.raises(TypeError, match="reference_boxes"):
        ops.encode_boxes(boxes.long(), boxes, RPN_WEIGHTS)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weights", [*WEIGHTS, (2.0, 1.0, 1.0, 0.5)])
def test_fast_cpu_path_is_the_reference_bit_for_bit(monkeypatch, dtype, weights):
    """The fast CPU path's in-place passes (and skipped unit weights) change no bit, non-finite
    and degenerate boxes and deltas included."""
    monkeypatch.setenv("TRITONDET_BACKEND", "cpu")
    gt, anchors = _pair(200, 11)
    anchors[:3] = torch.tensor([[5.0, 5.0, 5.0, 9.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, float("inf"), 2.0]])
    gt[3, 1] = float("nan")
    deltas = torch.randn(200, 8, generator=torch.Generator().manual_seed(12)) * 3
    deltas[4, 2], deltas[5, 1] = float("inf"), float("nan")
    gt, anchors, deltas = gt.to(dtype), anchors.to(dtype), deltas.to(dtype)
    encoded = torch.ops.tritondet.encode_boxes(gt, anchors, list(weights))
    decoded = torch.ops.tritondet.decode_boxes(deltas, anchors, list(weights), math.log(1000.0 / 16))
    torch.testing.assert_close(encoded, encode_reference(gt, anchors, list(weights)), rtol=0, atol=0, equal_nan=True)
    expected = decode_reference(deltas, anchors, list(weights), math.log(1000.0 / 16))
    torch.testing.assert_close(decoded, expected, rtol=0, atol=0, equal_nan=True)
