"""ops.postprocess_detections: torchvision's RoIHeads.postprocess_detections with fixed shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads

from tests.tolerances import assert_close
from tritondet import ops
from tritondet.kernels import nms as nms_kernels
from tritondet.kernels import postprocess as postprocess_kernels
from tritondet.measure.dispatch_audit import DispatchCounter, NoHostSync

WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def head_outputs(batch, count, num_classes, seed, device="cpu", dtype=torch.float32, spread=3.0):
    """Box-head outputs on random proposals inside 100 x 120 images (some degenerate, some huge)."""
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(batch, count, 2, generator=generator) * torch.tensor([110.0, 90.0])
    size = torch.rand(batch, count, 2, generator=generator) * 60
    size[:, ::7] = 0.0  # degenerate proposals
    proposals = torch.cat([corner, corner + size], dim=-1)
    proposals[:, 1::11] = torch.tensor([-50.0, -50.0, 500.0, 400.0])  # huge, past the image
    logits = torch.randn(batch * count, num_classes, generator=generator) * spread
    deltas = torch.randn(batch * count, 4 * num_classes, generator=generator)
    deltas[::13] *= 20  # extreme deltas: dw, dh clamped
    sizes = torch.tensor([[100, 120], [90, 117], [64, 64]][:batch] + [[100, 120]] * max(0, batch - 3))
    return logits.to(device, dtype), deltas.to(device, dtype), proposals.to(device), sizes.to(device)


def torchvision_detections(logits, deltas, proposals, sizes, num_valid, score_thresh, nms_thresh, detections):
    heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, WEIGHTS, score_thresh, nms_thresh, detections)
    counts = num_valid.tolist()
    count = proposals.shape[1]
    rows = torch.cat([torch.arange(i * count, i * count + n) for i, n in enumerate(counts)])
    boxes, scores, labels = heads.postprocess_detections(
        logits.float()[rows], deltas.float()[rows], [p[:n] for p, n in zip(proposals, counts, strict=True)],
        [tuple(s) for s in sizes.tolist()],
    )  # fmt: skip
    return boxes, scores, labels


def assert_same(ours, expected):
    boxes, scores, labels, num_valid = (t.cpu() for t in ours)
    for image, (e_boxes, e_scores, e_labels) in enumerate(zip(*expected, strict=True)):
        k = len(e_labels)
        assert int(num_valid[image]) == k, f"image {image}"
        torch.testing.assert_close(labels[image, :k], e_labels)
        torch.testing.assert_close(boxes[image, :k], e_boxes, atol=1e-3, rtol=0)
        torch.testing.assert_close(scores[image, :k], e_scores, atol=1e-4, rtol=0)
        assert not boxes[image, k:].any() and not scores[image, k:].any() and not labels[image, k:].any()


@pytest.mark.parametrize(
    "batch,count,num_classes,score_thresh,detections",
    [(1, 37, 5, 0.05, 100), (3, 30, 6, 0.05, 7), (2, 40, 3, 0.0, 100), (2, 3, 2, 0.05, 10)],
)
def test_matches_torchvision(backend, device, batch, count, num_classes, score_thresh, detections):
    logits, deltas, proposals, sizes = head_outputs(batch, count, num_classes, seed=count, device=device)
    num_valid = torch.tensor([count, max(0, count - 9), count // 2][:batch], device=device)
    ours = ops.postprocess_detections(
        logits, deltas, proposals, num_valid, sizes, WEIGHTS, score_thresh, 0.5, detections
    )  # fmt: skip
    expected = torchvision_detections(
        *(t.cpu() for t in (logits, deltas, proposals, sizes, num_valid)), score_thresh, 0.5, detections
    )  # fmt: skip
    assert sum(len(e) for e in expected[2]) > 0
    assert_same(ours, expected)


def test_backends_agree_on_candidates_and_detections(monkeypatch, device):
    logits, deltas, proposals, sizes = head_outputs(2, 40, 7, seed=5, device=device)
    num_valid = torch.tensor([40, 31], device=device)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("TRITONDET_BACKEND", backend)
        results[backend] = ops.postprocess_detections(logits, deltas, proposals, num_valid, sizes, WEIGHTS, 0.0)
    for ours, reference in zip(results["triton"], results["reference"], strict=True):
        assert_close(ours, reference, torch.float32)


@pytest.mark.parametrize("detections", [1, 6, 40, 500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cpu_prefix_cut_equals_reference(monkeypatch, detections, dtype):
    """The fast CPU path's NMS stops at each image's detections_per_img kept boxes (see
    nms.merged_top_cpu), bit for bit the reference's result: three images, the last with
    one proposal repeated (every class one cluster: heavy suppression) and logits in few values
    (ties across and within classes)."""
    monkeypatch.setattr(nms_kernels, "_PREFIX_FACTOR", 1)
    logits, deltas, proposals, sizes = head_outputs(3, 60, 6, seed=21, dtype=dtype, spread=1.0)
    proposals[2] = proposals[2, :1] + torch.linspace(0, 2, 60)[:, None]
    logits[120:] = logits[120:].round()
    num_valid = torch.tensor([60, 23, 60])
    outputs = {}
    for backend in ("reference", "cpu"):
        monkeypatch.setenv("TRITONDET_BACKEND", backend)
        outputs[backend] = ops.postprocess_detections(
            logits, deltas, proposals, num_valid, sizes, WEIGHTS, 0.05, 0.5, detections
        )  # fmt: skip
    for mine, expected in zip(outputs["cpu"], outputs["reference"], strict=True):
        assert mine.dtype == expected.dtype
        torch.testing.assert_close(mine, expected, rtol=0, atol=0)


def test_nan_boxes_are_dropped_as_torchvision(backend, device):
    """A proposal with an infinite corner decodes to a NaN corner (inf - inf), a NaN proposal to NaN
    corners; clipping keeps NaN (torch.clamp's rule), so every backend drops these boxes where
    torchvision's remove_small_boxes does (a NaN side is not >= min_size)."""
    logits, deltas, proposals, sizes = head_outputs(1, 12, 3, seed=3, device=device)
    proposals[0, :4, 2] = float("inf")
    proposals[0, 4:6] = float("nan")
    num_valid = torch.tensor([12], device=device)
    ours = ops.postprocess_detections(logits, deltas, proposals, num_valid, sizes, WEIGHTS, 0.0)
    expected = torchvision_detections(
        *(t.cpu() for t in (logits, deltas, proposals, sizes, num_valid)), 0.0, 0.5, 100
    )  # fmt: skip
    assert sum(len(e) for e in expected[2]) > 0
    assert_same(ours, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_head_dtypes_compute_in_fp32(backend, device, dtype):
    logits, deltas, proposals, sizes = head_outputs(2, 30, 4, seed=2, device=device, dtype=dtype)
    num_valid = torch.tensor([30, 30], device=device)
    ours = ops.postprocess_detections(logits, deltas, proposals, num_valid, sizes, WEIGHTS, 0.05)
    assert ours[0].dtype == ours[1].dtype == torch.float32 and ours[2].dtype == torch.int64
    expected = torchvision_detections(
        *(t.cpu() for t in (logits.float(), deltas.float(), proposals, sizes, num_valid)), 0.05, 0.5, 100
    )  # fmt: skip
    assert_same(ours, expected)


def test_non_contiguous_inputs(backend, device):
    logits, deltas, proposals, sizes = head_outputs(2, 24, 5, seed=8, device=device)
    num_valid = torch.tensor([24, 20], device=device)
    expected = ops.postprocess_detections(logits, deltas, proposals, num_valid, sizes, WEIGHTS, 0.0)
    strided = (
        logits.t().contiguous().t(),
        torch.stack([deltas, deltas], dim=-1)[..., 0],
        proposals.transpose(1, 2).contiguous().transpose(1, 2),
    )
    assert not any(t.is_contiguous() for t in strided)
    actual = ops.postprocess_detections(*strided, num_valid, sizes, WEIGHTS, 0.0)
    for a, b in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_no_proposals_and_no_detections(backend, device):
    logits, deltas, proposals, sizes = head_outputs(2, 12, 3, seed=1, device=device)
    for num_valid, threshold in ((torch.tensor([0, 0]), 0.0), (torch.tensor([12, 12]), 1.0)):
        boxes, scores, labels, count = ops.postprocess_detections(
            logits, deltas, proposals, num_valid.to(device), sizes, WEIGHTS, threshold
        )  # fmt: skip
        assert count.tolist() == [0, 0] and not boxes.any() and not scores.any() and not labels.any()
    empty = ops.postprocess_detections(
        logits[:0], deltas[:0], proposals[:, :0], torch.zeros(2, dtype=torch.int64, device=device), sizes, WEIGHTS
    )  # fmt: skip
    assert empty[0].shape == (2, 100, 4) and empty[3].tolist() == [0, 0]


def test_fixed_costs_and_no_host_sync(backend, device):
    if backend == "cpu":
        pytest.skip("sync-freedom is a GPU property: the fast CPU path reads candidate counts on the host")
    counts = set()
    for batch in (1, 3):
        logits, deltas, proposals, sizes = head_outputs(batch, 20, 4, seed=batch, device=device)
        num_valid = torch.full((batch,), 20, device=device)
        with NoHostSync():
            ops.postprocess_detections(logits, deltas, proposals, num_valid, sizes, WEIGHTS)
        with DispatchCounter() as counter:
            ops.postprocess_detections(logits, deltas, proposals, num_valid, sizes, WEIGHTS)
        counts.add((counter.aten_ops, counter.launches))
    assert len(counts) == 1, counts
    if backend == "triton":
        assert {launches for _, launches in counts} == {6}


def test_opcheck_and_torch_compile(backend, device):
    logits, deltas, proposals, sizes = head_outputs(2, 6, 3, seed=4, device=device)
    num_valid = torch.tensor([6, 4], device=device)
    args = (logits, deltas, proposals, num_valid, sizes, list(WEIGHTS), 0.05, 0.5, 20, 1e-2, 4.135)
    torch.library.opcheck(torch.ops.tritondet.postprocess_detections, args)

    def fn(*inputs):
        return ops.postprocess_detections(*inputs, WEIGHTS, detections_per_img=20)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    inputs = (logits, deltas, proposals, num_valid, sizes)
    for a, b in zip(compiled(*inputs), fn(*inputs), strict=True):
        torch.testing.assert_close(a, b)


def test_bad_input_is_named():
    logits, deltas, proposals, sizes = head_outputs(2, 10, 3, seed=4)
    num_valid = torch.tensor([10, 6])
    with pytest.raises(ValueError, match="class_logits"):
        ops.postprocess_detections(logits[:5], deltas, proposals, num_valid, sizes)
    with pytest.raises(ValueError, match="box_regression"):
        ops.postprocess_detections(logits, deltas[:, :8], proposals, num_valid, sizes)
    with pytest.raises(TypeError, match="box_regression"):
        ops.postprocess_detections(logits, deltas.half(), proposals, num_valid, sizes)
    with pytest.raises(ValueError, match="proposals"):
        ops.postprocess_detections(logits, deltas, proposals[0], num_valid, sizes)
    with pytest.raises(ValueError, match="image_sizes"):
        ops.postprocess_detections(logits, deltas, proposals, num_valid, sizes[:1])
    with pytest.raises(ValueError, match="num_valid"):
        ops.postprocess_detections(logits, deltas, proposals, num_valid.float(), sizes)
    with pytest.raises(TypeError, match="class_logits"):
        ops.postprocess_detections(logits.long(), deltas, proposals, num_valid, sizes)
    with pytest.raises(ValueError, match="detections_per_img"):
        ops.postprocess_detections(logits, deltas, proposals, num_valid, sizes, detections_per_img=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cpu_candidates_equal_reference(dtype):
    """detection_candidates_cpu (decoded by decode_cpu, clipped in place) against the reference, bit
    for bit: infinite and NaN proposals, clamped deltas, padding rows, an image without proposals,
    non-contiguous head outputs."""
    logits, deltas, proposals, sizes = head_outputs(3, 50, 7, seed=5, dtype=dtype)
    proposals[0, :3, 2] = float("inf")
    proposals[1, 3:5] = float("nan")
    deltas = torch.stack([deltas, deltas], dim=-1)[..., 1]
    args = (logits, deltas, proposals, torch.tensor([50, 31, 0]), sizes, WEIGHTS, 1e-2, math.log(1000.0 / 16))
    reference = postprocess_kernels.detection_candidates_reference(*args)
    cpu = postprocess_kernels.detection_candidates_cpu(*args)
    for mine, expected in zip(cpu, reference, strict=True):
        assert mine.dtype == expected.dtype == torch.float32 and mine.shape == expected.shape
        torch.testing.assert_close(mine, expected, rtol=0, atol=0, equal_nan=True)
