"""RoIAlign and MultiScaleRoIAlign against torchvision and our reference, on both backends."""

import itertools
import math
from collections import OrderedDict

import pytest
import torch
import torchvision
import triton
import triton.language as tl

from tests.ops.test_fuzz import time_limit
from tests.tolerances import ATOMIC_NONDET_TOL, FLOAT_DTYPES, assert_close
from tritondet import ops
from tritondet.kernels import roi_align as family
from tritondet.measure.dispatch_audit import NoHostSync
from tritondet.ops.pooling import level_scales

OUTPUT_SIZES = [1, 7, (7, 5)]
SAMPLING_RATIOS = [-1, 0, 1, 2]
# Wall-clock limit (seconds) of one backend's forward and backward on a few huge RoIs: about a
# second in the interpreter, a hang fails instead of stalling the run.
HUGE_ROI_SECONDS = 30


def make_rois(k: int, images: int, height: int, width: int, scale: float, generator) -> torch.Tensor:
    """``[k + 4, 5]`` RoIs in box coordinates (map size / ``scale``): random ones inside and partly
    outside the map, plus one wholly outside, one zero-size, one inverted and one covering all."""
    size = torch.tensor([width, height, width, height]) / scale
    corner = (torch.rand(k, 2, generator=generator) * 1.2 - 0.1) * size[:2]
    extent = torch.rand(k, 2, generator=generator) * size[:2] * 0.6
    boxes = torch.cat([corner, corner + extent], 1)
    special = torch.stack(
        [
            size * torch.tensor([1.2, 1.3, 1.6, 1.5]),  # wholly outside
            size * torch.tensor([0.5, 0.5, 0.5, 0.5]),  # zero size
            size * torch.tensor([0.6, 0.7, 0.2, 0.3]),  # inverted
            size * torch.tensor([-0.1, -0.1, 1.1, 1.1]),  # covering the map
        ]
    )
    boxes = torch.cat([boxes, special])
    batch = torch.randint(0, images, (boxes.shape[0], 1), generator=generator).float()
    return torch.cat([batch, boxes], 1)


def features(images, channels, height, width, generator, dtype=torch.float32):
    return torch.randn(images, channels, height, width, generator=generator).to(dtype)


@pytest.mark.parametrize("output_size", OUTPUT_SIZES)
@pytest.mark.parametrize("sampling_ratio", SAMPLING_RATIOS)
@pytest.mark.parametrize("aligned", [False, True])
def test_forward_matches_torchvision_13x17(backend, device, output_size, sampling_ratio, aligned):
    generator = torch.Generator().manual_seed(sampling_ratio + 10 * aligned)
    x = features(3, 2, 13, 17, generator).to(device)
    rois = make_rois(6, 3, 13, 17, 0.5, generator).to(device)
    ours = ops.roi_align(x, rois, output_size, 0.5, sampling_ratio, aligned)
    theirs = torchvision.ops.roi_align(x, rois, output_size, 0.5, sampling_ratio, aligned)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype and ours.is_contiguous()
    assert_close(ours, theirs, torch.float32)


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_forward_and_backward_match_torchvision_50x68(backend, device, sampling_ratio, aligned):
    generator = torch.Generator().manual_seed(3 + sampling_ratio)
    x = features(1, 2, 50, 68, generator, torch.float64).to(device)
    rois = make_rois(8, 1, 50, 68, 0.25, generator).double().to(device)
    grad = torch.randn(rois.shape[0], 2, 7, 5, generator=generator, dtype=torch.float64).to(device)
    results = []
    for fn in (ops.roi_align, torchvision.ops.roi_align):
        leaf = x.clone().requires_grad_()
        out = fn(leaf, rois, (7, 5), 0.25, sampling_ratio, aligned)
        out.backward(grad)
        results.append((out, leaf.grad))
    assert_close(results[0][0], results[1][0], torch.float64)
    assert_close(results[0][1], results[1][1], torch.float64)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes(backend, device, dtype):
    generator = torch.Generator().manual_seed(5)
    x = features(2, 3, 13, 17, generator).to(dtype).to(device)
    rois = make_rois(6, 2, 13, 17, 1.0, generator).to(device)
    ours = ops.roi_align(x, rois, 7, 1.0, 2, True)
    # torchvision has no bf16 kernel: compare with its result on the upcast input.
    theirs = torchvision.ops.roi_align(x.double(), rois.double(), 7, 1.0, 2, True)
    assert ours.dtype == dtype
    assert_close(ours.double(), theirs.to(dtype).double(), dtype)
    reference = family.roi_align_reference([x], rois, [1.0], (7, 7), 2, True)
    assert_close(ours, reference, dtype)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed_hw"])
def test_layouts_are_read_in_place(backend, device, layout):
    generator = torch.Generator().manual_seed(7)
    base = features(2, 6, 13, 17, generator).to(device)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = base[:, ::2]
    else:
        x = base.transpose(2, 3).contiguous().transpose(2, 3)
    rois = make_rois(6, 2, 13, 17, 1.0, generator).to(device)
    ours = ops.roi_align(x, rois, (7, 5), 1.0, -1, False)
    assert ours.is_contiguous()
    assert_close(ours, torchvision.ops.roi_align(x.contiguous(), rois, (7, 5), 1.0, -1, False), torch.float32)
    leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    ops.roi_align(leaf, rois, (7, 5), 1.0, -1, False).sum().backward()
    expected = x.contiguous().requires_grad_()
    torchvision.ops.roi_align(expected, rois, (7, 5), 1.0, -1, False).sum().backward()
    assert_close(leaf.grad, expected.grad, torch.float32)


def test_hand_computed_values_on_a_4x4_map(backend, device):
    x = torch.arange(16.0).reshape(1, 1, 4, 4).to(device)  # value 4 * y + x, which bilinear keeps exact

    def pool(box, size, sampling_ratio, aligned):
        rois = torch.tensor([[0.0, *box]], device=device)
        return ops.roi_align(x, rois, size, 1.0, sampling_ratio, aligned).flatten().tolist()

    # samples at 0.5 and 1.5 -> mean position (1, 1)
    assert pool((0, 0, 2, 2), 1, 2, False) == [5.0]
    # shifted by -0.5: samples at 0 and 1 -> (0.5, 0.5)
    assert pool((0, 0, 2, 2), 1, 2, True) == [2.5]
    # samples at 3 and 5: only (3, 3) is inside (y, x <= 4 = H), clamped to the last row/column;
    # the other three count as zeros
    assert pool((2, 2, 6, 6), 1, 2, False) == [15.0 / 4]
    # one sample per bin at 1 and 3
    assert pool((0, 0, 4, 4), 2, 1, False) == [5.0, 7.0, 13.0, 15.0]
    # legacy mode widens the zero-size RoI at (1, 2) to 1x1: one sample at (2.5, 1.5)
    assert pool((1, 2, 1, 2), 1, -1, False) == [11.5]
    # aligned mode keeps it empty: no samples, zero
    assert pool((1, 2, 1, 2), 1, -1, True) == [0.0]
    # sample at (-1, -1) still counts (clamped to (0, 0)), one at -1.5 does not
    assert pool((-2, -2, 0, 0), 1, 1, False) == [0.0]
    assert pool((-2.0, -2.0, -1.0, -1.0), 1, 1, False) == [0.0]


@pytest.mark.parametrize("corner", [float("inf"), float("nan")])
def test_a_sample_off_the_map_reads_no_pixel(backend, device, corner):
    """torchvision's CPU kernel multiplies a sample off the map by 0 at pixel (0, 0) of its image
    and channel (NaN when that pixel is not finite); its CUDA kernel and every backend of ours skip
    the sample. The map is large enough for the fast CPU path to choose torchvision's kernel."""
    x = torch.randn(2, 3, 40, 48, generator=torch.Generator().manual_seed(12))
    x[:, 1, 0, 0] = corner
    rois = torch.tensor([[1.0, 30.0, 20.0, 60.0, 50.0], [0.0, -9.0, 5.0, 8.0, 12.0]])
    finite = x.clone()
    finite[:, :, 0, 0] = 0.0  # read by no sample of these RoIs
    for aligned in (False, True):
        ours = ops.roi_align(x.to(device), rois.to(device), (2, 3), 1.0, 2, aligned)
        assert torch.isfinite(ours).all()
        assert_close(ours, torchvision.ops.roi_align(finite, rois, (2, 3), 1.0, 2, aligned), torch.float32)


@pytest.mark.parametrize("spatial_scale,aligned", [(2.0, True), (-1.0, False), (-0.5, True)])
def test_inverted_boxes_and_negative_scales_sample_backwards_as_torchvision(backend, device, spatial_scale, aligned):
    """A negative bin size walks a bin's samples backwards: those on the map are all visited."""
    x = torch.randn(1, 2, 1, 2, generator=torch.Generator().manual_seed(13))
    rois = torch.tensor([[0.0, -6.5, 7.0, 1.0, -3.5], [0.0, 3.0, 7.5, 2.5, 0.5], [0.0, -0.5, -0.5, -2.5, -1.5]])
    expected = torchvision.ops.roi_align(x, rois, (2, 3), spatial_scale, 5, aligned)
    assert expected.abs().sum() > 0
    assert_close(
        ops.roi_align(x.to(device), rois.to(device), (2, 3), spatial_scale, 5, aligned), expected, torch.float32
    )


# RoIs of about 2**63 map pixels (the int64 cast of 1e30 or inf) around the map, along a row and
# across it, and one of ~10**9 pixels (adaptive grids past MAX_GRID): far beyond fp32's pixel resolution.
HUGE_ROIS = [
    [0.0, -9.2e18, -9.2e18, 5.0, 5.0],
    [0.0, 0.0, 0.0, 9.2e18, 10.0],
    [0.0, -9.2e18, 1.0, 9.2e18, 4.0],
    [0.0, -3e9, -1e9, 6.0, 4e9],
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_huge_rois_take_bounded_work_alike_on_every_backend(monkeypatch, device, dtype, sampling_ratio, aligned):
    """Forward, atomic and deterministic backward finish quickly on every backend with the same
    values; with a fixed grid they equal torchvision's (its adaptive grid would loop ~2**120 times
    per bin, and so hung the kernels' span of samples near the map before)."""
    generator = torch.Generator().manual_seed(19)
    x = features(1, 2, 6, 7, generator, dtype).to(device)
    rois = torch.tensor(HUGE_ROIS, dtype=dtype, device=device)
    grad = torch.randn(rois.shape[0], 2, 2, 3, generator=generator, dtype=dtype).to(device)
    results = {}
    for backend, deterministic in itertools.product(("reference", "cpu", "triton"), (False, True)):
        monkeypatch.setenv("TRITONDET_BACKEND", backend)
        torch.use_deterministic_algorithms(deterministic)
        try:
            with time_limit(HUGE_ROI_SECONDS):
                leaf = x.clone().requires_grad_()
                out = ops.roi_align(leaf, rois, (2, 3), 1.0, sampling_ratio, aligned)
                out.backward(grad)
        finally:
            torch.use_deterministic_algorithms(False)
        results[backend, deterministic] = (out, leaf.grad)
    expected = results["reference", False]
    if sampling_ratio > 0:
        leaf = x.cpu().requires_grad_()
        out = torchvision.ops.roi_align(leaf, rois.cpu(), (2, 3), 1.0, sampling_ratio, aligned)
        out.backward(grad.cpu())
        expected = (out, leaf.grad)
    for (out, input_grad), key in zip(results.values(), results, strict=True):
        assert_close(out.cpu(), expected[0], dtype, msg=f"{key}")
        assert_close(input_grad.cpu(), expected[1], dtype, msg=f"{key}")


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_huge_rois_skip_torchvisions_kernel_on_the_fast_cpu_path(monkeypatch, device, sampling_ratio):
    """On a map where the fast CPU path would call torchvision's kernel, huge RoIs with an
    adaptive grid go to the reference instead (torchvision would loop ~2**120 times per bin), on
    RoIAlign, MultiScaleRoIAlign and PSRoIAlign, forward and backward: every backend agrees."""
    generator = torch.Generator().manual_seed(29)
    x = features(2, 4, 40, 48, generator).to(device)
    rois = torch.tensor([[1.0, 30.0, 20.0, 60.0, 50.0], *HUGE_ROIS], device=device)
    grad = torch.randn(rois.shape[0], 4, 2, 2, generator=generator).to(device)
    calls = {
        "roi_align": lambda t: ops.roi_align(t, rois, 2, 0.5, sampling_ratio),
        "multiscale": lambda t: ops.MultiScaleRoIAlign(["p2", "p3"], 2, sampling_ratio)(
            OrderedDict(p2=t, p3=t[:, :, ::2, ::2]), [rois[:3, 1:], rois[3:, 1:]], [(160, 192)] * 2
        ),
        "ps_roi_align": lambda t: ops.ps_roi_align(t, rois, 2, 0.5, sampling_ratio),
    }
    for name, call in calls.items():
        results = {}
        for backend in ("reference", "cpu", "triton"):
            monkeypatch.setenv("TRITONDET_BACKEND", backend)
            with time_limit(HUGE_ROI_SECONDS):
                leaf = x.clone().requires_grad_()
                out = call(leaf)
                out.backward(grad[:, : out.shape[1]])
            results[backend] = (out.cpu(), leaf.grad.cpu())
        for backend in ("cpu", "triton"):
            assert_close(results[backend][0], results["reference"][0], torch.float32, msg=f"{name} {backend}")
            assert_close(results[backend][1], results["reference"][1], torch.float32, msg=f"{name} {backend}")


@triton.jit
def _sample_spans_kernel(origin_ptr, bin_grid_ptr, out_ptr, size, B: tl.constexpr):
    """The kernels' (first, count) of B bins at ``origin_ptr [B]`` of one bin size and grid (``bin_grid_ptr``)."""
    bins = tl.arange(0, B)
    first, span = family._sample_span(
        tl.load(origin_ptr + bins), tl.load(bin_grid_ptr), tl.load(bin_grid_ptr + 1), size
    )
    tl.store(out_ptr + bins, first)
    tl.store(out_ptr + B + bins, span)


def _on_map(i, origin, bin_size, grid, size):
    """Whether sample ``i`` (int64) of each bin exists and lands in ``[-1, size]``."""
    coord = family._sample_position_reference(i.to(origin.dtype), origin, bin_size, grid)
    return (coord >= -1) & (coord <= size) & (i >= 0) & (i < grid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_spans_are_exact_bounded_and_the_kernels(device, dtype):
    """The samples a bin visits are exactly those within a pixel of the map (the samples before and
    after the span land outside ``[-1, size]``, its ends inside), at most ``2 * size + 4`` of them
    with an adaptive grid, for bins of a pixel to beyond fp32's resolution (short of overflowing
    it), their origins placed so that the map falls among the samples, and for a fixed grid walked
    backwards; the kernels' spans are the reference's."""
    generator = torch.Generator().manual_seed(23)
    size, count = 7, 64
    extent = torch.tensor([[size]])
    for exponent in (-0.5, 0.0, 0.5, 1.0, 2.0, 4.0, 6.0, 6.8, 6.95, 7.5, 12.0, 18.0, 30.0, 31.0):
        magnitude = 10.0**exponent * (1 + torch.rand((1, 1), generator=generator, dtype=torch.float64))
        adaptive = float(min(math.ceil(magnitude.item()), family.MAX_GRID.value))
        for bin_size, grid in ((magnitude.to(dtype), adaptive), (-magnitude.to(dtype), 3.0)):
            samples = torch.randint(0, int(grid), (1, count), generator=generator).to(dtype)
            offsets = torch.rand((1, count), generator=generator, dtype=torch.float64) * (size + 3) - 2
            origin = offsets.to(dtype) - family._sample_position_reference(samples, 0.0, bin_size, grid)
            first, span = family._sample_span_reference(origin, bin_size, grid, extent)
            bins = (origin, bin_size, grid, size)
            assert not _on_map(first - 1, *bins).any() and not _on_map(first + span, *bins).any()
            assert _on_map(first, *bins)[span > 0].all() and _on_map(first + span - 1, *bins)[span > 0].all()
            assert (span > 0).any() and (span <= 2 * size + 4).all()
            out = torch.empty(2 * count, dtype=torch.int32, device=device)
            bin_grid = torch.tensor([bin_size.item(), grid], dtype=dtype, device=device)
            _sample_spans_kernel[(1,)](origin[0].to(device), bin_grid, out, size, B=count)
            assert torch.equal(out.cpu().long(), torch.cat([first[0], span[0]]))
    # A zero bin size puts every sample at the origin; a non-finite origin none on the map.
    origin = torch.tensor([[3.0, -2.0, float("inf"), float("nan")]], dtype=dtype)
    first, span = family._sample_span_reference(origin, torch.zeros((1, 1), dtype=dtype), 4.0, extent)
    assert span.tolist() == [[4, 0, 0, 0]] and first[0, 0] == 0


def test_box_list_and_empty_boxes(backend, device):
    generator = torch.Generator().manual_seed(11)
    x = features(3, 2, 13, 17, generator).to(device)
    boxes = [make_rois(3, 1, 13, 17, 1.0, generator)[:, 1:].to(device) for _ in range(3)]
    boxes[1] = boxes[1][:0]
    assert_close(ops.roi_align(x, boxes, 3), torchvision.ops.roi_align(x, boxes, 3), torch.float32)
    empty = ops.roi_align(x, torch.zeros(0, 5, device=device), (7, 5))
    assert empty.shape == (0, 2, 7, 5)
    leaf = x.clone().requires_grad_()
    ops.roi_align(leaf, torch.zeros(0, 5, device=device), 7).sum().backward()
    assert torch.equal(leaf.grad, torch.zeros_like(x))


@pytest.mark.parametrize("pool", [ops.roi_align, ops.roi_pool, ops.crop_pool])
def test_padded_boxes_equal_the_list_form(backend, device, pool):
    generator = torch.Generator().manual_seed(13)
    x = features(3, 2, 13, 17, generator).to(device)
    # Two images of boxes for three feature maps: a padded batch may hold fewer images than input.
    padded = torch.stack([make_rois(5, 1, 13, 17, 2.0, generator)[:, 1:] for _ in range(2)]).to(device)
    result = pool(x, padded, 3, 0.5)
    assert result.shape == (2 * 9, 2, 3, 3)
    assert torch.equal(result, pool(x, list(padded.unbind(0)), 3, 0.5))
    if pool is ops.roi_align:
        expected = torchvision.ops.roi_align(x, list(padded.unbind(0)), 3, 0.5)
        assert_close(result, expected, torch.float32)
    assert pool(x, padded[:, :0], 3).shape == (0, 2, 3, 3)
    with pytest.raises(ValueError, match="boxes holds 4 images"):
        pool(x, torch.zeros(4, 1, 4, device=device), 3)
    with pytest.raises(ValueError, match="boxes"):
        pool(x, torch.zeros(2, 1, 5, device=device), 3)


def test_bad_batch_indices(backend, device):
    x = torch.ones(2, 1, 4, 4, device=device)
    rois = torch.tensor([[0, 0, 0, 2, 2], [1.5, 0, 0, 2, 2], [2, 0, 0, 2, 2], [-1, 0, 0, 2, 2]], device=device)
    if device.type == "cpu":
        with pytest.raises(ValueError, match=r"boxes\[1\] has batch index 1.5"):
            ops.roi_align(x, rois, 2)
    # The op itself never reads out of bounds: those RoIs pool zeros and get no gradient.
    leaf = x.clone().requires_grad_()
    out = torch.ops.tritondet.roi_align([leaf], rois, [1.0], 2, 2, -1, False, 0, 224.0, 4.0)
    assert torch.equal(out[0], torch.ones(1, 2, 2, device=device)) and not out[1:].any()
    out.sum().backward()
    assert leaf.grad[1].sum() == 0 and leaf.grad[0].sum() == 4


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_gradcheck(backend, device, aligned, sampling_ratio):
    generator = torch.Generator().manual_seed(13)
    x = features(2, 1, 5, 6, generator, torch.float64).to(device).requires_grad_()
    rois = make_rois(2, 2, 5, 6, 1.0, generator).double().to(device)
    # fast mode: a few random directions instead of every input and output element (interpreter).
    # The default backward adds with atomics, in no fixed order on a GPU (and in the shuffled
    # interpreter mode): two backward passes may round differently, hence nondet_tol; the
    # deterministic backward is checked bit for bit below.
    assert torch.autograd.gradcheck(
        lambda t: ops.roi_align(t, rois, (3, 2), 1.0, sampling_ratio, aligned),
        (x,),
        fast_mode=True,
        nondet_tol=ATOMIC_NONDET_TOL,
    )


def test_deterministic_backward_is_bitwise_reproducible(backend, device):
    generator = torch.Generator().manual_seed(17)
    x = features(2, 3, 13, 17, generator).to(device)
    rois = make_rois(6, 2, 13, 17, 1.0, generator).to(device)
    grad = torch.randn(rois.shape[0], 3, 3, 2, generator=generator).to(device)

    def backward():
        leaf = x.clone().requires_grad_()
        ops.roi_align(leaf, rois, (3, 2)).backward(grad)
        return leaf.grad

    expected = x.clone().requires_grad_()
    torchvision.ops.roi_align(expected, rois, (3, 2)).backward(grad)
    torch.use_deterministic_algorithms(True)
    try:
        first, second = backward(), backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first, second)
    assert_close(first, expected.grad, torch.float32)
    assert_close(backward(), expected.grad, torch.float32)


def test_opcheck(backend, device):
    generator = torch.Generator().manual_seed(19)
    x = features(2, 2, 6, 7, generator).to(device).requires_grad_()
    rois = make_rois(1, 2, 6, 7, 1.0, generator).to(device)
    for args in ((2, 3, -1, False), (1, 1, 2, True)):
        torch.library.opcheck(torch.ops.tritondet.roi_align.default, ([x], rois, [1.0], *args, 0, 224.0, 4.0))


def test_torch_compile_fullgraph(backend, device):
    generator = torch.Generator().manual_seed(23)
    x = features(2, 2, 13, 17, generator).to(device)
    rois = make_rois(4, 2, 13, 17, 1.0, generator).to(device)
    module = ops.RoIAlign((7, 5), 1.0, 2)
    compiled = torch.compile(lambda a, b: module(a, b).relu().sum(), fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, rois), module(x, rois).relu().sum(), torch.float32)


def test_module_repr_matches_torchvision():
    assert repr(ops.RoIAlign((7, 5), 0.25, 2, True)) == repr(torchvision.ops.RoIAlign((7, 5), 0.25, 2, True))
    assert repr(ops.MultiScaleRoIAlign(["0", "1"], 7, 2)) == repr(torchvision.ops.MultiScaleRoIAlign(["0", "1"], 7, 2))


def test_bad_arguments():
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="input"):
        ops.roi_align(x[0], torch.zeros(0, 5), 2)
    with pytest.raises(ValueError, match="boxes"):
        ops.roi_align(x, torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match="output_size"):
        ops.roi_align(x, torch.zeros(0, 5), (2, 0))
    with pytest.raises(TypeError, match="input"):
        ops.roi_align(x.long(), torch.zeros(0, 5), 2)


# ----------------------------------------------------------------------------------------------
# MultiScaleRoIAlign
# ----------------------------------------------------------------------------------------------


def fpn_inputs(generator, images=2, channels=2, image_size=(60, 76)):
    h, w = image_size
    x = OrderedDict()
    for level in range(2, 6):
        x[f"p{level}"] = torch.randn(images, channels, -(-h // 2**level), -(-w // 2**level), generator=generator)
    x["pool"] = torch.randn(images, channels, 1, 1, generator=generator)  # not pooled from
    boxes = []
    for _ in range(images):
        corner = torch.rand(7, 2, generator=generator) * torch.tensor([w, h]) * 0.8
        # Sizes from 4 to ~200 px span every level at canonical_scale 32.
        extent = 2 ** (torch.rand(7, 2, generator=generator) * 5.6 + 2)
        boxes.append(torch.cat([corner, corner + extent], 1))
    return x, boxes, [(h, w), (h - 5, w - 3)][:images]


@pytest.mark.parametrize("output_size,sampling_ratio", [(7, 2), ((3, 2), -1)])
def test_multiscale_matches_torchvision(backend, device, output_size, sampling_ratio):
    generator = torch.Generator().manual_seed(29)
    x, boxes, image_shapes = fpn_inputs(generator)
    x = OrderedDict((k, v.to(device)) for k, v in x.items())
    boxes = [b.to(device) for b in boxes]
    names = ["p2", "p3", "p4", "p5"]
    ours = ops.MultiScaleRoIAlign(names, output_size, sampling_ratio, canonical_scale=32, canonical_level=4)
    theirs = torchvision.ops.MultiScaleRoIAlign(names, output_size, sampling_ratio, canonical_scale=32)
    result = ours(x, boxes, image_shapes)
    expected = theirs(x, boxes, image_shapes)
    assert_close(result, expected, torch.float32)
    assert level_scales([x[name] for name in names], image_shapes) == (theirs.scales, 2)
    levels = family.roi_levels_reference(
        torch.cat([torch.zeros(14, 1, device=device), torch.cat(boxes)], 1), 4, 2, 32, 4
    )
    assert len(set(levels.tolist())) == 4  # every level is used


# 0: torchvision's kernel on every level; 10**9: the reference's sparse gather on every level.
@pytest.mark.parametrize("pixels_per_bin", [0, 10**9])
def test_fast_cpu_multiscale_pools_each_level_either_way(monkeypatch, pixels_per_bin):
    monkeypatch.setenv("TRITONDET_BACKEND", "cpu")
    monkeypatch.setattr(family, "_REFERENCE_PIXELS_PER_BIN", pixels_per_bin)
    x, boxes, image_shapes = fpn_inputs(torch.Generator().manual_seed(31))
    names = ["p2", "p3", "p4", "p5"]
    results = []
    for pooler in (ops.MultiScaleRoIAlign(names, 7, 2, canonical_scale=32, canonical_level=4),
                   torchvision.ops.MultiScaleRoIAlign(names, 7, 2, canonical_scale=32)):  # fmt: skip
        maps = OrderedDict((k, v.clone().requires_grad_()) for k, v in x.items())
        out = pooler(maps, boxes, image_shapes)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        results.append((out, *[maps[name].grad for name in names]))
    for ours, theirs in zip(*results, strict=True):
        assert_close(ours, theirs, torch.float32)


def test_multiscale_levels_at_the_boundaries_match_torchvision(backend, device):
    """Boxes whose fp32 area is a level boundary of torchvision's LevelMapper, or one ulp either
    side, are pooled from torchvision's level (the level rule compares areas, no log2)."""
    generator = torch.Generator().manual_seed(43)
    names = ["p2", "p3", "p4", "p5"]
    x = OrderedDict(
        (name, torch.randn(1, 3, 512 >> level, 512 >> level, generator=generator).to(device))
        for level, name in enumerate(names, start=2)
    )
    height = 512.0  # a power of two: width * height is exact, so the area is the intended one
    widths = []
    for threshold in family.level_area_thresholds(4, 2, 224.0, 4.0)[:3]:
        width = torch.tensor(threshold / height)
        widths += [width.nextafter(torch.tensor(0.0)), width, width.nextafter(torch.tensor(1e9))]
    boxes = torch.stack([torch.tensor([0.0, 0.0, width, height]) for width in widths]).to(device)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    levels = torchvision.ops.poolers.LevelMapper(2, 5)([boxes]).flatten().cpu()
    assert levels.tolist() == [0, 1, 1, 1, 2, 2, 2, 3, 3]
    assert torch.equal(
        family.roi_levels_reference(torch.cat([torch.zeros_like(areas)[:, None], boxes], 1), 4, 2, 224.0, 4.0).cpu(),
        levels,
    )
    ours = ops.MultiScaleRoIAlign(names, 2, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(names, 2, 2)
    assert_close(ours(x, [boxes], [(512, 512)]), theirs(x, [boxes], [(512, 512)]), torch.float32)


@pytest.mark.parametrize("deterministic", [False, True])
def test_multiscale_boxes_on_no_level_pool_to_zeros_as_torchvision(backend, device, deterministic):
    """A box whose area is negative (inverted on one axis) or NaN has ``sqrt(area) = NaN``, which
    torchvision's CPU LevelMapper casts to int64 (INT64_MIN on x86): no level, so its row and
    gradient are zeros. A zero-area box is on the first level, a box inverted on both axes (a
    positive area) on its area's level."""
    generator = torch.Generator().manual_seed(47)
    x, boxes, image_shapes = fpn_inputs(generator)
    nan = float("nan")
    no_level = torch.tensor(
        [
            [30.0, 10.0, 5.0, 40.0],  # x2 < x1
            [3.0, 40.0, 50.0, 2.0],  # y2 < y1
            [20.0, 20.0, 19.5, 60.0],  # x2 just below x1
            [-3e38, 5.0, 3e38, 5.0],  # finite corners, inf * 0 = NaN area
            [nan, 5.0, 20.0, 30.0],  # a NaN corner
        ]
    )
    on_a_level = torch.tensor(
        [
            [10.0, 10.0, 10.0, 30.0],  # zero width
            [12.0, 7.0, 12.0, 7.0],  # a point
            [60.0, 50.0, 8.0, 4.0],  # inverted on both axes
        ]
    )
    # No-level boxes interleaved with normal ones in both images.
    boxes = [
        torch.cat([boxes[0][:3], no_level[:3], boxes[0][3:], on_a_level]),
        torch.cat([no_level[3:], boxes[1], on_a_level[:1]]),
    ]
    names = ["p2", "p3", "p4", "p5"]
    no_level_rows = torch.tensor([3, 4, 5, 13, 14])
    grad = torch.randn(sum(len(b) for b in boxes), 2, 3, 3, generator=generator)
    theirs_maps = OrderedDict((k, v.clone().requires_grad_()) for k, v in x.items())
    theirs = torchvision.ops.MultiScaleRoIAlign(names, 3, 2, canonical_scale=32)(theirs_maps, boxes, image_shapes)
    theirs.backward(grad)
    ours_maps = OrderedDict((k, v.to(device, copy=True).requires_grad_()) for k, v in x.items())
    pooler = ops.MultiScaleRoIAlign(names, 3, 2, canonical_scale=32, canonical_level=4)
    torch.use_deterministic_algorithms(deterministic)
    try:
        ours = pooler(ours_maps, [b.to(device) for b in boxes], image_shapes)
        ours.backward(grad.to(device))
        # The no-level rows alone: no gradient reaches any map.
        no_level_maps = OrderedDict((k, v.to(device, copy=True).requires_grad_()) for k, v in x.items())
        pooler(no_level_maps, [b.to(device) for b in boxes], image_shapes)[no_level_rows.to(device)].sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(theirs[no_level_rows], torch.zeros_like(theirs[no_level_rows]))
    assert torch.equal(ours[no_level_rows.to(device)].cpu(), theirs[no_level_rows])
    others = torch.ones(len(theirs), dtype=torch.bool).index_fill(0, no_level_rows, False)
    assert (theirs[others].abs().sum((1, 2, 3)) > 0).all()  # every other box is pooled
    assert_close(ours.cpu(), theirs, torch.float32)
    for name in names:
        assert_close(ours_maps[name].grad.cpu(), theirs_maps[name].grad, torch.float32)
        assert torch.equal(no_level_maps[name].grad, torch.zeros_like(no_level_maps[name].grad))


def test_multiscale_infers_the_scales_of_every_call(backend, device):
    generator = torch.Generator().manual_seed(41)
    names = ["p2", "p3", "p4", "p5"]
    ours = ops.MultiScaleRoIAlign(names, 3, 2, canonical_scale=32)
    poolers = []
    # Images half the padded size the second time: every scale doubles (1/2 .. 1/16), k_min is 1.
    for image_size, shrink, scales in [
        ((60, 76), 1, [1 / 4, 1 / 8, 1 / 16, 1 / 32]),
        ((100, 52), 2, [1 / 2, 1 / 4, 1 / 8, 1 / 16]),
    ]:
        x, boxes, image_shapes = fpn_inputs(generator, image_size=image_size)
        x = OrderedDict((k, v.to(device)) for k, v in x.items())
        boxes = [b.to(device) for b in boxes]
        image_shapes = [(h // shrink, w // shrink) for h, w in image_shapes]
        # A new torchvision pooler per call: torchvision's module keeps the scales of its first call.
        theirs = torchvision.ops.MultiScaleRoIAlign(names, 3, 2, canonical_scale=32)
        assert_close(ours(x, boxes, image_shapes), theirs(x, boxes, image_shapes), torch.float32)
        assert theirs.scales == scales
        poolers.append(theirs)
    assert poolers[0].scales != poolers[1].scales  # a pooler that kept its first scales would be wrong


def test_multiscale_padded_boxes_equal_the_list_form_in_one_launch_without_sync(device, monkeypatch):
    monkeypatch.setenv("TRITONDET_BACKEND", "triton")
    generator = torch.Generator().manual_seed(37)
    x, boxes, image_shapes = fpn_inputs(generator)
    x = OrderedDict((k, v.to(device)) for k, v in x.items())
    boxes = [b.to(device) for b in boxes]
    padded = torch.stack(boxes)
    names = ["p2", "p3", "p4", "p5"]
    ours = ops.MultiScaleRoIAlign(names, 3, 2, canonical_scale=32)
    # The padded form builds its batch indices, so even the CPU's validation has nothing to read back.
    with NoHostSync() as audit:
        result = ours(x, padded, image_shapes)
    assert audit.launches == 1 and audit.syncs == 0
    assert torch.equal(result, ours(x, boxes, image_shapes))
    theirs = torchvision.ops.MultiScaleRoIAlign(names, 3, 2, canonical_scale=32)
    assert_close(result, theirs(x, boxes, image_shapes), torch.float32)


def test_multiscale_one_launch_no_host_sync_and_gradients(device, monkeypatch):
    monkeypatch.setenv("TRITONDET_BACKEND", "triton")
    monkeypatch.setenv("TRITONDET_VALIDATE", "0")  # the CPU batch-index check reads values back
    generator = torch.Generator().manual_seed(31)
    x, boxes, image_shapes = fpn_inputs(generator)
    x = OrderedDict((k, v.to(device).double().requires_grad_()) for k, v in x.items())
    boxes = [b.to(device).double() for b in boxes]
    names = ["p2", "p3", "p4", "p5"]
    ours = ops.MultiScaleRoIAlign(names, 3, 2, canonical_scale=32)
    # The first call too: the scales are host arithmetic on sizes.
    with NoHostSync() as audit:
        result = ours(x, boxes, image_shapes)
    assert audit.launches == 1 and audit.syncs == 0
    grad = torch.randn(14, 2, 3, 3, generator=generator, dtype=torch.float64).to(device)
    result.backward(grad)
    theirs = torchvision.ops.MultiScaleRoIAlign(names, 3, 2, canonical_scale=32)
    leaves = OrderedDict((k, v.detach().clone().requires_grad_()) for k, v in x.items())
    expected = theirs(leaves, boxes, image_shapes)
    assert_close(result, expected, torch.float64)
    expected.backward(grad)
    for name in names:
        assert_close(x[name].grad, leaves[name].grad, torch.float64)


# The fast CPU path's choices (the order it pools a level's RoIs in, how many bins it computes at a
# time, the whole map or only its touched pixels as rows of channels) change no value.
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "full_copy_share,band_rows,block_bytes,sampling_ratio,aligned",
    [(0.0, 4, 1 << 20, 2, False), (2.0, 1, 1, -1, True), (0.5, 10**6, 4096, 0, False)],
)
def test_fast_cpu_sparse_path_is_the_reference_bit_for_bit(
    monkeypatch, layout, dtype, full_copy_share, band_rows, block_bytes, sampling_ratio, aligned
):
    monkeypatch.setattr(family, "_REFERENCE_PIXELS_PER_BIN", 10**9)  # the sparse path on every level
    monkeypatch.setattr(family, "_FULL_COPY_SHARE", full_copy_share)
    monkeypatch.setattr(family, "_BAND_ROWS", band_rows)
    monkeypatch.setattr(family, "_BLOCK_BYTES", block_bytes)
    x, boxes, image_shapes = fpn_inputs(torch.Generator().manual_seed(37), channels=5)
    maps = [x[f"p{level}"].to(dtype).contiguous(memory_format=layout) for level in range(2, 6)]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    rois = torch.cat([rois, torch.tensor([[1.0, 30.0, 20.0, 10.0, 40.0]])]).to(
        torch.promote_types(dtype, torch.float32)
    )
    scales, k_min = level_scales(maps, image_shapes)
    args = (rois, scales, (7, 5), sampling_ratio, aligned, (k_min, 32.0, 4.0))
    ours = family.roi_align_cpu(maps, *args)
    assert torch.equal(ours, family.roi_align_reference(maps, *args))
    assert not ours[-1].any()  # the inverted box is on no level: zeros in an uninitialized output
