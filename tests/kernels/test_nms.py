"""NMS family: nms and batched_nms against torchvision and a loop-level reference, the sync-free
padded batched NMS, and soft-NMS, on both backends."""

import functools
import math

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels import nms_loops
from tests.tolerances import FLOAT_DTYPES, assert_close
from tritondet import ops
from tritondet.bench.inputs import random_boxes, special_boxes
from tritondet.kernels import nms as nms_kernels
from tritondet.kernels.nms import greedy_keep_cpu
from tritondet.measure.dispatch_audit import DispatchCounter, NoHostSync


def assert_same_keep(ours: torch.Tensor, theirs: torch.Tensor, scores: torch.Tensor) -> None:
    """Equal kept indices, or (torchvision's own criterion) differing only where scores tie."""
    assert ours.dtype == torch.int64
    if torch.equal(ours.cpu(), theirs.cpu()):
        return
    assert ours.shape == theirs.shape
    torch.testing.assert_close(scores[ours.cpu()], scores[theirs.cpu()], rtol=0, atol=0, equal_nan=True)


def random_set(n, seed, *, scale=100.0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    boxes = random_boxes(n, scale=scale, generator=generator)
    scores = torch.rand(n, generator=generator)
    return boxes.to(device), scores.to(device)


@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 1000])
@pytest.mark.parametrize("iou_threshold", [0.0, 0.5, 1.0])
def test_nms_matches_torchvision(backend, device, n, iou_threshold):
    boxes, scores = random_set(n, seed=n, device=device)
    keep = ops.nms(boxes, scores, iou_threshold)
    expected = torchvision.ops.nms(boxes.cpu(), scores.cpu(), iou_threshold)
    assert keep.dtype == torch.int64 and keep.device == boxes.device
    assert torch.equal(keep.cpu(), expected)
    if n <= 65:
        assert torch.equal(keep.cpu(), nms_loops.greedy_nms(boxes.cpu(), scores.cpu(), iou_threshold))


@pytest.mark.parametrize("iou_threshold", [0.0, 0.5, 0.7, 1.0])
def test_blocked_cpu_nms_matches_torchvision(monkeypatch, iou_threshold):
    """From 1500 boxes the fast CPU path runs the blocked NMS: torchvision's decisions, identical,
    degenerate, huge and non-finite boxes among them."""
    monkeypatch.setenv("TRITONDET_BACKEND", "cpu")
    boxes, scores = random_set(1600, seed=3)
    boxes[::40] = special_boxes().repeat(4, 1)[:40]
    boxes[7, 2], boxes[11, 0] = float("nan"), float("inf")
    assert torch.equal(ops.nms(boxes, scores, iou_threshold), torchvision.ops.nms(boxes, scores, iou_threshold))


@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 1000])
@pytest.mark.parametrize("num_classes", [1, 3, 80])
def test_batched_nms_matches_torchvision(backend, device, n, num_classes):
    boxes, scores = random_set(n, seed=7 * n + num_classes, device=device)
    idxs = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(n)).to(device)
    keep = ops.batched_nms(boxes, scores, idxs, 0.5)
    expected = torchvision.ops.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.5)
    assert keep.dtype == torch.int64
    assert torch.equal(keep.cpu(), expected)


@pytest.mark.slow
@pytest.mark.parametrize("n", [5000, 12000])
def test_large_sets_match_torchvision(backend, device, n):
    if n > 5000 and backend == "triton" and device.type == "cpu":
        pytest.skip("12000 boxes take minutes in the Triton interpreter")
    boxes, scores = random_set(n, seed=n, scale=400.0, device=device)
    assert torch.equal(ops.nms(boxes, scores, 0.7).cpu(), torchvision.ops.nms(boxes.cpu(), scores.cpu(), 0.7))
    idxs = torch.randint(0, 80, (n,), generator=torch.Generator().manual_seed(1)).to(device)
    expected = torchvision.ops.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.5)
    # torch.rand repeats a few values among 12000; torchvision's per-class path orders ties unstably.
    assert_same_keep(ops.batched_nms(boxes, scores, idxs, 0.5), expected, scores.cpu())


@pytest.mark.parametrize("num_classes", [1, 80])
def test_launches_and_host_syncs(backend, device, num_classes):
    """Fixed launches whatever the classes; nms syncs only to learn K, batched_nms twice."""
    boxes, scores = random_set(200, seed=num_classes, device=device)
    idxs = torch.arange(200, device=device) % num_classes
    with DispatchCounter() as counter:
        ops.nms(boxes, scores, 0.5)
    assert counter.launches == (2 if backend == "triton" else 0)
    if backend == "triton":
        assert counter.syncs == 1
    with DispatchCounter() as counter:
        ops.batched_nms(boxes, scores, idxs, 0.5)
    assert counter.launches == (2 if backend == "triton" else 0)
    if backend == "triton":
        # K; the other sync, the mask size, is a .tolist(), which reads the tensor without an
        # ATen call the dispatch mode could see.
        assert counter.syncs == 1


def test_negative_and_sparse_class_ids(backend, device):
    boxes, scores = random_set(70, seed=3, device=device)
    idxs = torch.tensor([-5, 10**12, 3, 3, -5, 0, 7] * 10, device=device)
    # torchvision's coordinate-offset path loses precision at id 10^12: compare with its per-class path.
    expected = torchvision.ops.boxes._batched_nms_vanilla(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.3)
    assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.3).cpu(), expected)
    assert torch.equal(expected, nms_loops.greedy_nms(boxes.cpu(), scores.cpu(), 0.3, idxs.cpu()))


@pytest.mark.parametrize("side", ["above", "at"])
def test_threshold_is_strict(backend, device, side):
    """Pairs whose fp32 IoU lies just above the threshold are suppressed, exactly at it they are not."""
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    heights = torch.linspace(2.0, 9.9, 40)
    others = torch.stack([torch.zeros(40), torch.zeros(40), torch.full((40,), 10.0), heights], dim=1)
    ious = torchvision.ops.box_iou(ref, others)[0]
    for other, iou in zip(others, ious, strict=True):
        boxes = torch.cat([ref, other[None]]).to(device)
        scores = torch.tensor([0.9, 0.8], device=device)
        threshold = float(iou) if side == "at" else float(torch.nextafter(iou, torch.tensor(-1.0)))
        keep = ops.nms(boxes, scores, threshold)
        assert keep.tolist() == ([0, 1] if side == "at" else [0])
        assert torch.equal(keep.cpu(), torchvision.ops.nms(boxes.cpu(), scores.cpu(), threshold))


def test_identical_boxes(backend, device):
    boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0]]).repeat(70, 1).to(device)
    scores = torch.rand(70, generator=torch.Generator().manual_seed(0)).to(device)
    assert ops.nms(boxes, scores, 0.5).tolist() == [int(scores.argmax())]
    # IoU 1 is not greater than 1: everything stays, by decreasing score.
    assert torch.equal(ops.nms(boxes, scores, 1.0).cpu(), torch.argsort(scores.cpu(), descending=True))


def test_score_ties(backend, device):
    generator = torch.Generator().manual_seed(5)
    boxes = random_boxes(65, generator=generator, scale=30.0).to(device)
    scores = (torch.rand(65, generator=generator) * 4).round().div(4).to(device)  # 5 distinct values
    keep = ops.nms(boxes, scores, 0.4)
    assert torch.equal(keep.cpu(), nms_loops.greedy_nms(boxes.cpu(), scores.cpu(), 0.4))  # ties: input order
    assert_same_keep(keep, torchvision.ops.nms(boxes.cpu(), scores.cpu(), 0.4), scores.cpu())
    idxs = torch.arange(65, device=device) % 3
    assert_same_keep(
        ops.batched_nms(boxes, scores, idxs, 0.4),
        torchvision.ops.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.4),
        scores.cpu(),
    )


@pytest.mark.parametrize("iou_threshold", [0.0, 0.5])
def test_zero_area_inverted_huge_boxes(backend, device, iou_threshold):
    boxes = special_boxes().to(device)
    scores = torch.linspace(1.0, 0.1, boxes.shape[0]).flip(0).to(device)
    keep = ops.nms(boxes, scores, iou_threshold)
    assert torch.equal(keep.cpu(), torchvision.ops.nms(boxes.cpu(), scores.cpu(), iou_threshold))
    assert torch.equal(keep.cpu(), nms_loops.greedy_nms(boxes.cpu(), scores.cpu(), iou_threshold))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes(backend, device, dtype):
    """IoU in fp32 for fp16/bf16 boxes (torchvision on the same boxes upcast), fp64 for fp64."""
    generator = torch.Generator().manual_seed(9)
    boxes = random_boxes(65, generator=generator, scale=50.0).round().to(dtype)  # representable corners
    scores = (torch.randperm(65, generator=generator).float() / 64).to(dtype)  # distinct in every dtype
    upcast = torch.float64 if dtype == torch.float64 else torch.float32
    reference_boxes, reference_scores = boxes.to(upcast), scores.to(upcast)
    expected = torchvision.ops.nms(reference_boxes, reference_scores, 0.5)
    assert torch.equal(ops.nms(boxes.to(device), scores.to(device), 0.5).cpu(), expected)
    idxs = torch.arange(65) % 4
    expected = torchvision.ops.batched_nms(reference_boxes, reference_scores, idxs, 0.5)
    assert torch.equal(ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5).cpu(), expected)


def test_non_contiguous_inputs(backend, device):
    boxes, scores = random_set(130, seed=2, device=device)
    wide = torch.cat([boxes, boxes], dim=1)[::2, 2:6]  # row stride 8, offset columns
    wide[:, :] = boxes[::2]
    strided_scores = scores[::2]
    assert not wide.is_contiguous() and not strided_scores.is_contiguous()
    expected = torchvision.ops.nms(boxes[::2].cpu(), strided_scores.cpu().contiguous(), 0.5)
    assert torch.equal(ops.nms(wide, strided_scores, 0.5).cpu(), expected)


def test_nan_scores_are_never_kept_ahead_of_finite_ones(backend, device):
    boxes, scores = random_set(40, seed=4, scale=30.0, device=device)
    scores[::5] = float("nan")
    keep = ops.nms(boxes, scores, 0.5)
    kept_nan = scores[keep].isnan()
    assert kept_nan.any()
    first_nan = int(kept_nan.int().argmax())
    assert not kept_nan[:first_nan].any() and kept_nan[first_nan:].all()
    # NaN-scored boxes come last (in input order) and never suppress a finite-scored box.
    assert torch.equal(keep.cpu(), nms_loops.greedy_nms(boxes.cpu(), scores.cpu(), 0.5))
    finite = ~scores.isnan()
    finite_keep = ops.nms(boxes[finite], scores[finite], 0.5)
    assert torch.equal(keep[:first_nan].cpu(), finite.nonzero().squeeze(1)[finite_keep].cpu())


def test_nms_compiles_with_dynamic_output(backend, device):
    boxes, scores = random_set(30, seed=8, device=device)
    compiled = torch.compile(lambda b, s: ops.nms(b, s, 0.5), backend="aot_eager")
    assert torch.equal(compiled(boxes, scores), ops.nms(boxes, scores, 0.5))


@pytest.mark.parametrize("op", ["nms", "batched_nms"])
def test_opcheck(backend, device, op):
    boxes, scores = random_set(20, seed=6, device=device)
    args = (boxes, scores, 0.5) if op == "nms" else (boxes, scores, torch.arange(20, device=device) % 3, 0.5)
    torch.library.opcheck(getattr(torch.ops.tritondet, op).default, args)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 24),
    seed=st.integers(0, 2**16),
    coarse=st.booleans(),
    iou_threshold=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0]),
    num_classes=st.integers(1, 4),
)
def test_property_greedy_definition(n, seed, coarse, iou_threshold, num_classes):
    """On the CPU path: the loop-level definition, torchvision (tie-tolerant), and the invariants
    of NMS (kept boxes pairwise below the threshold per class; every dropped box overlaps a kept
    box of its class with a higher or equal score)."""
    generator = torch.Generator().manual_seed(seed)
    boxes = random_boxes(n, generator=generator, scale=20.0)
    scores = torch.rand(n, generator=generator)
    if coarse:  # many identical boxes and tied scores
        boxes, scores = boxes.div(5).round().mul(5), scores.mul(3).round()
    idxs = torch.randint(0, num_classes, (n,), generator=generator)
    keep = ops.batched_nms(boxes, scores, idxs, iou_threshold)
    assert torch.equal(keep, nms_loops.greedy_nms(boxes, scores, iou_threshold, idxs))
    assert_same_keep(keep, torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold), scores)
    iou = torchvision.ops.box_iou(boxes, boxes)
    same_class = idxs[:, None] == idxs[None, :]
    iou = iou.double()  # torchvision compares its fp32 IoU with the threshold as a double
    kept_pairs = (iou[keep][:, keep] > iou_threshold) & same_class[keep][:, keep]
    assert not kept_pairs.fill_diagonal_(False).any() if len(keep) else True
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[keep] = False
    for j in dropped.nonzero().flatten().tolist():
        assert ((iou[keep, j] > iou_threshold) & (idxs[keep] == idxs[j]) & (scores[keep] >= scores[j])).any()


def test_property_sample_on_the_triton_backend(monkeypatch):
    monkeypatch.setenv("TRITONDET_BACKEND", "triton")
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        boxes = random_boxes(33, generator=generator, scale=20.0).div(5).round().mul(5)
        scores = torch.rand(33, generator=generator).mul(3).round()
        idxs = torch.randint(0, 3, (33,), generator=generator)
        assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.3), nms_loops.greedy_nms(boxes, scores, 0.3, idxs))


@pytest.mark.parametrize(
    "boxes,scores,error,match",
    [
        (torch.zeros(3, 5), torch.zeros(3), ValueError, "boxes must have shape"),
        (torch.zeros(2, 3, 4), torch.zeros(3), ValueError, r"boxes must have shape \[N, 4\]"),
        (torch.zeros(3, 4), torch.zeros(2), ValueError, "scores must have shape"),
        (torch.zeros(3, 4), torch.zeros(3, 1), ValueError, "scores must have shape"),
        (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3), TypeError, "boxes must be a floating-point"),
        (torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64), TypeError, "scores must be a floating-point"),
        ([[0, 0, 1, 1]], torch.zeros(1), TypeError, "boxes must be a torch.Tensor"),
        (torch.zeros(3, 4), torch.zeros(3, device="meta"), ValueError, "same device"),
    ],
)
def test_bad_input_is_named(boxes, scores, error, match):
    with pytest.raises(error, match=match):
        ops.nms(boxes, scores, 0.5)


def test_bad_batched_input_is_named():
    with pytest.raises(ValueError, match="idxs must have shape"):
        ops.batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="idxs must be an integer tensor"):
        ops.batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(3), 0.5)


# ----------------------------------------------------------------------------------------------
# batched_nms_padded
# ----------------------------------------------------------------------------------------------


def padded_expected(
    boxes, scores, iou_threshold, max_output, score_threshold, class_agnostic=False, top_n=None,
    batched_nms=torchvision.ops.batched_nms,
):  # fmt: skip
    """Per image: ``batched_nms`` (torchvision's) over the candidates passing the threshold, truncated."""
    results = []
    for image in range(scores.shape[0]):
        image_scores = scores[image].reshape(scores.shape[1], scores.shape[2] if scores.dim() == 3 else 1)
        index, label = (image_scores > score_threshold).nonzero(as_tuple=True)
        cand_scores = image_scores[index, label]
        if top_n is not None:  # the top n of each class (of the image when agnostic)
            groups = torch.zeros_like(label) if class_agnostic else label
            chosen = []
            for group in groups.unique():
                members = (groups == group).nonzero().squeeze(1)
                order = torch.sort(-cand_scores[members], stable=True).indices[:top_n]
                chosen.append(members[order])
            chosen = torch.cat(chosen) if chosen else label
            index, label, cand_scores = index[chosen], label[chosen], cand_scores[chosen]
        by_class = torch.sort(label, stable=True).indices  # the padded op's candidate order
        index, label, cand_scores = index[by_class], label[by_class], cand_scores[by_class]
        cand_boxes = boxes[image, index, label] if boxes.dim() == 4 else boxes[image, index]
        groups = torch.zeros_like(label) if class_agnostic else label
        keep = batched_nms(cand_boxes.float(), cand_scores.float(), groups, iou_threshold)[:max_output]
        results.append((cand_boxes[keep], cand_scores[keep], label[keep], index[keep]))
    return results


def check_padded(outputs, expected, max_output):
    out_boxes, out_scores, out_labels, out_indices, num_valid = (t.cpu() for t in outputs)
    batch = len(expected)
    assert out_boxes.shape == (batch, max_output, 4) and out_scores.shape == (batch, max_output)
    assert out_labels.dtype == out_indices.dtype == num_valid.dtype == torch.int64
    for image, (boxes, scores, labels, indices) in enumerate(expected):
        k = len(indices)
        assert int(num_valid[image]) == k
        # Tie-tolerant: the same scores in the same order; equal (box, class) sets.
        torch.testing.assert_close(out_scores[image, :k], scores, rtol=0, atol=0)
        ours = list(zip(out_indices[image, :k].tolist(), out_labels[image, :k].tolist(), strict=True))
        theirs = list(zip(indices.tolist(), labels.tolist(), strict=True))
        assert sorted(ours) == sorted(theirs)
        box_of = {pair: box for pair, box in zip(theirs, boxes, strict=True)}
        for slot, pair in enumerate(ours):
            assert torch.equal(out_boxes[image, slot], box_of[pair])
        assert (out_indices[image, k:] == -1).all() and (out_labels[image, k:] == 0).all()
        assert (out_boxes[image, k:] == 0).all() and (out_scores[image, k:] == 0).all()


def padded_inputs(batch, n, num_classes, class_specific, seed, device):
    generator = torch.Generator().manual_seed(seed)
    if class_specific:
        boxes = random_boxes(n * num_classes, generator=generator, scale=40.0, batch=(batch,))
        boxes = boxes.reshape(batch, n, num_classes, 4)
    else:
        boxes = random_boxes(n, generator=generator, scale=40.0, batch=(batch,))
    scores = torch.rand(batch, n, num_classes, generator=generator)
    return boxes.to(device), scores.to(device)


@pytest.mark.parametrize(
    "batch,n,num_classes,class_specific,class_agnostic",
    [(2, 37, 3, True, False), (2, 37, 3, False, False), (3, 30, 4, False, True), (1, 65, 1, False, False)],
)
@pytest.mark.parametrize("max_output", [5, 200])
def test_padded_equals_torchvision_batched_nms(
    backend, device, batch, n, num_classes, class_specific, class_agnostic, max_output
):
    boxes, scores = padded_inputs(batch, n, num_classes, class_specific, seed=n + max_output, device=device)
    if num_classes == 1:
        scores = scores[..., 0]
    outputs = ops.batched_nms_padded(boxes, scores, 0.5, max_output, score_threshold=0.3, class_agnostic=class_agnostic)
    check_padded(outputs, padded_expected(boxes.cpu(), scores.cpu(), 0.5, max_output, 0.3, class_agnostic), max_output)


@pytest.mark.parametrize("class_agnostic", [False, True])
def test_padded_pre_nms_top_n(backend, device, class_agnostic):
    boxes, scores = padded_inputs(2, 40, 3, False, seed=1, device=device)
    outputs = ops.batched_nms_padded(boxes, scores, 0.5, 50, 0.05, class_agnostic, pre_nms_top_n=7)
    expected = padded_expected(boxes.cpu(), scores.cpu(), 0.5, 50, 0.05, class_agnostic, top_n=7)
    check_padded(outputs, expected, 50)


@pytest.mark.parametrize("batch,n", [(0, 5), (2, 0)])
def test_padded_empty(backend, device, batch, n):
    boxes, scores = torch.zeros(batch, n, 4, device=device), torch.zeros(batch, n, device=device)
    out_boxes, _out_scores, _out_labels, out_indices, num_valid = ops.batched_nms_padded(boxes, scores, 0.5, 4)
    assert out_boxes.shape == (batch, 4, 4) and num_valid.shape == (batch,)
    assert (num_valid == 0).all() and (out_indices == -1).all()


def test_padded_nan_and_dtypes(backend, device):
    boxes, scores = padded_inputs(2, 33, 2, True, seed=3, device=device)
    scores[0, ::3, 0] = float("nan")  # NaN never passes the score threshold
    for dtype in FLOAT_DTYPES:
        cast_boxes, cast_scores = boxes.round().to(dtype), scores.to(dtype)
        outputs = ops.batched_nms_padded(cast_boxes, cast_scores, 0.5, 30, 0.2)
        assert outputs[0].dtype == dtype and outputs[1].dtype == dtype
        expected = padded_expected(cast_boxes.cpu().double(), cast_scores.cpu().double(), 0.5, 30, 0.2)
        if dtype != torch.float64:
            expected = padded_expected(cast_boxes.cpu().float(), cast_scores.cpu().float(), 0.5, 30, 0.2)
        assert [len(e[3]) for e in expected] == outputs[4].tolist()
        for image, (_, _, labels, indices) in enumerate(expected):
            k = len(indices)
            got = sorted(zip(outputs[3][image, :k].tolist(), outputs[2][image, :k].tolist(), strict=True))
            assert got == sorted(zip(indices.tolist(), labels.tolist(), strict=True))


def _greedy_batched_nms(boxes, scores, idxs, iou_threshold):
    """The loop-level oracle (ties in input order) with torchvision's ``batched_nms`` arguments."""
    return nms_loops.greedy_nms(boxes, scores, iou_threshold, idxs)


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 3),
    n=st.integers(0, 12),
    num_classes=st.integers(1, 3),
    class_specific=st.booleans(),
    class_agnostic=st.booleans(),
    max_output=st.integers(0, 10),
    score_threshold=st.sampled_from([-1.0, 0.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_property_padded_equals_per_image_batched_nms(
    batch, n, num_classes, class_specific, class_agnostic, max_output, score_threshold, seed
):
    boxes, scores = padded_inputs(batch, n, num_classes, class_specific, seed, "cpu")
    boxes, scores = boxes.div(10).round().mul(10), scores.mul(4).round().div(4)  # overlaps and ties
    outputs = ops.batched_nms_padded(boxes, scores, 0.3, max_output, score_threshold, class_agnostic)
    # Ties go class by class, then by box, as in the padded op's ranking; torchvision's
    # unstable sort may pick another of the tied boxes, and then even the counts can differ.
    expected = padded_expected(
        boxes, scores, 0.3, max_output, score_threshold, class_agnostic, batched_nms=_greedy_batched_nms
    )
    check_padded(outputs, expected, max_output)


def sparse_class_inputs(batch, num_classes, seed, device):
    """3 boxes per image over ``num_classes`` classes; 1 to 3 candidates per image score above 0.5
    (two of them on overlapping boxes of one class), every other score is 0."""
    generator = torch.Generator().manual_seed(seed)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [30.0, 30.0, 40.0, 45.0]])
    boxes = boxes.expand(batch, 3, 4).contiguous()
    scores = torch.zeros(batch, 3, num_classes)
    for image in range(batch):
        label = int(torch.randint(num_classes, (1,), generator=generator))
        taking_part = 1 + image % 3
        scores[image, :taking_part, label] = 0.5 + torch.rand(taking_part, generator=generator) / 2
    return boxes.to(device), scores.to(device)


# 70 x 1000 segments pass CUDA's 65535 programs on grid axes y and z (launch() checks the
# limits; test_launch.py checks every grid of this call); the interpreter runs 2 x 70000
# programs (one mask tile and one greedy pass per segment), minutes: CI runs it on its own.
@pytest.mark.slow
def test_padded_triton_70_images_x_1000_classes(monkeypatch, device, batch=70, num_classes=1000):
    monkeypatch.setenv("TRITONDET_BACKEND", "triton")
    boxes, scores = sparse_class_inputs(batch, num_classes, seed=batch, device=device)
    outputs = ops.batched_nms_padded(boxes, scores, 0.5, 4, score_threshold=0.5)
    check_padded(outputs, padded_expected(boxes.cpu(), scores.cpu(), 0.5, 4, 0.5), 4)


def test_padded_has_no_host_sync_and_fixed_launches(backend, device):
    if backend == "cpu":
        pytest.skip("sync-freedom is a GPU property: the fast CPU path reads segment sizes on the host")
    boxes, scores = padded_inputs(2, 50, 3, True, seed=4, device=device)
    launches = set()
    for score_threshold in (0.0, 0.5, 0.99, 2.0):  # different data, the same work on the host
        with NoHostSync() as counter:
            ops.batched_nms_padded(boxes, scores, 0.5, 10, score_threshold)
        launches.add(counter.launches)
    assert launches == ({5} if backend == "triton" else {0})
    with DispatchCounter() as counter:
        ops.batched_nms_padded(boxes, scores, 0.5, 10, 0.5)
    assert counter.syncs == 0
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            ops.batched_nms_padded(boxes, scores, 0.5, 10, 0.5)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_padded_torch_compile_fullgraph(backend, device):
    boxes, scores = padded_inputs(2, 20, 2, True, seed=5, device=device)

    def postprocess(b, s):
        out_boxes, out_scores, out_labels, _, num_valid = ops.batched_nms_padded(b, s, 0.5, 8, 0.1)
        return out_boxes * 2, out_scores, out_labels, num_valid

    compiled = torch.compile(postprocess, fullgraph=True, backend="aot_eager")
    for ours, theirs in zip(compiled(boxes, scores), postprocess(boxes, scores), strict=True):
        assert torch.equal(ours, theirs)


def test_padded_opcheck(backend, device):
    boxes, scores = padded_inputs(2, 12, 2, False, seed=6, device=device)
    torch.library.opcheck(torch.ops.tritondet.batched_nms_padded.default, (boxes, scores, 0.5, 6, 0.2, False, None))


def test_padded_bad_input_is_named():
    with pytest.raises(ValueError, match="scores must have shape"):
        ops.batched_nms_padded(torch.zeros(2, 3, 4), torch.zeros(2), 0.5, 4)
    with pytest.raises(ValueError, match="boxes must have shape"):
        ops.batched_nms_padded(torch.zeros(2, 4, 4), torch.zeros(2, 3), 0.5, 4)
    with pytest.raises(ValueError, match="class-specific boxes"):
        ops.batched_nms_padded(torch.zeros(2, 3, 5, 4), torch.zeros(2, 3, 4), 0.5, 4)
    with pytest.raises(ValueError, match="max_output"):
        ops.batched_nms_padded(torch.zeros(2, 3, 4), torch.zeros(2, 3), 0.5, -1)
    with pytest.raises(ValueError, match="pre_nms_top_n"):
        ops.batched_nms_padded(torch.zeros(2, 3, 4), torch.zeros(2, 3), 0.5, 4, pre_nms_top_n=-2)


# ----------------------------------------------------------------------------------------------
# The fast CPU path's prefix cut (nms_kernels.merged_top_cpu): NMS only on each image's best
# candidates, grown until max_output kept boxes are known; bit for bit the reference's result.
# ----------------------------------------------------------------------------------------------


def on_backends(monkeypatch, run, backends=("reference", "cpu")):
    """``run()``'s outputs on each backend."""
    outputs = []
    for name in backends:
        monkeypatch.setenv("TRITONDET_BACKEND", name)
        outputs.append(run())
    return outputs


def assert_identical(ours, theirs):
    """Equal values (NaN where NaN), shapes, dtypes and order."""
    for mine, expected in zip(ours, theirs, strict=True):
        assert mine.dtype == expected.dtype and mine.shape == expected.shape
        torch.testing.assert_close(mine, expected, rtol=0, atol=0, equal_nan=True)


@pytest.fixture
def nms_inputs_seen(monkeypatch):
    """The sizes of every box set the fast CPU path's greedy NMS sees (a list, appended to)."""
    sizes = []

    def counting(ranked, iou_threshold):
        sizes.append(ranked.shape[0])
        return greedy_keep_cpu(ranked, iou_threshold)

    monkeypatch.setattr(nms_kernels, "greedy_keep_cpu", counting)
    return sizes


def chain_boxes(n, step=2.0):
    """``[n, 4]``: squares of side 10 shifted by ``step``: IoU 2/3 with the next, 3/7 with the one
    after; at IoU threshold 0.5 greedy NMS keeps every other box."""
    x = torch.arange(n, dtype=torch.float32) * step
    return torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], dim=1)


@pytest.mark.parametrize("max_output", [1, 2, 5, 6, 19, 40, 100])
@pytest.mark.parametrize("prefix_factor", [1, 2])
@pytest.mark.parametrize("small_first_pass", [0, 32])
def test_padded_cpu_prefix_resumes_exactly(monkeypatch, nms_inputs_seen, max_output, prefix_factor, small_first_pass):
    """A chain keeps boxes 0, 2, 4, ...: a first prefix of m boxes keeps about m / 2, so the cut
    grows, and box m's fate depends on box m - 1's (kept or suppressed in the previous pass): a
    resumed pass that forgot the kept boxes, or counted suppressed ones as kept, or a cut that
    dropped a box a longer prefix keeps, changes the result. First passes of up to
    ``small_first_pass`` candidates take the vectorized NMS."""
    monkeypatch.setattr(nms_kernels, "_PREFIX_FACTOR", prefix_factor)
    monkeypatch.setattr(nms_kernels, "_SMALL_FIRST_PASS", small_first_pass)
    boxes = chain_boxes(60)[None]
    scores = torch.linspace(0.9, 0.2, 60)[None]
    reference, cpu = on_backends(monkeypatch, lambda: ops.batched_nms_padded(boxes, scores, 0.5, max_output))
    assert_identical(cpu, reference)
    kept = min(max_output, 30)
    assert cpu[4].tolist() == [kept] and cpu[3][0, :kept].tolist() == list(range(0, 2 * kept, 2))
    assert torch.equal(cpu[3][0, :kept], torchvision.ops.nms(boxes[0], scores[0], 0.5)[:max_output])
    if small_first_pass == 0 and max_output < 30:  # every pass in greedy_keep_cpu
        assert sum(nms_inputs_seen) < 60 or prefix_factor * max_output >= 60  # the cut stopped early
        if prefix_factor * max_output < 2 * kept - 1:
            assert len(nms_inputs_seen) >= 2  # the growth step ran


def clustered_inputs(batch, n, num_classes, copies, seed, tie_levels=None):
    """Class-specific ``[B, n, C, 4]`` boxes in clusters of ``copies`` near-identical boxes (all but
    one of each cluster suppressed at IoU 0.5) and ``[B, n, C]`` scores, rounded to ``tie_levels``
    values when given (ties within and across classes)."""
    generator = torch.Generator().manual_seed(seed)
    centers = random_boxes(-(-n // copies) * num_classes, generator=generator, scale=200.0, batch=(batch,))
    centers = centers.reshape(batch, -1, 1, num_classes, 4).expand(-1, -1, copies, -1, -1)
    jitter = torch.rand(batch, centers.shape[1], copies, num_classes, 4, generator=generator)
    boxes = (centers + jitter).reshape(batch, -1, num_classes, 4)[:, :n].contiguous()
    scores = torch.rand(batch, n, num_classes, generator=generator)
    if tie_levels is not None:
        scores = (scores * tie_levels).floor() / tie_levels
    return boxes, scores


def _scenario(name):
    """(boxes, scores, max_output, score_threshold) of a named prefix-cut scenario."""
    if name == "clusters":  # growth: a prefix of 2 * D keeps about D / 2
        boxes, scores = clustered_inputs(2, 90, 5, copies=4, seed=1)
        return boxes, scores, 40, 0.05
    if name == "ties":  # 4 score values: ties straddle every cut, within and across classes
        boxes, scores = clustered_inputs(2, 60, 4, copies=2, seed=2, tie_levels=4)
        return boxes, scores, 25, 0.0
    if name == "all_tied":
        boxes, scores = clustered_inputs(1, 50, 3, copies=3, seed=3)
        return boxes, torch.full_like(scores, 0.5), 7, 0.1
    if name == "empty_classes":  # classes 1 and 3 have no candidate
        boxes, scores = clustered_inputs(2, 40, 5, copies=2, seed=4)
        scores[..., 1] = 0.0
        scores[..., 3] = 0.01
        return boxes, scores, 12, 0.05
    if name == "non_finite":  # +inf scores lead, NaN and -inf never pass; NaN and inf corners
        boxes, scores = clustered_inputs(2, 40, 3, copies=2, seed=5)
        scores[0, ::5, 0], scores[0, 1::7, 1], scores[1, ::3, 2] = float("inf"), float("nan"), float("-inf")
        boxes[0, ::6, 0, 2], boxes[1, ::4, 1, 0] = float("nan"), float("inf")
        return boxes, scores, 15, 0.1
    if name == "different_images":  # none, one huge class (the blocked NMS), little suppression
        boxes, scores = clustered_inputs(3, 2000, 2, copies=2, seed=6)
        scores[0] = 0.0
        scores[1, :, 1] = 0.0
        boxes[2] = random_boxes(4000, scale=2000.0, batch=(1,)).reshape(2000, 2, 4)
        return boxes, scores, 900, 0.05
    raise ValueError(name)


PREFIX_SCENARIOS = ["clusters", "ties", "all_tied", "empty_classes", "non_finite", "different_images"]


@pytest.mark.parametrize("name", PREFIX_SCENARIOS)
@pytest.mark.parametrize("prefix_factor", [1, 2])
def test_padded_cpu_prefix_cut_equals_reference(monkeypatch, name, prefix_factor):
    monkeypatch.setattr(nms_kernels, "_PREFIX_FACTOR", prefix_factor)
    boxes, scores, max_output, score_threshold = _scenario(name)
    for limit in (max_output, 10_000):  # fewer than the kept boxes, and more
        run = lambda limit=limit: ops.batched_nms_padded(boxes, scores, 0.5, limit, score_threshold)
        reference, cpu = on_backends(monkeypatch, run)
        assert_identical(cpu, reference)
        if name in ("clusters", "empty_classes", "different_images"):  # no ties: torchvision's result
            check_padded(cpu, padded_expected(boxes, scores, 0.5, limit, score_threshold), limit)


# (seed, copies, max_output): a cut that took each segment's count of keys <= t fails the first,
# one that counted kept keys above t toward max_output fails the other two (found by search).
@pytest.mark.parametrize("seed,copies,max_output", [(0, 1, 3), (4, 2, 3), (41, 3, 8)])
def test_padded_nms_cpu_cut_is_positional(monkeypatch, seed, copies, max_output):
    """padded_nms's segments in rank order with keys out of order (as a sigmoid's rounding could
    leave them) and holes (+inf keys, as the RPN's dropped candidates): the cut covers each
    segment up to its last key <= t and counts only the kept keys <= t."""
    monkeypatch.setattr(nms_kernels, "_PREFIX_FACTOR", 1)
    boxes, scores = clustered_inputs(2, 40, 3, copies=copies, seed=seed, tie_levels=64)
    ranked = boxes.permute(0, 2, 1, 3).contiguous()  # [B, S = 3, L = 40, 4]
    keys = -scores.permute(0, 2, 1).sort(dim=2, descending=True).values
    keys = keys.reshape(2, 3, 20, 2).flip(3).reshape(2, 3, 40).contiguous()  # pairs out of order
    order = torch.arange(40).expand(2, 3, 40).contiguous()
    labels = (order, 40, 3, False)
    for holes in (False, True):
        if holes:
            keys[0, 0, 3::5], keys[1, 2, :7] = float("inf"), float("inf")
        run = lambda: nms_kernels.padded_nms(ranked, keys, 0.5, max_output, torch.float32, torch.float32, labels)
        reference, cpu = on_backends(monkeypatch, run)
        assert_identical(cpu, reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("class_agnostic", [False, True])
def test_padded_cpu_prefix_cut_dtypes(monkeypatch, dtype, class_agnostic):
    monkeypatch.setattr(nms_kernels, "_PREFIX_FACTOR", 1)
    boxes, scores = clustered_inputs(2, 50, 3, copies=3, seed=7, tie_levels=16)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    if class_agnostic:
        boxes = boxes[:, :, 0].contiguous()
    run = lambda: ops.batched_nms_padded(boxes, scores, 0.5, 20, 0.1, class_agnostic, pre_nms_top_n=40)
    reference, cpu = on_backends(monkeypatch, run)
    assert cpu[0].dtype == cpu[1].dtype == dtype
    assert_identical(cpu, reference)


# The fast CPU path ranks only each image's candidates up to a cut
# (nms_kernels.batched_nms_padded_cpu), starting again with twice as many while too few are kept.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clusters", "ties", "all_tied", "empty_classes", "non_finite"])
@pytest.mark.parametrize("class_agnostic", [False, True])
@pytest.mark.parametrize("pre_nms_top_n", [None, 1, 3, 20])
def test_padded_cpu_cut_with_pre_nms_top_n_equals_reference(monkeypatch, name, class_agnostic, pre_nms_top_n):
    """Ties at the cut (the tie scenarios), and pre_nms_top_n shorter than a segment's candidates
    up to the cut: the cut's candidates are cut again at each segment's first pre_nms_top_n."""
    monkeypatch.setattr(nms_kernels, "_PREFIX_FACTOR", 1)
    boxes, scores, max_output, score_threshold = _scenario(name)
    if class_agnostic:
        boxes = boxes[:, :, 0].contiguous()
    run = lambda: ops.batched_nms_padded(boxes, scores, 0.5, max_output, score_threshold, class_agnostic, pre_nms_top_n)
    reference, cpu = on_backends(monkeypatch, run)
    assert_identical(cpu, reference)


def test_padded_cpu_ranks_only_up_to_the_cut(monkeypatch):
    """Clusters of 4 near-identical boxes: a cut of D candidates keeps fewer than D, so each image
    starts again with twice the candidates; the first pass takes far fewer than all of them."""
    monkeypatch.setattr(nms_kernels, "_PREFIX_FACTOR", 1)
    boxes, scores, max_output, score_threshold = _scenario("clusters")
    taken = []
    merged_top_cpu = nms_kernels.merged_top_cpu

    def counting(ranked, keys, iou_threshold, limit):
        taken.append(int((keys < float("inf")).sum()))
        return merged_top_cpu(ranked, keys, iou_threshold, limit)

    monkeypatch.setattr(nms_kernels, "merged_top_cpu", counting)
    run = lambda: ops.batched_nms_padded(boxes, scores, 0.5, max_output, score_threshold)
    reference, cpu = on_backends(monkeypatch, run)
    assert_identical(cpu, reference)
    candidates = int((scores[0] > score_threshold).sum())
    assert len(taken) > boxes.shape[0]  # some image started again
    assert max_output <= taken[0] < candidates and taken[1] >= 2 * max_output
    assert cpu[4].tolist() == [max_output] * boxes.shape[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_padded_cpu_cut_without_candidates(monkeypatch, dtype):
    """No candidate in an image (scores at or below the threshold, NaN, no boxes), max_output 0,
    single-class [B, N] scores: the reference's zeros and counts."""
    boxes, scores = clustered_inputs(3, 20, 3, copies=2, seed=8, tie_levels=8)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    scores[1] = 0.25
    scores[2, :, 1] = float("nan")
    cases = [
        (boxes, scores, 10, 0.25),  # image 1: every score equals the threshold
        (boxes, torch.zeros_like(scores), 10, 0.0),  # no candidate anywhere
        (boxes[:, :0], scores[:, :0], 10, 0.0),  # no boxes
        (boxes, scores, 0, 0.0),
        (boxes[:, :, 0], scores[:, :, 0], 4, 0.3),  # one class, [B, N] scores
    ]
    for case_boxes, case_scores, max_output, threshold in cases:
        for class_agnostic in (False, True):
            if class_agnostic and case_boxes.dim() == 4:
                case_boxes = case_boxes[:, :, 0].contiguous()
            run = functools.partial(
                ops.batched_nms_padded, case_boxes, case_scores, 0.5, max_output, threshold, class_agnostic
            )
            reference, cpu = on_backends(monkeypatch, run)
            assert_identical(cpu, reference)
            assert cpu[0].dtype == cpu[1].dtype == dtype


# ----------------------------------------------------------------------------------------------
# soft_nms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "gaussian"])
@pytest.mark.parametrize("n", [0, 1, 2, 33, 65])
def test_soft_nms_matches_loop_reference(backend, device, method, n):
    boxes, scores = random_set(n, seed=n, scale=30.0, device=device)
    keep, new_scores = ops.soft_nms(boxes, scores, 0.3, 0.5, 0.001, method)
    expected_keep, expected_scores = nms_loops.soft_nms(boxes.cpu(), scores.cpu(), 0.3, 0.5, 0.001, method)
    assert keep.dtype == torch.int64 and new_scores.dtype == scores.dtype
    assert torch.equal(keep.cpu(), expected_keep)
    assert_close(new_scores.cpu(), expected_scores, torch.float32)
    assert bool((new_scores[1:] <= new_scores[:-1]).all())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_soft_nms_dtypes_nan_and_threshold(backend, device, dtype):
    boxes, scores = random_set(20, seed=1, scale=30.0)
    scores[3] = float("nan")
    boxes, scores = boxes.round().to(dtype), scores.to(dtype)
    keep, new_scores = ops.soft_nms(boxes.to(device), scores.to(device), 0.3, 0.5, 0.2, "linear")
    expected_keep, expected_scores = nms_loops.soft_nms(boxes, scores, 0.3, 0.5, 0.2, "linear")
    assert 3 not in keep.tolist()
    assert torch.equal(keep.cpu(), expected_keep)
    assert_close(new_scores.cpu(), expected_scores.to(dtype), dtype)
    assert bool((new_scores.float() >= 0.2).all())


def test_soft_nms_with_zero_threshold_is_hard_nms_for_linear_method(backend, device):
    """Linear soft-NMS decays overlapping boxes; with IoU near 1 it reduces to dropping them."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3 + [[50.0, 50.0, 60.0, 60.0]], device=device)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6], device=device)
    keep, new_scores = ops.soft_nms(boxes, scores, 0.5, 0.5, 0.001, "linear")
    assert keep.tolist() == [0, 3]
    assert_close(new_scores.cpu(), torch.tensor([0.9, 0.6]), torch.float32)


def test_soft_nms_bad_input():
    with pytest.raises(ValueError, match="method must be one of"):
        ops.soft_nms(torch.zeros(2, 4), torch.zeros(2), method="hard")
    with pytest.raises(ValueError, match="sigma must be positive"):
        ops.soft_nms(torch.zeros(2, 4), torch.zeros(2), sigma=0.0)
    with pytest.raises(ValueError, match="scores must have shape"):
        ops.soft_nms(torch.zeros(2, 4), torch.zeros(3))


def test_mask_memory_bound_at_100k_boxes_in_one_segment(monkeypatch):
    """One bit per box pair of a segment: 100,000 boxes in one class need 1.25 GB < 2 GiB."""
    from tritondet.kernels import nms as family

    seen = {}

    def record(boxes, seg_start, seg_len, seg_mask_offset, tile_segment, tile_row, mask_words, max_len, thr):
        seen["words"] = mask_words
        return torch.zeros(boxes.shape[0], dtype=torch.bool)

    monkeypatch.setattr(family, "_segment_keep_triton", record)
    monkeypatch.setenv("TRITONDET_BACKEND", "triton")
    boxes, scores = random_set(100_000, seed=0)
    ops.batched_nms(boxes, scores, torch.zeros(100_000, dtype=torch.int64), 0.5)
    assert seen["words"] == 100_000 * math.ceil(100_000 / 32)
    assert seen["words"] * 4 < 2 * 2**30
