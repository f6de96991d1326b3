"""RPN proposals against torchvision's RegionProposalNetwork post-processing, on both backends."""

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers

from tritondet import ops
from tritondet.kernels import nms as nms_kernels
from tritondet.kernels import rpn_proposals as rpn_kernels
from tritondet.kernels.anchors import anchor_parameters, normalize_config
from tritondet.kernels.box_coder import DEFAULT_XFORM_CLIP
from tritondet.measure.dispatch_audit import DispatchCounter, NoHostSync

FPN = (((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5, [4, 8, 16, 32, 64])
PAPER = (((128, 256, 512),), ((0.5, 1.0, 2.0),), [16])
TRAIN, TEST = (2000, 2000), (1000, 1000)


def head_outputs(config, padded, batch, seed, dtype=torch.float32, delta_scale=0.5, logit_shift=0.0, device="cpu"):
    """Random per-level objectness [B, A, H, W] and deltas [B, 4A, H, W] for a padded image size."""
    sizes, ratios, strides = config
    generator = torch.Generator().manual_seed(seed)
    objectness, deltas = [], []
    for level_sizes, level_ratios, stride in zip(sizes, ratios, strides, strict=True):
        a = len(level_sizes) * len(level_ratios)
        h, w = padded[0] // stride, padded[1] // stride
        objectness.append((torch.randn(batch, a, h, w, generator=generator) * 3 + logit_shift).to(device, dtype))
        deltas.append((torch.randn(batch, 4 * a, h, w, generator=generator) * delta_scale).to(device, dtype))
    return objectness, deltas


def torchvision_proposals(
    config, padded, image_sizes, objectness, deltas, top_n, nms_thresh=0.7, score_thresh=0.0, min_size=1e-3
):
    """torchvision's RPN forward minus the head: anchors, BoxCoder.decode, filter_proposals."""
    sizes, ratios, _ = config
    batch = objectness[0].shape[0]
    images = ImageList(torch.zeros(batch, 3, *padded, device=objectness[0].device), image_sizes)
    pre, post = top_n
    rpn = RegionProposalNetwork(
        TorchvisionAnchorGenerator(sizes, ratios),
        RPNHead(1, 1),
        0.7,
        0.3,
        256,
        0.5,
        {"training": pre, "testing": pre},
        {"training": post, "testing": post},
        nms_thresh,
        score_thresh,
    )
    rpn.min_size = min_size
    anchors = rpn.anchor_generator(images, objectness)
    counts = [o[0].numel() for o in objectness]
    flat_objectness, flat_deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(flat_deltas.detach(), anchors).view(batch, -1, 4)
    return rpn.filter_proposals(proposals, flat_objectness, images.image_sizes, counts)


def ours(config, image_sizes, objectness, deltas, top_n, **kwargs):
    sizes, ratios, strides = config
    sizes_tensor = torch.tensor(image_sizes, device=objectness[0].device)
    return ops.rpn_proposals(objectness, deltas, sizes_tensor, sizes, ratios, strides, *top_n, **kwargs)


def assert_same_proposals(result, expected, top_n):
    """Same count, same scores in the same order, same boxes; among equal scores any order
    (torchvision's order of tied candidates is the arbitrary one of an unstable sort)."""
    boxes, scores, num_valid = result
    batch = len(expected[0])
    assert boxes.shape == (batch, top_n[1], 4) and scores.shape == (batch, top_n[1]) and num_valid.shape == (batch,)
    for b, (expected_boxes, expected_scores) in enumerate(zip(*expected, strict=True)):
        n = int(num_valid[b])
        assert n == expected_boxes.shape[0], f"image {b}: {n} proposals, torchvision has {expected_boxes.shape[0]}"
        mine, theirs = boxes[b, :n].cpu(), expected_boxes.float().cpu()
        torch.testing.assert_close(scores[b, :n].cpu(), expected_scores.float().cpu(), rtol=1e-4, atol=1e-6)
        same_box = ((mine[:, None] - theirs[None]).abs() <= 1e-3 + 1e-4 * theirs[None].abs()).all(-1)
        same_score = (scores[b, :n, None].cpu() - expected_scores[None].float().cpu()).abs() <= 1e-6
        tied_order = torch.eye(n, dtype=torch.bool) | same_score
        matched = same_box & tied_order
        assert matched.any(1).all() and matched.any(0).all(), f"image {b}: boxes differ"
        assert (boxes[b, n:] == 0).all() and (scores[b, n:] == 0).all()


# (config, padded image, image sizes before padding, (pre_nms_top_n, post_nms_top_n)).
CASES = [
    (PAPER, (336, 528), [(333, 517)], TEST),
    (PAPER, (336, 528), [(333, 517), (300, 528), (336, 401)], TRAIN),
    (FPN, (192, 256), [(181, 255), (192, 201)], TEST),
    (FPN, (192, 256), [(181, 255)], TRAIN),
]
# The same shapes with fewer candidates: the Triton interpreter runs the NMS kernels slowly.
SMALL_TOP_N = (60, 30)


@pytest.mark.parametrize("config,padded,image_sizes,top_n", CASES)
def test_matches_torchvision_reference_backend(monkeypatch, device, config, padded, image_sizes, top_n):
    monkeypatch.setenv("TRITONDET_BACKEND", "reference")
    objectness, deltas = head_outputs(config, padded, len(image_sizes), seed=len(image_sizes), device=device)
    expected = torchvision_proposals(config, padded, image_sizes, objectness, deltas, top_n)
    assert_same_proposals(ours(config, image_sizes, objectness, deltas, top_n), expected, top_n)


@pytest.mark.parametrize("config,padded,image_sizes,top_n", CASES)
def test_candidates_triton_equal_reference(monkeypatch, device, config, padded, image_sizes, top_n):
    """The pre-NMS stage (top-k, decode, clip, filters, sigmoid) at full size on both backends."""
    objectness, deltas = head_outputs(config, padded, len(image_sizes), seed=len(image_sizes), device=device)
    sizes, ratios, strides = config
    flat_sizes, flat_ratios, counts = anchor_parameters(*normalize_config(sizes, ratios))
    args = (
        objectness,
        deltas,
        torch.tensor(image_sizes, device=device),
        [s for stride in strides for s in (stride, stride)],
        flat_sizes,
        flat_ratios,
        counts,
        top_n[0],
        1e-3,
        0.0,
        DEFAULT_XFORM_CLIP,
    )
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("TRITONDET_BACKEND", backend)
        results[backend] = torch.ops.tritondet.rpn_candidates(*args)
    (boxes, keys), (expected_boxes, expected_keys) = results["triton"], results["reference"]
    k = min(top_n[0], max(o[0].numel() for o in objectness))
    assert boxes.shape == expected_boxes.shape == (len(image_sizes), len(counts), k, 4)
    torch.testing.assert_close(keys, expected_keys, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(boxes, expected_boxes, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("config,padded,image_sizes,top_n", CASES)
def test_matches_torchvision(backend, device, config, padded, image_sizes, top_n):
    top_n = SMALL_TOP_N
    objectness, deltas = head_outputs(config, padded, len(image_sizes), seed=len(image_sizes), device=device)
    expected = torchvision_proposals(config, padded, image_sizes, objectness, deltas, top_n)
    assert_same_proposals(ours(config, image_sizes, objectness, deltas, top_n), expected, top_n)


@pytest.mark.slow
@pytest.mark.parametrize("config,padded,image_sizes,top_n", CASES)
def test_matches_torchvision_triton_full_size(monkeypatch, device, config, padded, image_sizes, top_n):
    monkeypatch.setenv("TRITONDET_BACKEND", "triton")
    objectness, deltas = head_outputs(config, padded, len(image_sizes), seed=len(image_sizes), device=device)
    expected = torchvision_proposals(config, padded, image_sizes, objectness, deltas, top_n)
    assert_same_proposals(ours(config, image_sizes, objectness, deltas, top_n), expected, top_n)


def test_small_top_n_and_odd_grid(backend, device):
    # Level sizes below pre_nms_top_n for some levels, above for others; odd grid sizes.
    config = (((24,), (48,)), ((0.5, 1.0, 2.0),) * 2, [8, 16])
    padded, image_sizes, top_n = (112, 144), [(101, 133), (77, 144)], (100, 40)
    objectness, deltas = head_outputs(config, padded, 2, seed=5, device=device)
    expected = torchvision_proposals(config, padded, image_sizes, objectness, deltas, top_n, nms_thresh=0.5)
    assert_same_proposals(ours(config, image_sizes, objectness, deltas, top_n, nms_thresh=0.5), expected, top_n)


def test_extreme_deltas_and_boxes_outside_the_image(backend, device):
    config = PAPER
    padded, image_sizes, top_n = (160, 224), [(150, 211), (97, 224)], (80, 40)
    objectness, deltas = head_outputs(config, padded, 2, seed=7, delta_scale=40.0, device=device)
    # Push a block of boxes entirely outside the image: they clip to zero width and are dropped.
    deltas[0][:, 0::4, :3] = -500.0
    expected = torchvision_proposals(config, padded, image_sizes, objectness, deltas, top_n)
    result = ours(config, image_sizes, objectness, deltas, top_n)
    assert_same_proposals(result, expected, top_n)
    assert torch.isfinite(result[0]).all()


def test_nan_boxes_are_dropped_as_torchvision(backend, device):
    """NaN deltas decode to NaN boxes; clipping keeps NaN (torch.clamp's rule), so even with
    min_size 0 every backend drops them, as torchvision's remove_small_boxes does."""
    config = PAPER
    padded, image_sizes, top_n = (96, 128), [(90, 120)], (60, 30)
    objectness, deltas = head_outputs(config, padded, 1, seed=11, device=device)
    deltas[0][:, 0::4, :2] = float("nan")
    objectness[0][:, 0, :2] = 10.0  # the NaN boxes score highest
    expected = torchvision_proposals(config, padded, image_sizes, objectness, deltas, top_n, min_size=0.0)
    assert_same_proposals(ours(config, image_sizes, objectness, deltas, top_n, min_size=0.0), expected, top_n)


def test_minus_inf_logits_of_a_small_level_stay_its_own_picks(backend, device):
    """A level smaller than the largest one pads its top-k buffer; its -inf (score 0) anchors must
    still be picked over the padding (a -inf pad tied with them, and the picks read anchors and
    deltas past the level: found by the fuzz on the Triton path)."""
    config = (((16,), (32,)), ((0.5, 1.0),) * 2, [8, 16])
    padded, image_sizes, top_n = (64, 64), [(64, 64), (48, 64)], (100, 200)
    objectness, deltas = head_outputs(config, padded, 2, seed=5, device=device)
    small = objectness[1]  # [2, 2, 4, 4]: 32 anchors per image, fewer than pre_nms_top_n
    small[:, 0, :2] = float("-inf")
    small[1, 1, 3, 3] = float("nan")  # ranks first, dropped by the score test as in torchvision
    expected = torchvision_proposals(config, padded, image_sizes, objectness, deltas, top_n, min_size=0.0)
    result = ours(config, image_sizes, objectness, deltas, top_n, min_size=0.0)
    assert_same_proposals(result, expected, top_n)
    assert all((scores == 0).any() for scores in expected[1])  # -inf anchors kept at score 0


def test_logit_keys_rank_as_topk():
    specials = [float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38]
    logits = torch.cat([torch.tensor(specials), torch.randn(200) * 10])
    keys = rpn_kernels.logit_keys(logits)
    assert keys.dtype == torch.int32 and (keys > rpn_kernels.PADDING_KEY.value).all()
    # Equal logits have equal keys (NaN of either sign, -0.0 and 0.0); order as topk's, NaN first.
    ranked = logits.topk(logits.numel()).values
    ranked_keys = rpn_kernels.logit_keys(ranked)
    assert (ranked_keys[1:] <= ranked_keys[:-1]).all()
    same = (ranked[1:] == ranked[:-1]) | (ranked[1:].isnan() & ranked[:-1].isnan())
    assert torch.equal(ranked_keys[1:] == ranked_keys[:-1], same)
    back = rpn_kernels.key_logits(keys)
    torch.testing.assert_close(back, torch.where(logits.isnan(), float("nan"), logits), equal_nan=True, rtol=0, atol=0)
    assert rpn_kernels.key_logits(torch.tensor([rpn_kernels.PADDING_KEY.value], dtype=torch.int32)).item() == -float(
        "inf"
    )


@pytest.mark.parametrize("seed", range(5))
def test_float_ranking_equals_the_keys_without_a_padding_tie(seed):
    """The fast CPU path's shortcut (a float top-k padded with -inf when no short level has a -inf
    logit) picks the anchors of the keys' top-k in the same order, ties included."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor([0.0, -0.0, 1.0, float("nan"), -float("nan"), float("inf"), -3.0])
    shapes = [(2, 3, 6, 5), (2, 3, 3, 3), (2, 3, 1, 2)]
    objectness = [values[torch.randint(len(values), shape, generator=generator)] for shape in shapes]
    objectness[0].view(-1)[:4] = -float("inf")  # the longest level has no padding to tie with
    counts = [3 * h * w for _, _, h, w in shapes]
    assert not rpn_kernels._padding_ties([o.permute(0, 2, 3, 1).reshape(2, -1) for o in objectness], counts)
    for top_n in (1000, 20, 5):
        shortcut = rpn_kernels._top_logits(objectness, counts, top_n, host_reads=True)
        keys = rpn_kernels._top_logits(objectness, counts, top_n)
        assert torch.equal(shortcut[1], keys[1])
        torch.testing.assert_close(shortcut[0], keys[0], equal_nan=True, rtol=0, atol=0)


def test_score_threshold_leaves_zero_valid(backend, device):
    config = PAPER
    padded, image_sizes, top_n = (96, 128), [(90, 120)], (60, 30)
    objectness, deltas = head_outputs(config, padded, 1, seed=9, logit_shift=-20.0, device=device)
    expected = torchvision_proposals(config, padded, image_sizes, objectness, deltas, top_n, score_thresh=0.5)
    result = ours(config, image_sizes, objectness, deltas, top_n, score_thresh=0.5)
    assert int(result[2][0]) == 0
    assert_same_proposals(result, expected, top_n)
    # A threshold between the scores keeps exactly torchvision's subset.
    expected = torchvision_proposals(config, padded, image_sizes, objectness, deltas, top_n, score_thresh=1e-9)
    assert_same_proposals(ours(config, image_sizes, objectness, deltas, top_n, score_thresh=1e-9), expected, top_n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_head_dtypes(backend, device, dtype):
    config = (((32,), (64,)), ((0.5, 1.0, 2.0),) * 2, [8, 16])
    padded, image_sizes, top_n = (96, 128), [(90, 121), (96, 100)], (60, 30)
    objectness, deltas = head_outputs(config, padded, 2, seed=11, device=device)
    # Distinct logits in half precision: ties would make the top-k choice arbitrary.
    generator = torch.Generator().manual_seed(12)
    pool = (torch.randn(20_000, generator=generator) * 3).to(dtype).unique()
    objectness = [
        pool[torch.randperm(pool.numel(), generator=generator)[: o.numel()]].reshape(o.shape).to(device)
        for o in objectness
    ]
    assert all(o.unique().numel() == o.numel() for o in objectness)
    deltas = [d.to(dtype) for d in deltas]
    # We compute in fp32 from the upcast head outputs: torchvision on the same upcast values.
    expected = torchvision_proposals(
        config, padded, image_sizes, [o.float() for o in objectness], [d.float() for d in deltas], top_n
    )
    assert_same_proposals(ours(config, image_sizes, objectness, deltas, top_n), expected, top_n)


def test_non_contiguous_heads(backend, device):
    config = (((32,), (64,)), ((0.5, 1.0, 2.0),) * 2, [8, 16])
    padded, image_sizes, top_n = (96, 128), [(90, 121), (96, 100)], (60, 30)
    objectness, deltas = head_outputs(config, padded, 2, seed=12, device=device)
    expected = torchvision_proposals(config, padded, image_sizes, objectness, deltas, top_n)
    channels_last = [d.contiguous(memory_format=torch.channels_last) for d in deltas]
    # A batch slice of a larger buffer: non-zero storage offset and batch stride.
    sliced = [torch.cat([o, o], dim=0)[1::2] for o in objectness]
    sliced = [torch.cat([torch.zeros_like(o), o])[o.shape[0] :] for o in objectness]
    assert_same_proposals(ours(config, image_sizes, sliced, channels_last, top_n), expected, top_n)


@pytest.mark.parametrize("post_nms_top_n", [1, 37, 150, 2000])
@pytest.mark.parametrize("prefix_factor", [1, 2])
def test_cpu_prefix_cut_equals_reference(monkeypatch, post_nms_top_n, prefix_factor):
    """The fast CPU path's NMS stops at each image's post_nms_top_n kept proposals (see
    nms.merged_top_cpu), bit for bit the reference's result: image 0 with undecoded boxes (the
    anchors themselves: neighbours overlap, heavy suppression) and logits in 8 values (ties across
    and within levels straddling every cut), image 1 spread out (little suppression)."""
    monkeypatch.setattr(nms_kernels, "_PREFIX_FACTOR", prefix_factor)
    config, padded, image_sizes = (((32,), (64,)), ((0.5, 1.0, 2.0),) * 2, [8, 16]), (96, 128), [(90, 121), (96, 100)]
    objectness, deltas = head_outputs(config, padded, 2, seed=13, delta_scale=2.0)
    objectness = [torch.cat([(o[:1] * 2).round() / 2, o[1:]]) for o in objectness]
    deltas = [torch.cat([torch.zeros_like(d[:1]), d[1:]]) for d in deltas]
    assert_cpu_equals_reference(monkeypatch, config, image_sizes, objectness, deltas, (150, post_nms_top_n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("min_size", [1e-3, 0.0])
def test_cpu_candidates_equal_reference(monkeypatch, dtype, min_size):
    """The fast CPU path picks the selected candidates' deltas and anchors only: the reference's
    candidates bit for bit, with channels-last deltas, an empty level, a level smaller than
    pre_nms_top_n, and -inf logits (which tie with the padding of the shorter levels)."""
    config = (((32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 3, [8, 16, 32])
    padded, image_sizes = (96, 128), [(90, 121), (96, 100)]
    objectness, deltas = head_outputs(config, padded, 2, seed=14, dtype=dtype)
    objectness[1][1] = float("-inf")
    deltas[0] = deltas[0].contiguous(memory_format=torch.channels_last)
    assert_cpu_equals_reference(monkeypatch, config, image_sizes, objectness, deltas, (150, 100), min_size=min_size)
    empty = [objectness[0], objectness[1][:, :, :0], objectness[2]], [deltas[0], deltas[1][:, :, :0], deltas[2]]
    assert_cpu_equals_reference(monkeypatch, config, image_sizes, *empty, (150, 100), min_size=min_size)


def assert_cpu_equals_reference(monkeypatch, config, image_sizes, objectness, deltas, top_n, **kwargs):
    outputs = {}
    for backend in ("reference", "cpu"):
        monkeypatch.setenv("TRITONDET_BACKEND", backend)
        outputs[backend] = ours(config, image_sizes, objectness, deltas, top_n, nms_thresh=0.6, **kwargs)
    for mine, expected in zip(outputs["cpu"], outputs["reference"], strict=True):
        assert mine.dtype == expected.dtype
        torch.testing.assert_close(mine, expected, rtol=0, atol=0)


def test_no_host_sync_and_launch_count(backend, device):
    if backend == "cpu":
        pytest.skip("sync-freedom is a GPU property: the fast CPU path reads candidate counts on the host")
    config = FPN
    padded = (128, 192)
    counts = {}
    for batch, levels in ((1, 1), (3, 1), (1, 5), (3, 5)):
        level_config = tuple(c[:levels] for c in config)
        objectness, deltas = head_outputs(level_config, padded, batch, seed=batch, device=device)
        image_sizes = [(120, 190)] * batch
        with NoHostSync():
            ours(level_config, image_sizes, objectness, deltas, (20, 10))
        with DispatchCounter() as counter:
            ours(level_config, image_sizes, objectness, deltas, (20, 10))
        assert counter.syncs == 0
        counts[batch, levels] = (counter.launches, counter.aten_ops)
    launches = {c[0] for c in counts.values()}
    assert launches == ({5} if backend == "triton" else {0}), counts
    if backend == "triton":  # the reference loops over levels; the Triton path does not
        assert len({c[1] for c in counts.values()}) == 1, counts


def test_bad_input(device):
    config = (((32,), (64,)), ((0.5, 1.0, 2.0),) * 2, [8, 16])
    objectness, deltas = head_outputs(config, (64, 64), 2, seed=1, device=device)
    sizes = torch.tensor([[60, 60], [64, 64]], device=device)
    args = (config[0], config[1], config[2], 100, 50)
    with pytest.raises(ValueError, match="levels"):
        ops.rpn_proposals(objectness, deltas[:1], sizes, *args)
    with pytest.raises(ValueError, match="anchor_sizes"):
        ops.rpn_proposals(objectness[:1], deltas[:1], sizes, *args)
    with pytest.raises(ValueError, match=r"objectness\[1\]"):
        ops.rpn_proposals([objectness[0], objectness[1][:, :2]], deltas, sizes, *args)
    with pytest.raises(ValueError, match=r"deltas\[0\]"):
        ops.rpn_proposals(objectness, [deltas[0][:, :8], deltas[1]], sizes, *args)
    with pytest.raises(ValueError, match="image_sizes"):
        ops.rpn_proposals(objectness, deltas, sizes[0], *args)
    with pytest.raises(ValueError, match="objectness"):
        ops.rpn_proposals(objectness, deltas, sizes[:1], *args)
    with pytest.raises(ValueError, match="strides"):
        ops.rpn_proposals(objectness, deltas, sizes, config[0], config[1], [8], 100, 50)
    with pytest.raises(TypeError, match="dtype"):
        ops.rpn_proposals(objectness, [d.half() for d in deltas], sizes, *args)
    with pytest.raises(ValueError, match="at most 5 levels"):
        ops.rpn_proposals(objectness * 3, deltas * 3, sizes, *args)
    with pytest.raises(ValueError, match="post_nms_top_n"):
        ops.rpn_proposals(objectness, deltas, sizes, config[0], config[1], config[2], 100, -1)


def test_clip_constant_is_torchvision():
    from tritondet.kernels.box_coder import DEFAULT_XFORM_CLIP

    assert math.log(1000.0 / 16) == DEFAULT_XFORM_CLIP


def test_opcheck_and_torch_compile(backend, device):
    config = (((32,), (64,)), ((0.5, 1.0, 2.0),) * 2, [8, 16])
    image_sizes = [(60, 61), (64, 50)]
    objectness, deltas = head_outputs(config, (64, 64), 2, seed=3, device=device)
    sizes = torch.tensor(image_sizes, device=device)
    flat_sizes, flat_ratios, counts = anchor_parameters(*normalize_config(config[0], config[1]))
    args = (objectness, deltas, sizes, [8, 8, 16, 16], flat_sizes, flat_ratios, counts, 20, 1e-3, 0.0, 4.0)
    torch.library.opcheck(torch.ops.tritondet.rpn_candidates, args)

    def fn(o, d, s):
        return ops.rpn_proposals(o, d, s, config[0], config[1], config[2], 20, 10)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for mine, expected in zip(compiled(objectness, deltas, sizes), fn(objectness, deltas, sizes), strict=True):
        torch.testing.assert_close(mine, expected)


def test_no_candidates_and_empty_levels(backend, device):
    config = (((32,), (64,)), ((0.5, 1.0, 2.0),) * 2, [8, 16])
    objectness, deltas = head_outputs(config, (64, 64), 2, seed=1, device=device)
    image_sizes = [(60, 60), (64, 64)]
    boxes, scores, num_valid = ours(config, image_sizes, objectness, deltas, (0, 5))
    assert boxes.shape == (2, 5, 4) and scores.shape == (2, 5) and num_valid.tolist() == [0, 0]
    assert (boxes == 0).all() and (scores == 0).all()
    boxes, scores, num_valid = ours(config, image_sizes, objectness, deltas, (5, 0))
    assert boxes.shape == (2, 0, 4) and num_valid.tolist() == [0, 0]
    # An empty second level proposes nothing; the first level's proposals are unchanged.
    empty = ([objectness[0], objectness[1][:, :, :0]], [deltas[0], deltas[1][:, :, :0]])
    single = tuple(c[:1] for c in config)
    expected = ours(single, image_sizes, objectness[:1], deltas[:1], (5, 4))
    for mine, theirs in zip(ours(config, image_sizes, *empty, (5, 4)), expected, strict=True):
        torch.testing.assert_close(mine, theirs)
