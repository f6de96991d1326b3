"""The backbone's convolutions with their batch norms folded in, run without changing the module tree.

Shapes: a convolution weight ``W [C_out, C_in, k, k]`` (bias ``b [C_out]`` or none), feature maps
``[B, C, H, W]`` in :func:`convolution_memory_format`.

A batch norm with fixed statistics after a convolution, ``z = conv(x, W, b) * scale + shift`` with
``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale`` (torchvision's
``FrozenBatchNorm2d``), is one convolution
``conv(x, W * scale[:, None, None, None], b * scale + shift)``: the norm's pass over the feature map
is gone and the result differs only by rounding. The modules and their state dict stay torchvision's
(its keys and values: checkpoints load unchanged); the folded weights are made when the network runs:

- when autograd records the fold (grad mode on and a source tensor requiring grad: training), per call,
  so gradients reach ``W`` (the norm's statistics and affine terms are buffers); the parameter ``W``
  itself is then stored in :func:`convolution_memory_format` (:func:`lay_out`, once);
- otherwise (inference, frozen layers) once, kept in :func:`convolution_memory_format` (the
  convolution then reorders no weight per call) until a source tensor changes: the cache is keyed
  on every source's storage, ``_version`` (bumped by ``load_state_dict``, optimizer steps and any
  in-place write), device and dtype. A plain convolution's weight is cached in that layout the same way.
  Where PyTorch runs the convolution by oneDNN, that weight is also packed once per input shape into
  the blocked layout oneDNN reads (:func:`_prepacked_convolution`: the same bits, no reorder per call).

:func:`run_layers` runs a ``nn.Sequential`` (or torchvision's ``IntermediateLayerGetter``) of
torchvision ResNet stages, blocks, convolutions and norms so; :func:`run_fpn` runs torchvision's
``FeaturePyramidNetwork`` on such convolutions, its top-down path an in-place broadcast add at inference.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.misc import FrozenBatchNorm2d

# conv module -> (key of its sources, weight, bias); an entry dies with its module.
_CACHE: weakref.WeakKeyDictionary[nn.Conv2d, tuple[tuple, Tensor, Tensor | None]] = weakref.WeakKeyDictionary()
# conv module -> (the key of its cached weight in _CACHE, that weight packed by oneDNN per input shape,
# most recent last). The key, not the weight's identity: a cached weight can be the parameter itself,
# changed in place.
_PACKED: weakref.WeakKeyDictionary[nn.Conv2d, tuple[tuple, OrderedDict[tuple[int, ...], Tensor]]] = (
    weakref.WeakKeyDictionary()
)
# Input shapes a convolution keeps a packed weight for: the RPN head's convolution runs on every FPN
# level (5) of a batch; one more shape than this drops the least recently used packing.
_PACKED_SHAPES = 8
# PyTorch's own ops for a convolution by oneDNN on a weight packed ahead (what Inductor's frozen CPU
# graphs call); absent from some builds, where every convolution runs by F.conv2d.
_ONEDNN_PACKING = all(
    hasattr(namespace, name)
    for namespace, name in (
        (torch.ops.mkldnn, "_convolution_pointwise"),
        (torch._C._nn, "mkldnn_reorder_conv2d_weight"),
        (torch._C, "_select_conv_backend"),
    )
)


def convolution_memory_format(device: torch.device) -> torch.memory_format:
    """The memory layout the backbone's convolutions run fastest in on ``device``: channels-last on
    the CPU (oneDNN's kernels take NHWC maps without reordering them: 1.15x the ``small_cpu`` model's
    inference and 1.1x its training step against NCHW, one thread), NCHW elsewhere (not measured)."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def foldable(norm: nn.Module | None) -> bool:
    """Whether ``norm`` is a frozen batch norm (torchvision's ``FrozenBatchNorm2d``), folded into the
    convolution before it. An ``nn.BatchNorm2d`` in eval mode is the same map but runs as it is: its
    models (``small_cpu``) are compared with torchvision's at rounding level, folding it changes the
    rounding enough to flip a near-tie proposal of the untrained benchmark model, and it gained
    nothing beyond the timing noise there (one thread, paired rounds)."""
    return isinstance(norm, FrozenBatchNorm2d)


def _sources(conv: nn.Conv2d, norm: nn.Module | None) -> list[Tensor]:
    tensors = [conv.weight] if conv.bias is None else [conv.weight, conv.bias]
    if norm is not None:
        tensors += [norm.weight, norm.bias, norm.running_mean, norm.running_var]
    return tensors


def _fold(conv: nn.Conv2d, norm: nn.Module | None) -> tuple[Tensor, Tensor | None]:
    """``W * scale`` ``[C_out, C_in, k, k]`` and ``b * scale + shift`` ``[C_out]`` (``conv``'s own
    weight and bias without ``norm``); ``scale``, ``shift`` by ``FrozenBatchNorm2d``'s formula."""
    if norm is None:
        return conv.weight, conv.bias
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    shift = norm.bias - norm.running_mean * scale
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return conv.weight * scale[:, None, None, None], bias


def lay_out(parameter: Tensor, layout: torch.memory_format) -> None:
    """Store ``parameter``'s data (and gradient) in ``layout``, in place and once (a no-op when it is
    already), keeping the same ``Parameter`` (optimizers hold it) and its values. A convolution whose
    weight is in its input's layout reorders neither the weight in its forward and backward nor the
    gradient, which comes out in the same layout: on the CPU three weight copies per convolution
    and training step, ~20 ms of ``small_cpu``'s 1.35 s step (one thread), are gone."""
    if not parameter.is_contiguous(memory_format=layout):
        parameter.data = parameter.data.contiguous(memory_format=layout)
    if parameter.grad is not None and not parameter.grad.is_contiguous(memory_format=layout):
        parameter.grad = parameter.grad.contiguous(memory_format=layout)


def convolution_weights(conv: nn.Conv2d, norm: nn.Module | None = None) -> tuple[Tensor, Tensor | None]:
    """``conv``'s weight ``[C_out, C_in, k, k]`` and bias ``[C_out]`` (or None) with the foldable
    ``norm`` after it folded in: per call when autograd records it, else cached in
    :func:`convolution_memory_format` (see the module docstring)."""
    sources = _sources(conv, norm)
    weight = conv.weight
    layout = convolution_memory_format(weight.device)
    if torch.compiler.is_compiling():
        return _fold(conv, norm)
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        lay_out(weight, layout)
        return _fold(conv, norm)
    key = (weight.device, weight.dtype, layout, *((t.data_ptr(), t._version) for t in sources))
    cached = _CACHE.get(conv)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            folded, bias = _fold(conv, norm)
            cached = (key, folded.contiguous(memory_format=layout), bias)
        _CACHE[conv] = cached
    return cached[1], cached[2]


def convolve(conv: nn.Conv2d, x: Tensor, norm: nn.Module | None = None) -> Tensor:
    """``conv`` on ``x [B, C_in, H, W]``, then ``norm`` (folded in when :func:`foldable`)."""
    if conv.padding_mode != "zeros":  # torchvision's backbones pad with zeros; others run as they are
        return conv(x) if norm is None else norm(conv(x))
    if norm is not None and not foldable(norm):
        return norm(convolve(conv, x))
    weight, bias = convolution_weights(conv, norm)
    out = _prepacked_convolution(conv, x, weight, bias)
    if out is not None:
        return out
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _prepacked_convolution(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """``F.conv2d(x, weight, bias, ...)`` by oneDNN on ``weight`` (the cached ``[C_out, C_in, k, k]`` of
    :func:`convolution_weights`) packed ahead into the blocked layout its kernel reads for ``x``'s
    shape, the packing kept until the weight changes (per input shape, :data:`_PACKED_SHAPES` of
    them). ``F.conv2d`` reorders the weight into that layout on every call (29 reorders, ~11 ms of
    ``small_cpu``'s 430 ms inference on one thread); this gives its bits (the same oneDNN primitive).
    None where the convolution is to run by ``F.conv2d``: autograd records it, ``x`` is not a
    channels-last fp32 CPU map, or PyTorch would not run it by oneDNN (its native 1x1, small or
    single-image kernels: other sums)."""
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not _ONEDNN_PACKING or torch.compiler.is_compiling() or recorded:
        return None
    cached = _CACHE.get(conv)
    if cached is None or cached[1] is not weight:  # the weight of this call is not the cached one
        return None
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)):
        return None
    padding, stride, dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
    backend = torch._C._select_conv_backend(x, weight, bias, stride, padding, dilation, False, [0, 0], conv.groups)
    if backend != torch._C._ConvBackend.Mkldnn:
        return None
    packed = _PACKED.get(conv)
    if packed is None or packed[0] != cached[0]:  # the cache's key: every source's storage and version
        packed = _PACKED[conv] = (cached[0], OrderedDict())
    packings, shape = packed[1], tuple(x.shape)
    if shape in packings:
        packings.move_to_end(shape)
    else:
        onednn_weight = weight.to_mkldnn()
        packings[shape] = torch._C._nn.mkldnn_reorder_conv2d_weight(
            onednn_weight, padding, stride, dilation, conv.groups, list(shape)
        )
        if len(packings) > _PACKED_SHAPES:
            packings.popitem(last=False)
    return torch.ops.mkldnn._convolution_pointwise(
        x, packings[shape], bias, padding, stride, dilation, conv.groups, "none", [], ""
    )


def _pointwise(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is a plain 1x1 convolution: each output pixel one product of its input pixel."""
    plain = conv.stride == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
    return plain and conv.kernel_size == (1, 1) and conv.padding_mode == "zeros"


# The siblings' stacked outputs are padded with zero weights to a multiple of this many columns: the
# fp32 lanes of an AVX-512 register. MKL's sgemm of the RPN head's P2 pixel rows [19200, 128] by
# [128, 15] (3 logits, 12 deltas) took 3.8 ms and by [128, 16] 1.6 ms (one thread, this project's
# CPU); the padded product's first 15 columns are the unpadded one's bit for bit.
_GEMM_OUTPUT_MULTIPLE = 16


def convolve_siblings(convs: list[nn.Conv2d], x: Tensor) -> list[Tensor]:
    """``[conv(x) for conv in convs]`` on ``x [B, C, H, W]`` (each ``[B, C_i, H, W]``). 1x1 convolutions
    on a channels-last ``x`` run as one matrix product of its pixel rows ``[B * H * W, C]`` with their
    stacked weights ``[sum C_i, C]``, zero-padded to a multiple of ``_GEMM_OUTPUT_MULTIPLE`` rows (their
    maps are views of the one ``[B, H, W, sum C_i + padding]`` output):
    the same sums (one sgemm over ``C``, as the convolution's), where PyTorch's 1x1 convolution on one
    thread copies a channels-last map to NCHW and, in the backward, zero-fills an input gradient
    per sibling and adds them up (the RPN head's two on P2: ~20 ms of ``small_cpu``'s training step
    against ~5 ms). Other convolutions or layouts run one by one (:func:`convolve`)."""
    pixels = x.permute(0, 2, 3, 1)
    if not (all(map(_pointwise, convs)) and pixels.is_contiguous()) or len({c.bias is None for c in convs}) > 1:
        return [convolve(conv, x) for conv in convs]
    channels = [conv.out_channels for conv in convs]
    padding = -sum(channels) % _GEMM_OUTPUT_MULTIPLE
    weight = F.pad(torch.cat([conv.weight.flatten(1) for conv in convs]), (0, 0, 0, padding))
    bias = None if convs[0].bias is None else F.pad(torch.cat([conv.bias for conv in convs]), (0, padding))
    out = F.linear(pixels, weight, bias)  # [B, H, W, sum C_i + padding]
    return [part.permute(0, 3, 1, 2) for part in out.split([*channels, padding], dim=3)[: len(convs)]]


def _run_block(block: BasicBlock | Bottleneck, x: Tensor) -> Tensor:
    """torchvision's ResNet block (``BasicBlock``: two 3x3 convolutions; ``Bottleneck``: 1x1, 3x3,
    1x1) with its norms folded: the same operations as its ``forward``."""
    out = torch.relu_(convolve(block.conv1, x, block.bn1))
    if isinstance(block, Bottleneck):
        out = torch.relu_(convolve(block.conv2, out, block.bn2))
        out = convolve(block.conv3, out, block.bn3)
    else:
        out = convolve(block.conv2, out, block.bn2)
    identity = x if block.downsample is None else run_layers(block.downsample, x)
    return torch.relu_(out.add_(identity))


def run_layers(layers: nn.Sequential, x: Tensor) -> Tensor | OrderedDict[str, Tensor]:
    """``layers(x)`` with every convolution followed by a foldable norm run as one folded convolution.
    ``layers``: a ``nn.Sequential`` of convolutions, norms, ResNet blocks and stages, other modules
    (run as they are); an ``IntermediateLayerGetter`` returns its ordered dict of stage outputs."""
    returned = getattr(layers, "return_layers", None)
    outputs = OrderedDict()
    named = list(layers.named_children())
    i = 0
    while i < len(named):
        name, module = named[i]
        if isinstance(module, nn.Conv2d):
            following = named[i + 1][1] if i + 1 < len(named) else None
            fold = foldable(following) and not (returned and name in returned)
            x = convolve(module, x, following if fold else None)
            i += fold
            name = named[i][0]
        elif isinstance(module, (BasicBlock, Bottleneck)):
            x = _run_block(module, x)
        elif isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            x = run_layers(module, x)
        else:
            x = module(x)
        if returned and name in returned:
            outputs[returned[name]] = x
        i += 1
    return outputs if returned is not None else x


def upsample_add(lateral: Tensor, top: Tensor) -> Tensor:
    """``lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")`` (``lateral [B, C, H, W]``,
    ``top [B, C, h, w]``). Unless autograd records it, when ``H, W = 2h, 2w`` (every FPN level of an
    image padded to a multiple of the coarsest stride): in place, a broadcast add of ``top`` over 2x2
    blocks of ``lateral`` with no upsampled map (the same sums: nearest neighbour takes row ``i // 2``,
    column ``j // 2``); under autograd an in-place add on a view would copy the whole gradient back."""
    height, width = top.shape[-2:]
    recorded = torch.is_grad_enabled() and (lateral.requires_grad or top.requires_grad)
    if recorded or tuple(lateral.shape[-2:]) != (2 * height, 2 * width):
        return lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
    blocks = lateral.unflatten(3, (width, 2)).unflatten(2, (height, 2))  # [B, C, h, 2, w, 2], a view
    blocks.add_(top[:, :, :, None, :, None])
    return lateral


def run_fpn(fpn: FeaturePyramidNetwork, features: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
    """torchvision's ``FeaturePyramidNetwork.forward`` on ``features`` (finest level first) with its
    convolutions through :func:`run_layers` and the top-down sum by :func:`upsample_add`."""
    names, maps = list(features), list(features.values())
    last_inner = run_layers(fpn.inner_blocks[-1], maps[-1])
    results = [run_layers(fpn.layer_blocks[-1], last_inner)]
    for level in range(len(maps) - 2, -1, -1):
        last_inner = upsample_add(run_layers(fpn.inner_blocks[level], maps[level]), last_inner)
        results.insert(0, run_layers(fpn.layer_blocks[level], last_inner))
    if fpn.extra_blocks is not None:
        results, names = fpn.extra_blocks(results, maps, names)
    return OrderedDict(zip(names, results, strict=True))
