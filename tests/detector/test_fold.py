"""The backbone with its frozen batch norms folded into the convolutions (tritondet.detector.fold):
the module's own forward within rounding, gradients to the convolutions only, the folded weights
cached exactly as long as their sources are unchanged, the state dict untouched, the FPN's top-down
sum exact. ResNet-18 FPN of the ``tiny`` configuration on 64-pixel maps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from tests.tolerances import TOLERANCES
from tritondet.detector import fold, resnet_c4, tiny
from tritondet.detector.backbone import backbone_features, build_backbone
from tritondet.detector.faster_rcnn import convolution_layout
from tritondet.detector.fold import (
    convolution_weights,
    convolve,
    convolve_siblings,
    foldable,
    lay_out,
    run_layers,
    upsample_add,
)


def _randomize_norms(backbone: nn.Module, seed: int = 0) -> nn.Module:
    """Frozen norms with statistics and affine terms away from the identity (as trained ones are)."""
    generator = torch.Generator().manual_seed(seed)
    for norm in backbone.modules():
        if isinstance(norm, FrozenBatchNorm2d):
            channels = norm.weight.shape[0]
            norm.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
            norm.bias.copy_(torch.randn(channels, generator=generator) * 0.1)
            norm.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
            norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    return backbone


def _backbone(config=None) -> nn.Module:
    torch.manual_seed(0)
    return _randomize_norms(build_backbone((config or tiny()).backbone)).eval()


def _images(batch: int = 2, height: int = 64, width: int = 96) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return convolution_layout(torch.randn(batch, 3, height, width, generator=generator))


def _assert_rounding_level(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Equal up to rounding: within the tolerance table's relative bound of ``expected``'s largest
    magnitude (a deep random network's small outputs are sums that cancel, so their own relative
    error is large; running the same module channels-last instead of NCHW differs by ~2e-6 of it)."""
    assert actual.dtype == expected.dtype, msg
    atol = TOLERANCES[expected.dtype][1] * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=msg)


def _assert_same_features(actual, expected) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].is_contiguous(memory_format=torch.channels_last), name
        _assert_rounding_level(actual[name], expected[name], msg=name)


def test_folded_fpn_backbone_computes_the_modules_forward():
    backbone = _backbone()
    images = _images()
    with torch.no_grad():
        _assert_same_features(backbone_features(backbone, images), backbone(images))


def test_folded_single_level_backbone_computes_the_modules_forward():
    backbone = _backbone(resnet_c4())
    images = _images()
    with torch.no_grad():
        expected = backbone.body(images)["0"]
        actual = backbone(images)["0"]  # SingleLevelBackbone runs its body through run_layers
    _assert_rounding_level(actual, expected)


def test_only_frozen_batch_norms_fold():
    assert foldable(FrozenBatchNorm2d(4))
    assert not foldable(nn.BatchNorm2d(4).eval())  # runs as it is, see foldable's docstring
    assert not foldable(nn.BatchNorm2d(4))
    assert not foldable(None)
    layers = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(run_layers(layers, images), layers(images), rtol=0, atol=0)


def test_gradients_reach_the_convolutions_through_the_per_call_fold():
    ours = _backbone().train()
    theirs = copy.deepcopy(ours)
    images = _images()
    features = backbone_features(ours, images)
    sum((f * f).mean() for f in features.values()).backward()
    expected = theirs(images)
    sum((f * f).mean() for f in expected.values()).backward()
    grads = {name: p.grad for name, p in ours.named_parameters() if p.grad is not None}
    expected_grads = {name: p.grad for name, p in theirs.named_parameters() if p.grad is not None}
    assert set(grads) == set(expected_grads) and grads
    for name, grad in expected_grads.items():
        _assert_rounding_level(grads[name], grad, msg=name)
    assert all(not b.requires_grad for b in ours.buffers())


def test_folded_weights_are_cached_without_autograd_and_fresh_under_it():
    backbone = _backbone()
    conv, norm = backbone.body.conv1, backbone.body.bn1
    with torch.no_grad():
        weight, bias = convolution_weights(conv, norm)
        assert convolution_weights(conv, norm)[0] is weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # FrozenBatchNorm2d's, exactly
    torch.testing.assert_close(weight, conv.weight * scale[:, None, None, None], rtol=0, atol=0)
    torch.testing.assert_close(bias, norm.bias - norm.running_mean * scale, rtol=0, atol=0)
    fresh, _ = convolution_weights(conv, norm)  # grad mode, weight requiring grad: recorded, per call
    assert fresh is not weight and fresh.grad_fn is not None
    frozen = nn.Conv2d(3, 4, 1).requires_grad_(False)
    assert convolution_weights(frozen)[0] is convolution_weights(frozen)[0]  # nothing to record: cached


@pytest.mark.parametrize("change", ["load_state_dict", "optimizer_step", "norm_buffer", "dtype"])
def test_the_cache_follows_every_change_of_the_weights(change):
    backbone = _backbone()
    images = _images()
    with torch.no_grad():
        backbone_features(backbone, images)  # fills the cache
    if change == "load_state_dict":
        other = _randomize_norms(build_backbone(tiny().backbone), seed=5)
        backbone.load_state_dict(other.state_dict())
    elif change == "optimizer_step":
        backbone.body.conv1.weight.grad = torch.ones_like(backbone.body.conv1.weight)
        torch.optim.SGD(backbone.parameters(), lr=0.1).step()
    elif change == "norm_buffer":
        backbone.body.layer1[0].bn1.running_var.mul_(2)
    else:
        backbone.double()
        images = images.double()
    with torch.no_grad():
        actual, expected = backbone_features(backbone, images), backbone(images)
    _assert_same_features(actual, expected)


def test_running_the_folded_backbone_leaves_the_state_dict_as_it_was():
    backbone = _backbone()
    before = {name: value.clone() for name, value in backbone.state_dict().items()}
    with torch.no_grad():
        backbone_features(backbone, _images())
    backbone_features(backbone.train(), _images())
    after = backbone.state_dict()
    assert list(after) == list(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), name


@pytest.mark.parametrize("top_size", [(4, 6), (3, 5)])
def test_upsample_add_is_the_nearest_upsampling_plus_the_lateral_exactly(top_size):
    generator = torch.Generator().manual_seed(2)
    lateral = convolution_layout(torch.randn(2, 8, 8, 12, generator=generator))
    top = convolution_layout(torch.randn(2, 8, *top_size, generator=generator))
    expected = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
    torch.testing.assert_close(upsample_add(lateral.clone(), top), expected, rtol=0, atol=0)


def test_training_lays_the_convolution_weights_out_channels_last_in_place():
    backbone = _backbone().train()
    conv_weights = {name: p for name, p in backbone.named_parameters() if p.dim() == 4}
    values = {name: p.detach().clone() for name, p in conv_weights.items()}
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights.values())
    features = backbone_features(backbone, _images())
    for name, parameter in backbone.named_parameters():
        if parameter.dim() == 4:
            assert parameter is conv_weights[name], name  # the optimizer's Parameter, relaid in place
            assert parameter.is_contiguous(memory_format=torch.channels_last), name
            assert torch.equal(parameter, values[name]), name
    sum((f * f).mean() for f in features.values()).backward()
    assert all(p.grad.is_contiguous(memory_format=torch.channels_last) for p in conv_weights.values())
    optimizer.step()
    assert any(not torch.equal(p, values[name]) for name, p in conv_weights.items())


def test_laying_out_keeps_an_existing_gradient_in_step():
    conv = nn.Conv2d(4, 6, 3)
    conv.weight.grad = torch.randn_like(conv.weight)
    grad = conv.weight.grad.clone()
    lay_out(conv.weight, torch.channels_last)
    assert conv.weight.grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv.weight.grad, grad)


def _packings(conv: nn.Conv2d) -> dict:
    """The input shapes ``conv`` holds a oneDNN-packed weight for, with the packings."""
    packed = fold._PACKED.get(conv)
    return {} if packed is None else dict(packed[1])


def _plain_convolution(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``F.conv2d`` on the weight ``convolve`` uses (cached, channels-last): the bits to equal."""
    weight, bias = convolution_weights(conv)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@pytest.mark.skipif(not fold._ONEDNN_PACKING, reason="this PyTorch build has no packed oneDNN convolution")
@pytest.mark.parametrize(
    ("conv", "input_shape"),
    [
        (nn.Conv2d(16, 24, 3, padding=1), (2, 16, 13, 17)),
        (nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), (2, 3, 33, 21)),
        (nn.Conv2d(16, 16, 3, stride=2, padding=1, dilation=1), (3, 16, 9, 11)),
        (nn.Conv2d(16, 8, 3, padding=2, dilation=2, groups=2), (2, 16, 10, 12)),
    ],
    ids=["3x3", "7x7-stride2-nobias", "3x3-stride2", "dilated-grouped"],
)
def test_prepacked_convolutions_give_the_bits_of_conv2d(conv, input_shape):
    """Convolutions PyTorch runs by oneDNN run on a weight packed once per input shape: the same
    values bit for bit and layout as ``F.conv2d``, the packing reused until the shape changes."""
    torch.manual_seed(5)
    conv = conv.requires_grad_(False)
    x = convolution_layout(torch.randn(input_shape))
    with torch.no_grad():
        out = convolve(conv, x)
        packing = _packings(conv)[tuple(x.shape)]
        again = convolve(conv, x)
    assert _packings(conv)[tuple(x.shape)] is packing
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, _plain_convolution(conv, x)) and torch.equal(again, out)


@pytest.mark.skipif(not fold._ONEDNN_PACKING, reason="this PyTorch build has no packed oneDNN convolution")
@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # torch.backends.mkldnn.flags on a CPU-only build
def test_convolutions_pytorch_runs_natively_or_under_autograd_are_not_packed():
    """Where PyTorch would not use oneDNN (a 1x1 convolution on one thread, a small single image, oneDNN
    switched off) or autograd records the call, the convolution is ``F.conv2d`` itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = [
            (nn.Conv2d(16, 8, 1), (2, 16, 9, 11)),  # PyTorch's native 1x1 kernel on one thread
            (nn.Conv2d(16, 8, 3, padding=1), (1, 16, 5, 7)),  # one small image: its native kernel
        ]
        for conv, shape in cases:
            conv.requires_grad_(False)
            x = convolution_layout(torch.randn(shape))
            with torch.no_grad():
                assert torch.equal(convolve(conv, x), _plain_convolution(conv, x))
            assert not _packings(conv)
    finally:
        torch.set_num_threads(threads)
    conv = nn.Conv2d(16, 8, 3, padding=1).requires_grad_(False)
    x = convolution_layout(torch.randn(2, 16, 9, 11))
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        assert torch.equal(convolve(conv, x), _plain_convolution(conv, x))
    assert not _packings(conv)
    source = x.clone().requires_grad_()
    convolve(conv, source).square().sum().backward()  # a frozen convolution inside a trained network
    expected = x.clone().requires_grad_()
    _plain_convolution(conv, expected).square().sum().backward()
    assert not _packings(conv) and torch.equal(source.grad, expected.grad)


@pytest.mark.skipif(not fold._ONEDNN_PACKING, reason="this PyTorch build has no packed oneDNN convolution")
def test_packings_follow_the_weights_and_keep_the_latest_shapes():
    torch.manual_seed(6)
    conv = nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    shapes = [(2, 8, 6 + size, 7) for size in range(fold._PACKED_SHAPES + 2)]
    with torch.no_grad():
        for shape in shapes:
            x = convolution_layout(torch.randn(shape))
            assert torch.equal(convolve(conv, x), _plain_convolution(conv, x))
        assert list(_packings(conv)) == shapes[-fold._PACKED_SHAPES :]  # the oldest two dropped
        conv.weight.mul_(-2)  # any change of the weight makes a new cached weight, packed afresh
        assert torch.equal(convolve(conv, x), _plain_convolution(conv, x))
        assert list(_packings(conv)) == [shapes[-1]]
    trained = nn.Conv2d(8, 8, 3, padding=1)  # a trained model's weight: channels-last, requiring grad
    lay_out(trained.weight, torch.channels_last)
    with torch.no_grad():
        assert torch.equal(convolve(trained, x), _plain_convolution(trained, x))
        assert list(_packings(trained)) == [shapes[-1]]
        assert convolution_weights(trained)[0] is trained.weight  # cached as it is: the parameter itself
        trained.weight.mul_(-2)  # an optimizer step's in-place write: the same tensor, new values
        assert torch.equal(convolve(trained, x), _plain_convolution(trained, x))


def test_the_packed_backbone_gives_the_unpacked_backbones_bits(monkeypatch):
    """The ``tiny`` FPN backbone at inference: the same feature maps with packing on and off."""
    backbone = _backbone()
    images = _images()
    with torch.no_grad():
        packed = backbone_features(backbone, images)
        assert any(_packings(conv) for conv in backbone.modules() if isinstance(conv, nn.Conv2d))
        monkeypatch.setattr(fold, "_ONEDNN_PACKING", False)
        unpacked = backbone_features(backbone, images)
    for name, features in unpacked.items():
        assert torch.equal(packed[name], features), name


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("out_channels", [(3, 12), (1,), (3, 12, 5)])
def test_sibling_pointwise_convolutions_are_the_modules_outputs_and_gradients(layout, out_channels):
    torch.manual_seed(3)
    convs = [nn.Conv2d(8, channels, 1) for channels in out_channels]
    x = torch.randn(2, 8, 5, 7).contiguous(memory_format=layout).requires_grad_()
    x_theirs = x.detach().clone().requires_grad_()
    ours = convolve_siblings(convs, x)
    theirs = [conv(x_theirs) for conv in convs]
    weights = [torch.randn_like(t) for t in theirs]
    sum((o * w).sum() for o, w in zip(ours, weights, strict=True)).backward()
    ours_grads = [x.grad] + [p.grad.clone() for conv in convs for p in conv.parameters()]
    for conv in convs:
        conv.zero_grad()
    sum((t * w).sum() for t, w in zip(theirs, weights, strict=True)).backward()
    theirs_grads = [x_theirs.grad] + [p.grad for conv in convs for p in conv.parameters()]
    for mine, expected in zip(ours + ours_grads, theirs + theirs_grads, strict=True):
        assert mine.shape == expected.shape
        _assert_rounding_level(mine, expected)


@pytest.mark.parametrize("out_channels", [(3, 12), (4, 12), (3, 12, 5)])
def test_sibling_product_padding_changes_no_bit(monkeypatch, out_channels):
    """The stacked weights padded to ``_GEMM_OUTPUT_MULTIPLE`` rows give the unpadded product's
    outputs and gradients bit for bit (sums of 15 (the RPN head's), 16 (no padding) and 20 output
    channels; a single one is a matrix-vector product unpadded, equal at rounding level only: the
    test against the modules covers it)."""
    torch.manual_seed(4)
    convs = [nn.Conv2d(32, channels, 1) for channels in out_channels]
    x = convolution_layout(torch.randn(2, 32, 9, 13))

    def outputs_and_gradients():
        source = x.clone().requires_grad_()
        for conv in convs:
            conv.zero_grad(set_to_none=True)
        outputs = convolve_siblings(convs, source)
        assert [tuple(o.shape) for o in outputs] == [(2, c, 9, 13) for c in out_channels]
        sum((o * (index + 1)).sum() for index, o in enumerate(outputs)).backward()
        return [o.detach() for o in outputs] + [source.grad] + [p.grad for conv in convs for p in conv.parameters()]

    padded = outputs_and_gradients()
    monkeypatch.setattr(fold, "_GEMM_OUTPUT_MULTIPLE", 1)
    for mine, unpadded in zip(padded, outputs_and_gradients(), strict=True):
        assert torch.equal(mine, unpadded)


def test_siblings_that_are_not_pointwise_run_one_by_one():
    convs = [nn.Conv2d(8, 3, 3, padding=1), nn.Conv2d(8, 4, 1)]
    x = convolution_layout(torch.randn(2, 8, 5, 7))
    with torch.no_grad():
        for mine, conv in zip(convolve_siblings(convs, x), convs, strict=True):
            torch.testing.assert_close(mine, conv(x), rtol=0, atol=0)
