"""ops.match_boxes against torchvision's Matcher on box_iou, image by image, on both backends."""

import pytest
import torch
import torchvision
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.detection._utils import Matcher

from tritondet import ops
from tritondet.bench.inputs import random_boxes
from tritondet.kernels._launch import count_launches
from tritondet.kernels.box_iou import pairwise_iou_reference
from tritondet.measure.dispatch_audit import NoHostSync, _custom_op_body


def expected_matches(anchors, gt_boxes, gt_count, high, low, allow_low, iou_fn=torchvision.ops.box_iou):
    """Loop-level oracle: torchvision's Matcher per image; -1 everywhere without ground truth."""
    anchors = anchors.expand(gt_boxes.shape[0], *anchors.shape[-2:])
    rows = []
    for image in range(gt_boxes.shape[0]):
        count = int(gt_count[image])
        if count == 0 or anchors.shape[1] == 0:
            rows.append(torch.full((anchors.shape[1],), -1, dtype=torch.int64))
            continue
        quality = iou_fn(gt_boxes[image, :count], anchors[image])
        rows.append(Matcher(high, low, allow_low)(quality).cpu())
    return torch.stack(rows) if rows else torch.empty((0, anchors.shape[1]), dtype=torch.int64)


def check(anchors, gt_boxes, gt_count, high=0.7, low=0.3, allow_low=True, **kwargs):
    ours = ops.match_boxes(anchors, gt_boxes, gt_count, high, low, allow_low)
    expected = expected_matches(anchors, gt_boxes, gt_count, high, low, allow_low, **kwargs)
    assert ours.dtype == torch.int64
    assert ours.shape == expected.shape
    assert torch.equal(ours.cpu(), expected)
    return ours


@pytest.mark.parametrize("allow_low", [False, True])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("batch,num_anchors,num_gt", [(1, 1, 1), (3, 131, 7), (2, 257, 21)])
def test_random_boxes_match_torchvision(backend, device, allow_low, shared, batch, num_anchors, num_gt):
    generator = torch.Generator().manual_seed(batch * 1000 + num_anchors + num_gt)
    anchor_batch = () if shared else (batch,)
    anchors = random_boxes(num_anchors, generator=generator, batch=anchor_batch).to(device)
    gt_boxes = random_boxes(num_gt, generator=generator, batch=(batch,)).to(device)
    gt_count = torch.randint(0, num_gt + 1, (batch,), generator=generator)
    gt_count[0] = num_gt
    check(anchors, gt_boxes, gt_count, 0.5, 0.2, allow_low)


@pytest.mark.parametrize("allow_low", [False, True])
def test_ties_identical_gt_and_duplicate_anchors(backend, device, allow_low):
    base = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 40.0]])
    # Duplicate anchors tie for a GT's maximum; identical GT boxes tie for an anchor's argmax.
    anchors = torch.cat([base, base, base + 1.0, torch.tensor([[0.0, 0.0, 10.0, 20.0]])]).to(device)
    gt_boxes = torch.stack([torch.cat([base, base[:1]]), torch.cat([base[1:2], base[1:2], base[2:], base[:1]])])
    check(anchors, gt_boxes.to(device), torch.tensor([4, 3]), 0.7, 0.3, allow_low)


def test_iou_exactly_at_the_thresholds(backend, device):
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 40.0], [0.0, 0.0, 10.0, 5.0]]).to(device)
    gt_boxes = torch.tensor([[[0.0, 0.0, 10.0, 20.0]]]).to(device)  # IoUs 0.5, 0.5, 0.25 exactly
    assert ops.match_boxes(anchors, gt_boxes, [1], 0.5, 0.25).tolist() == [[0, 0, -2]]
    assert ops.match_boxes(anchors, gt_boxes, [1], 0.6, 0.5).tolist() == [[-2, -2, -1]]
    check(anchors, gt_boxes, torch.tensor([1]), 0.5, 0.25, False)
    check(anchors, gt_boxes, torch.tensor([1]), 0.6, 0.5, False)


def test_gt_outside_all_anchors_follows_torchvision_low_quality_rule(backend, device):
    generator = torch.Generator().manual_seed(3)
    anchors = random_boxes(50, generator=generator).to(device)
    outside = torch.tensor([[1000.0, 1000.0, 1010.0, 1010.0]])
    gt_boxes = torch.stack([torch.cat([random_boxes(2, generator=generator), outside])]).to(device)
    # The outside box's maximum IoU is 0: every anchor with IoU 0 to it keeps its argmax.
    ours = check(anchors, gt_boxes, torch.tensor([3]), 0.7, 0.3, True)
    assert (ours >= 0).sum() > 10
    check(anchors, gt_boxes, torch.tensor([3]), 0.7, 0.3, False)


def test_empty_ground_truth_and_empty_anchors(backend, device):
    generator = torch.Generator().manual_seed(5)
    anchors = random_boxes(9, generator=generator).to(device)
    no_slots = torch.zeros(2, 0, 4, device=device)
    assert torch.equal(ops.match_boxes(anchors, no_slots, [0, 0], 0.7, 0.3, True).cpu(), torch.full((2, 9), -1))
    gt_boxes = random_boxes(4, generator=generator, batch=(2,)).to(device)
    assert torch.equal(ops.match_boxes(anchors, gt_boxes, [0, 0], 0.7, 0.3, True).cpu(), torch.full((2, 9), -1))
    assert ops.match_boxes(torch.zeros(0, 4, device=device), gt_boxes, [4, 2], 0.7, 0.3, True).shape == (2, 0)
    assert ops.match_boxes(
        anchors, torch.zeros(0, 3, 4, device=device), torch.zeros(0, dtype=torch.long), 0.5, 0.5
    ).shape == (0, 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_dtypes_match_torchvision(backend, device, dtype):
    generator = torch.Generator().manual_seed(7)
    anchors = random_boxes(70, generator=generator).to(device, dtype)
    gt_boxes = random_boxes(5, generator=generator, batch=(2,)).to(device, dtype)
    check(anchors, gt_boxes, torch.tensor([5, 2]), 0.6, 0.4, True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32])
def test_low_precision_and_integer_boxes_use_fp32_iou(backend, device, dtype):
    """torchvision forms half-precision IoUs in half precision; we upcast (as ops.box_iou does)."""
    generator = torch.Generator().manual_seed(11)
    anchors = (random_boxes(40, generator=generator, scale=50.0)).round().to(device, dtype)
    gt_boxes = (random_boxes(6, generator=generator, scale=50.0, batch=(2,))).round().to(device, dtype)
    iou_fn = lambda a, b: pairwise_iou_reference(a, b, "iou")
    check(anchors, gt_boxes, torch.tensor([6, 3]), 0.5, 0.3, True, iou_fn=iou_fn)


def test_non_contiguous_inputs(backend, device):
    generator = torch.Generator().manual_seed(13)
    wide = torch.cat([random_boxes(60, generator=generator), torch.rand(60, 2, generator=generator)], dim=1)
    anchors = wide.to(device)[::2, :4]
    gt_boxes = random_boxes(5, generator=generator, batch=(2,)).transpose(0, 1).contiguous().transpose(0, 1)
    assert not anchors.is_contiguous() and not gt_boxes.is_contiguous()
    check(anchors, gt_boxes.to(device), torch.tensor([5, 4]), 0.5, 0.3, True)


def test_mixed_dtypes_promote(backend, device):
    generator = torch.Generator().manual_seed(15)
    anchors = random_boxes(30, generator=generator).to(device, torch.float64)
    gt_boxes = random_boxes(3, generator=generator, batch=(1,)).to(device)
    check(anchors, gt_boxes.double(), torch.tensor([3]), 0.5, 0.3, True)
    assert torch.equal(
        ops.match_boxes(anchors, gt_boxes, [3], 0.5, 0.3), ops.match_boxes(anchors, gt_boxes.double(), [3], 0.5, 0.3)
    )


@pytest.mark.parametrize("allow_low", [False, True])
def test_no_host_sync_and_fixed_launches(backend, device, allow_low):
    generator = torch.Generator().manual_seed(17)
    anchors = random_boxes(100, generator=generator).to(device)
    gt_boxes = random_boxes(8, generator=generator, batch=(2,)).to(device)
    gt_count = torch.tensor([8, 0], device=device)
    with NoHostSync(), count_launches() as launches:
        ops.match_boxes(anchors, gt_boxes, gt_count, 0.7, 0.3, allow_low)
    assert launches.launches == ((2 if allow_low else 1) if backend == "triton" else 0)


def test_opcheck(backend, device):
    generator = torch.Generator().manual_seed(19)
    anchors = random_boxes(20, generator=generator, batch=(2,)).to(device)
    gt_boxes = random_boxes(3, generator=generator, batch=(2,)).to(device)
    gt_count = torch.tensor([3, 1], device=device)
    torch.library.opcheck(
        torch.ops.tritondet.match_boxes.default, (anchors, gt_boxes, gt_count, 0.7, 0.3, float("-inf"), True)
    )


def test_torch_compile_fullgraph(backend, device):
    generator = torch.Generator().manual_seed(23)
    anchors = random_boxes(20, generator=generator).to(device)
    gt_boxes = random_boxes(3, generator=generator, batch=(2,)).to(device)
    gt_count = torch.tensor([3, 2], device=device)
    fn = lambda a, g, c: ops.match_boxes(a, g, c, 0.7, 0.3, True)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(anchors, gt_boxes, gt_count), fn(anchors, gt_boxes, gt_count))


@pytest.mark.parametrize(
    "anchors,gt_boxes,gt_count,error,match",
    [
        (
            torch.zeros(5, 4),
            torch.zeros(2, 3, 4),
            torch.tensor([4, 1]),
            ValueError,
            r"gt_count values must lie in \[0, 3\]",
        ),
        (torch.zeros(5, 4), torch.zeros(2, 3, 4), torch.tensor([-1, 1]), ValueError, "gt_count values"),
        (torch.zeros(5, 4), torch.zeros(2, 3, 4), torch.tensor([1]), ValueError, r"gt_count must have shape \[B\]"),
        (torch.zeros(5, 4), torch.zeros(2, 3, 4), torch.tensor([1.0, 1.0]), TypeError, "gt_count must be an integer"),
        (torch.zeros(5, 4), torch.zeros(3, 4), torch.tensor([1]), ValueError, r"gt_boxes must have shape \[B, G, 4\]"),
        (
            torch.zeros(5, 3),
            torch.zeros(2, 3, 4),
            torch.tensor([1, 1]),
            ValueError,
            "anchors_or_proposals must have shape",
        ),
        (torch.zeros(3, 5, 4), torch.zeros(2, 3, 4), torch.tensor([1, 1]), ValueError, "B = 2"),
        ([[0, 0, 1, 1]], torch.zeros(2, 3, 4), torch.tensor([1, 1]), TypeError, "anchors_or_proposals must be"),
    ],
)
def test_bad_input_is_named(anchors, gt_boxes, gt_count, error, match):
    with pytest.raises(error, match=match):
        ops.match_boxes(anchors, gt_boxes, gt_count, 0.7, 0.3)


def test_low_above_high_is_rejected():
    with pytest.raises(ValueError, match="low must be <= high"):
        ops.match_boxes(torch.zeros(5, 4), torch.zeros(1, 3, 4), [1], 0.3, 0.7)


@pytest.mark.slow
def test_fpn_size_250k_anchors_100_gt(backend, device):
    """FPN at 1333x800 has ~250k anchors; 100 ground-truth boxes per image."""
    generator = torch.Generator().manual_seed(29)
    anchors = random_boxes(250_000, generator=generator, scale=600.0).to(device)
    gt_boxes = random_boxes(100, generator=generator, scale=600.0, batch=(1,)).to(device)
    check(anchors, gt_boxes, torch.tensor([100]), 0.7, 0.3, True)


@pytest.mark.parametrize("allow_low", [False, True])
def test_ties_across_tiles_and_chunks(backend, device, allow_low):
    """Identical GT boxes 17 slots apart (different GT chunks) and duplicate anchors 200 apart
    (different anchor tiles): first argmax wins, every tied anchor gets the low-quality match."""
    generator = torch.Generator().manual_seed(31)
    anchors = random_boxes(300, generator=generator)
    anchors[200:260] = anchors[0:60]
    gt_boxes = random_boxes(24, generator=generator, batch=(2,))
    gt_boxes[:, 20] = gt_boxes[:, 3]
    gt_boxes[1, 5] = anchors[7]  # IoU exactly 1 with anchors 7 and 207
    ours = check(anchors.to(device), gt_boxes.to(device), torch.tensor([24, 21]), 0.5, 0.3, allow_low)
    assert ours[1, 7] == ours[1, 207] == 5


class _LargestAllocation(TorchDispatchMode):
    """The largest tensor any ATen op allocates inside the block (entering tritondet custom ops)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = _custom_op_body(func)
        if body is not None:
            with self:
                return body(*args, **(kwargs or {}))
        result = func(*args, **(kwargs or {}))
        # Views and in-place ops (the interpreter's set_/copy_ of the kernels' buffers) allocate nothing.
        if func.is_view or func._schema.name.endswith("_"):
            return result
        for tensor in pytree.tree_leaves(result):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return result


def test_triton_path_never_builds_the_iou_matrix(monkeypatch, device):
    monkeypatch.setenv("TRITONDET_BACKEND", "triton")
    generator = torch.Generator().manual_seed(37)
    batch, num_anchors, num_gt = 2, 300, 40
    anchors = random_boxes(num_anchors, generator=generator).to(device)
    gt_boxes = random_boxes(num_gt, generator=generator, batch=(batch,)).to(device)
    with _LargestAllocation() as mode:
        ops.match_boxes(anchors, gt_boxes, torch.tensor([num_gt, 7], device=device), 0.7, 0.3, True)
    # The [B, A] output is the largest tensor: O(B·(A + G)), nothing of size B·A·G.
    assert mode.largest == batch * num_anchors
