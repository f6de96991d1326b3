"""Balanced sampling and the anchor / proposal target layers against torchvision's RPN and RoIHeads."""

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

from tests.tolerances import assert_close
from tritondet import ops
from tritondet.bench.inputs import random_boxes
from tritondet.kernels import targets as targets_family
from tritondet.measure.dispatch_audit import NoHostSync

# ---------------------------------------------------------------------------------------------
# sample_balanced
# ---------------------------------------------------------------------------------------------


def random_matches(batch, n, generator, num_pos=None):
    """[B, N] matched indices in {-2, -1, 0..3}; the first row has exactly ``num_pos`` positives if given."""
    matched = torch.randint(-2, 4, (batch, n), generator=generator)
    if num_pos is not None:
        matched[0] = torch.where(torch.arange(n) < num_pos, 1, -1)[torch.randperm(n, generator=generator)]
    return matched


@pytest.mark.parametrize("size,fraction", [(256, 0.5), (512, 0.25), (128, 0.25), (7, 0.3), (0, 0.5)])
@pytest.mark.parametrize("n,num_pos", [(1000, None), (300, 3), (50, 0), (20, 20), (0, None)])
def test_counts_follow_torchvision_rule(device, size, fraction, n, num_pos):
    generator = torch.Generator().manual_seed(n + size)
    matched = random_matches(4, n, generator, num_pos).to(device)
    pos, neg = ops.sample_balanced(matched, size, fraction, torch.Generator(device).manual_seed(0))
    assert pos.dtype == neg.dtype == torch.bool and pos.shape == neg.shape == matched.shape
    assert not (pos & neg).any()
    assert bool((matched[pos] >= 0).all()) and bool((matched[neg] == -1).all())
    labels = torch.where(matched >= 0, 1, torch.where(matched == -1, 0, -1))
    theirs_pos, theirs_neg = BalancedPositiveNegativeSampler(size, fraction)(list(labels.cpu()))
    assert pos.sum(1).tolist() == [int(m.sum()) for m in theirs_pos]
    assert neg.sum(1).tolist() == [int(m.sum()) for m in theirs_neg]


@pytest.mark.parametrize("size,fraction", [(512, 0.25), (7, 0.3), (64, 1.0), (64, 0.0), (0, 0.5)])
@pytest.mark.parametrize("n,num_pos", [(2020, None), (301, 3), (50, 0), (20, 20), (1, 1), (0, None)])
def test_proposal_sampler_takes_sample_balanced_sets_in_index_order(device, size, fraction, n, num_pos):
    """The proposal target layer's sampled slots: ``sample_balanced``'s sets for the same keys (the
    same generator state), compacted to the front in index order; odd sizes, fewer candidates than
    slots, no positives, only positives, every value of the matcher (-3 and -2 never sampled)."""
    generator = torch.Generator().manual_seed(n + size)
    matched = random_matches(3, n, generator, num_pos).to(device)
    matched[1, ::5] = -3  # the proposal layer's padding and below-floor code
    matched[2] = -1  # all background
    index, unfilled = targets_family._sampled_slots(
        matched, targets_family._sample_keys(matched, torch.Generator(device).manual_seed(0)), size, fraction
    )
    filled = ~unfilled
    pos, neg = ops.sample_balanced(matched, size, fraction, torch.Generator(device).manual_seed(0))
    assert index.shape == filled.shape == (3, size) and index.dtype == torch.int64
    for row in range(3):
        expected = (pos[row] | neg[row]).nonzero()[:, 0]
        assert int(filled[row].sum()) == expected.numel()
        assert bool(filled[row, : expected.numel()].all())  # the filled slots are a prefix
        assert torch.equal(index[row, : expected.numel()], expected)
        assert bool(((index[row] >= 0) & (index[row] < max(n, 1))).all())  # every slot gatherable


@pytest.mark.parametrize("size,fraction", [(512, 0.25), (7, 0.3), (64, 1.0), (64, 0.0), (0, 0.5)])
@pytest.mark.parametrize("n,num_pos", [(2020, None), (301, 3), (50, 0), (20, 20), (1, 1), (0, None)])
def test_cpu_proposal_sampler_fills_the_same_slots(size, fraction, n, num_pos):
    """The CPU path's slots (from the candidates' masks) are the fixed-shape sampler's for the same keys."""
    matched = random_matches(3, n, torch.Generator().manual_seed(n + size), num_pos)
    matched[1, ::5] = -3
    matched[2] = -1
    keys = targets_family._sample_keys(matched, torch.Generator().manual_seed(0))
    index, unfilled = targets_family._sampled_slots(matched, keys, size, fraction)
    cpu_index, cpu_unfilled = targets_family._sampled_slots_cpu(matched >= 0, matched == -1, keys, size, fraction)
    assert cpu_index.shape == cpu_unfilled.shape == (3, size) and cpu_index.dtype == torch.int64
    assert torch.equal(cpu_unfilled, unfilled)
    assert torch.equal(cpu_index[~unfilled], index[~unfilled])
    assert bool(((cpu_index >= 0) & (cpu_index < max(n, 1))).all())  # every slot gatherable


def test_fraction_respected_and_batch_filled(device):
    matched = random_matches(3, 5000, torch.Generator().manual_seed(1)).to(device)
    pos, neg = ops.sample_balanced(matched, 512, 0.25, torch.Generator(device).manual_seed(0))
    assert pos.sum(1).tolist() == [128] * 3
    assert neg.sum(1).tolist() == [384] * 3


def test_same_seed_same_masks_other_seed_other_masks(device):
    matched = random_matches(2, 2000, torch.Generator().manual_seed(2)).to(device)
    first = ops.sample_balanced(matched, 256, 0.5, torch.Generator(device).manual_seed(7))
    again = ops.sample_balanced(matched, 256, 0.5, torch.Generator(device).manual_seed(7))
    other = ops.sample_balanced(matched, 256, 0.5, torch.Generator(device).manual_seed(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])


def test_selection_is_uniform(device):
    """4 of 10 positives and 6 of 10 negatives per row: every candidate chosen with p = 0.4 / 0.6."""
    rows = 4000
    matched = torch.tensor([0] * 10 + [-1] * 10 + [-2] * 5).repeat(rows, 1).to(device)
    pos, neg = ops.sample_balanced(matched, 10, 0.4, torch.Generator(device).manual_seed(3))
    pos_rate, neg_rate = pos.double().mean(0).cpu(), neg.double().mean(0).cpu()
    # Binomial(4000, 0.4) has standard deviation 0.0077 as a rate: 6 sigma is 0.047.
    assert (pos_rate[:10] - 0.4).abs().max() < 0.047 and (neg_rate[10:20] - 0.6).abs().max() < 0.047
    assert pos_rate[10:].sum() == 0 and neg_rate[:10].sum() == 0 and neg_rate[20:].sum() == 0


def test_sampler_no_host_sync(device):
    matched = random_matches(2, 500, torch.Generator().manual_seed(4)).to(device)
    with NoHostSync() as mode:
        ops.sample_balanced(matched, 256, 0.5, torch.Generator(device).manual_seed(0))
    assert mode.syncs == 0


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.zeros(2, 3, dtype=torch.long), -1, 0.5), ValueError, "batch_size_per_image"),
        ((torch.zeros(2, 3, dtype=torch.long), 8, 1.5), ValueError, "positive_fraction"),
        ((torch.zeros(2, 3), 8, 0.5), ValueError, "matched_idx must be an integer tensor of shape"),
        ((torch.zeros(3, dtype=torch.long), 8, 0.5), ValueError, r"shape \[B, N\]"),
        ((torch.zeros(2, 3, dtype=torch.long), 8, 0.5, 3), TypeError, "generator"),
        (
            (torch.zeros(2, 3, dtype=torch.long, device="meta"), 8, 0.5, torch.Generator()),
            ValueError,
            "generator must be on",
        ),
    ],
)
def test_sampler_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        ops.sample_balanced(*args)


# ---------------------------------------------------------------------------------------------
# Anchor target layer
# ---------------------------------------------------------------------------------------------


def torchvision_rpn_targets(anchors, gt_boxes, gt_count):
    """torchvision's RPN labels (1 / 0 / -1 before sampling) and encoded matched boxes, per image."""
    rpn = RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, {}, {}, 0.7)
    targets = [{"boxes": gt_boxes[b, : int(gt_count[b])]} for b in range(gt_boxes.shape[0])]
    anchor_list = [anchors] * len(targets)
    labels, matched_gt = rpn.assign_targets_to_anchors(anchor_list, targets)
    encoded = rpn.box_coder.encode(matched_gt, anchor_list)
    return torch.stack(labels), torch.stack(encoded)


def test_anchor_targets_match_torchvision_rpn(backend, device):
    generator = torch.Generator().manual_seed(5)
    anchors = random_boxes(400, generator=generator).to(device)
    gt_boxes = random_boxes(6, generator=generator, batch=(3,)).to(device)
    gt_boxes[1, 2] = torch.tensor([1000.0, 1000.0, 1010.0, 1010.0])  # outside every anchor
    gt_boxes[1, 3] = gt_boxes[1, 0]  # identical ground truth
    gt_count = torch.tensor([6, 4, 0])
    ours = ops.anchor_targets(anchors, gt_boxes, gt_count, generator=torch.Generator(device).manual_seed(0))
    labels, encoded = torchvision_rpn_targets(anchors.cpu(), gt_boxes.cpu(), gt_count)
    sampled = ours.labels >= 0
    assert torch.equal(ours.labels.cpu()[sampled.cpu()], labels.long()[sampled.cpu()])
    for b in range(3):
        num_pos = min(128, int((labels[b] == 1).sum()))
        assert int((ours.labels[b] == 1).sum()) == num_pos
        assert int((ours.labels[b] == 0).sum()) == min(256 - num_pos, int((labels[b] == 0).sum()))
    positive = (ours.labels == 1).cpu()
    assert_close(ours.regression_targets.cpu()[positive], encoded[positive], torch.float32)
    assert not ours.regression_targets.cpu()[~positive].any()
    assert ours.labels.dtype == torch.int64 and ours.regression_targets.shape == (3, 400, 4)


def test_anchor_targets_deterministic_no_host_sync(backend, device):
    generator = torch.Generator().manual_seed(6)
    anchors = random_boxes(300, generator=generator, batch=(2,)).to(device)
    gt_boxes = random_boxes(4, generator=generator, batch=(2,)).to(device)
    gt_count = torch.tensor([4, 1], device=device)
    with NoHostSync():
        first = ops.anchor_targets(anchors, gt_boxes, gt_count, generator=torch.Generator(device).manual_seed(1))
    second = ops.anchor_targets(anchors, gt_boxes, gt_count, generator=torch.Generator(device).manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


# ---------------------------------------------------------------------------------------------
# Proposal target layer
# ---------------------------------------------------------------------------------------------


def torchvision_box_head_labels(proposals, proposal_count, gt_boxes, gt_labels, gt_count):
    """torchvision's RoIHeads: ground truth appended, matched labels (0 background, -1 ignored)."""
    heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100)
    props = [proposals[b, : int(proposal_count[b])] for b in range(proposals.shape[0])]
    gts = [gt_boxes[b, : int(gt_count[b])] for b in range(proposals.shape[0])]
    labels = [gt_labels[b, : int(gt_count[b])] for b in range(proposals.shape[0])]
    props = heads.add_gt_proposals(props, gts)
    matched, matched_labels = heads.assign_targets_to_proposals(props, gts, labels)
    return props, matched, matched_labels


def candidate_position(index, num_proposals, proposal_count):
    """Our index into cat([proposals, gt_boxes]) -> torchvision's into cat([real proposals, real gt])."""
    return index if index < num_proposals else proposal_count + index - num_proposals


@pytest.mark.parametrize("size", [512, 128])
def test_proposal_targets_match_torchvision_roi_heads(backend, device, size):
    generator = torch.Generator().manual_seed(size)
    num_classes = 5
    gt_boxes = random_boxes(5, generator=generator, batch=(3,))
    gt_boxes[0, 4] = gt_boxes[0, 1]  # identical ground truth
    # Proposals near the ground truth, so there are foreground candidates.
    near = gt_boxes.repeat(1, 40, 1) + torch.randn(3, 200, 4, generator=generator) * 8
    proposals = torch.cat([near, random_boxes(100, generator=generator, batch=(3,))], dim=1)
    proposals = torch.cat([proposals[..., :2], torch.maximum(proposals[..., 2:], proposals[..., :2] + 1)], dim=-1)
    gt_labels = torch.randint(1, num_classes, (3, 5), generator=generator)
    gt_count, proposal_count = torch.tensor([5, 2, 0]), torch.tensor([300, 250, 40])
    ours = ops.proposal_targets(
        proposals.to(device),
        gt_boxes.to(device),
        gt_labels.to(device),
        gt_count,
        num_classes,
        proposal_count=proposal_count,
        batch_size_per_image=size,
        generator=torch.Generator(device).manual_seed(0),
    )
    props, matched, labels = torchvision_box_head_labels(proposals, proposal_count, gt_boxes, gt_labels, gt_count)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    for b in range(3):
        filled = ours.sampled_idx[b] >= 0
        positions = [candidate_position(int(i), 300, int(proposal_count[b])) for i in ours.sampled_idx[b][filled]]
        assert positions == sorted(positions)  # torchvision's order: sampled candidates by index
        assert torch.equal(ours.labels[b][filled].cpu(), labels[b][positions])
        assert bool((ours.labels[b][~filled] == -1).all())
        assert_close(ours.proposals[b][filled].cpu(), props[b][positions], torch.float32)
        num_fg = min(int(size * 0.25), int((labels[b] > 0).sum()))
        assert int((ours.labels[b] > 0).sum()) == num_fg
        assert int((ours.labels[b] == 0).sum()) == min(size - num_fg, int((labels[b] == 0).sum()))
        foreground = (ours.labels[b] > 0).cpu()
        if foreground.any():
            fg_pos = [p for p, f in zip(positions, foreground[filled].tolist(), strict=True) if f]
            expected = coder.encode_single(gt_boxes[b][matched[b][fg_pos]], props[b][fg_pos])
            assert_close(ours.regression_targets[b].cpu()[foreground], expected, torch.float32)
        assert not ours.regression_targets[b].cpu()[~foreground].any()
    assert ours.regression_targets.shape == (3, size, 4)


def test_background_band_of_fast_rcnn(backend, device):
    """bg_iou_thresh_low 0.1: every background proposal has max IoU in [0.1, 0.5)."""
    generator = torch.Generator().manual_seed(8)
    gt_boxes = random_boxes(3, generator=generator, batch=(1,))
    proposals = gt_boxes.repeat(1, 60, 1) + torch.randn(1, 180, 4, generator=generator) * 20
    proposals = torch.cat(
        [proposals[..., :2], proposals[..., :2] + (proposals[..., 2:] - proposals[..., :2]).abs() + 1], -1
    )
    ours = ops.proposal_targets(
        proposals.to(device),
        gt_boxes.to(device),
        torch.tensor([[1, 2, 3]], device=device),
        [3],
        4,
        bg_iou_thresh_low=0.1,
        batch_size_per_image=128,
        generator=torch.Generator(device).manual_seed(0),
    )
    max_iou = torchvision.ops.box_iou(ours.proposals[0].cpu(), gt_boxes[0]).max(dim=1).values
    background = (ours.labels[0] == 0).cpu()
    assert background.any()
    assert bool(((max_iou[background] >= 0.1) & (max_iou[background] < 0.5)).all())
    assert bool((max_iou[(ours.labels[0] > 0).cpu()] >= 0.5).all())
    candidates = torch.cat([proposals[0], gt_boxes[0]])
    band = torchvision.ops.box_iou(candidates, gt_boxes[0]).max(dim=1).values
    in_band = int(((band >= 0.1) & (band < 0.5)).sum())
    num_fg = min(32, int((band >= 0.5).sum()))
    assert int(background.sum()) == min(128 - num_fg, in_band)


def test_proposal_targets_pads_when_few_candidates_and_no_sync(backend, device):
    generator = torch.Generator().manual_seed(9)
    proposals = random_boxes(10, generator=generator, batch=(2,)).to(device)
    gt_boxes = random_boxes(2, generator=generator, batch=(2,)).to(device)
    gt_labels = torch.tensor([[1, 2], [3, 1]], device=device)
    with NoHostSync():
        ours = ops.proposal_targets(
            proposals, gt_boxes, gt_labels, torch.tensor([2, 1], device=device), 4, batch_size_per_image=64
        )
    assert ours.labels.shape == (2, 64)
    assert (ours.labels >= 0).sum(1).tolist() == [12, 11]  # every valid candidate is sampled
    assert bool((ours.sampled_idx[ours.labels < 0] == -1).all())


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"gt_count": [3, 1]}, ValueError, r"gt_count values must lie in \[0, 2\]"),
        ({"gt_count": [-1, 1]}, ValueError, "gt_count values"),
        ({"gt_labels": torch.tensor([[1, 9], [1, 1]])}, ValueError, r"gt_labels values must lie in \[0, 4\]"),
        (
            {"gt_labels": torch.ones(2, 3, dtype=torch.long)},
            ValueError,
            r"gt_labels must be an integer tensor of shape",
        ),
        ({"proposals": torch.zeros(3, 5, 4)}, ValueError, "proposals must have shape"),
        ({"proposal_count": [6, 1]}, ValueError, "proposal_count values"),
        ({"bg_iou_thresh_low": 0.6}, ValueError, "bg_iou_thresh_low <= bg_iou_thresh"),
        ({"weights": (1.0, 1.0)}, ValueError, "weights must have 4 elements"),
        ({"num_classes": 0}, ValueError, "num_classes"),
    ],
)
def test_proposal_targets_bad_input(kwargs, error, match):
    args = {
        "proposals": torch.zeros(2, 5, 4),
        "gt_boxes": torch.zeros(2, 2, 4),
        "gt_labels": torch.ones(2, 2, dtype=torch.long),
        "gt_count": [2, 1],
        "num_classes": 5,
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ops.proposal_targets(**args)


def test_anchor_targets_bad_input():
    with pytest.raises(ValueError, match="bg_iou_thresh must be <= fg_iou_thresh"):
        ops.anchor_targets(torch.zeros(5, 4), torch.zeros(1, 2, 4), [1], fg_iou_thresh=0.3, bg_iou_thresh=0.7)
    with pytest.raises(ValueError, match="anchors must have shape"):
        ops.anchor_targets(torch.zeros(3, 5, 4), torch.zeros(1, 2, 4), [1])
    with pytest.raises(TypeError, match="weights must be 4 Python numbers"):
        ops.anchor_targets(torch.zeros(5, 4), torch.zeros(1, 2, 4), [1], weights=torch.ones(4))


def test_sampler_and_target_layers_compile_fullgraph(backend, device):
    generator = torch.Generator().manual_seed(10)
    anchors = random_boxes(200, generator=generator).to(device)
    gt_boxes = random_boxes(4, generator=generator, batch=(2,)).to(device)
    gt_count = torch.tensor([4, 1], device=device)
    gt_labels = torch.tensor([[1, 2, 3, 1], [2, 0, 0, 0]], device=device)
    proposals = random_boxes(50, generator=generator, batch=(2,)).to(device)
    eager = ops.anchor_targets(anchors, gt_boxes, gt_count)
    compiled = torch.compile(ops.anchor_targets, fullgraph=True, backend="aot_eager")(anchors, gt_boxes, gt_count)
    assert torch.equal(compiled.matched_idx, eager.matched_idx)
    assert torch.equal((compiled.labels == 1).sum(1), (eager.labels == 1).sum(1))
    assert torch.equal((compiled.labels == 0).sum(1), (eager.labels == 0).sum(1))
    fn = lambda p, g, labels, c: ops.proposal_targets(p, g, labels, c, 4, batch_size_per_image=32)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(proposals, gt_boxes, gt_labels, gt_count)
    eager = fn(proposals, gt_boxes, gt_labels, gt_count)
    assert compiled.regression_targets.shape == eager.regression_targets.shape == (2, 32, 4)
    assert torch.equal((compiled.labels > 0).sum(1), (eager.labels > 0).sum(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_target_dtypes(backend, device, dtype):
    """Matching and encoding in fp32 (fp64 for fp64 boxes), whatever the boxes' dtype."""
    generator = torch.Generator().manual_seed(12)
    anchors = random_boxes(120, generator=generator, scale=50.0).to(device, dtype)
    gt_boxes = anchors[None, :3].clone() + 1
    gt_count = torch.tensor([3], device=device)
    ours = ops.anchor_targets(anchors, gt_boxes, gt_count, generator=torch.Generator(device).manual_seed(0))
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert ours.regression_targets.dtype == expected_dtype
    matched = ops.match_boxes(anchors.to(expected_dtype), gt_boxes.to(expected_dtype), gt_count, 0.7, 0.3, True)
    assert torch.equal(ours.matched_idx, matched)
    positive = ours.labels == 1
    assert positive.any()
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    wide = anchors.to(expected_dtype)
    expected = coder.encode_single(gt_boxes[0].to(expected_dtype)[matched[0].clamp(min=0)], wide)
    assert_close(ours.regression_targets[0][positive[0]], expected[positive[0]], expected_dtype)
    labels = torch.tensor([[1, 2, 3]], device=device)
    proposals = ops.proposal_targets(anchors[None], gt_boxes, labels, gt_count, 4, batch_size_per_image=32)
    assert proposals.proposals.dtype == proposals.regression_targets.dtype == expected_dtype


def test_proposal_targets_fast_cpu_path_is_the_reference(monkeypatch):
    """The fast CPU path's class rows (zeros with one row scattered per slot) and matching are the
    reference's, with the same sampler draws."""
    generator = torch.Generator().manual_seed(14)
    gt_boxes = random_boxes(6, generator=generator, batch=(2,))
    proposals = torch.cat([gt_boxes.repeat(1, 20, 1) + 2.0, random_boxes(80, generator=generator, batch=(2,))], 1)
    gt_labels = torch.randint(1, 7, (2, 6), generator=generator)
    results = {}
    for name in ("reference", "cpu"):
        monkeypatch.setenv("TRITONDET_BACKEND", name)
        results[name] = ops.proposal_targets(
            proposals,
            gt_boxes,
            gt_labels,
            [6, 3],
            7,
            batch_size_per_image=64,
            generator=torch.Generator().manual_seed(0),
        )
    for ours, reference in zip(results["cpu"], results["reference"], strict=True):
        assert ours.dtype == reference.dtype and ours.shape == reference.shape
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(8))
def test_proposal_targets_fast_cpu_path_is_the_reference_on_edge_cases(monkeypatch, seed):
    """Padding of either set, images without ground truth, no ground truth at all, a NaN and an
    empty proposal, a NaN ground truth (every IoU of its image NaN) and an empty one (a NaN IoU
    with the empty proposal only), identical ground truth, every box dtype, odd slot counts and
    fractions."""
    generator = torch.Generator().manual_seed(seed)
    batch, num_proposals, num_gt = 3, 40 + seed, (0, 1, 4, 5)[seed % 4]
    gt_boxes = random_boxes(num_gt, generator=generator, batch=(batch,), scale=50.0)
    if num_gt > 1:
        gt_boxes[0, 1] = gt_boxes[0, 0]
    near = (gt_boxes.repeat(1, 5, 1) + torch.randn(batch, 5 * num_gt, 4, generator=generator) * 3)[:, :num_proposals]
    far = random_boxes(num_proposals - near.shape[1], generator=generator, batch=(batch,), scale=50.0)
    proposals = torch.cat([near, far], dim=1)
    proposals[0, 1] = float("nan")
    proposals[1, 2] = torch.tensor([5.0, 5.0, 5.0, 5.0])
    if num_gt > 1 and seed % 3 == 0:
        gt_boxes[0, 1] = float("nan")
        gt_boxes[1, 0] = torch.tensor([5.0, 5.0, 5.0, 5.0])
    dtype = (torch.float32, torch.float64, torch.float16, torch.bfloat16)[seed % 4]
    kwargs = {
        "proposal_count": None if seed % 2 else torch.tensor([num_proposals, 3, num_proposals - 1]),
        "batch_size_per_image": (512, 16, 7, 64)[seed % 4],
        "positive_fraction": (0.25, 0.5, 1.0, 0.0)[seed // 2 % 4],
        "bg_iou_thresh_low": (0.0, 0.1)[seed % 2],
    }
    gt_count = torch.tensor([num_gt, max(num_gt - 1, 0), 0])
    gt_labels = torch.randint(1, 5, (batch, num_gt), generator=generator)
    results = {}
    for name in ("reference", "cpu"):
        monkeypatch.setenv("TRITONDET_BACKEND", name)
        results[name] = ops.proposal_targets(
            proposals.to(dtype),
            gt_boxes.to(dtype),
            gt_labels,
            gt_count,
            5,
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )
    for ours, reference in zip(results["cpu"], results["reference"], strict=True):
        assert ours.dtype == reference.dtype and ours.shape == reference.shape
        torch.testing.assert_close(ours, reference, rtol=0, atol=0, equal_nan=True)
