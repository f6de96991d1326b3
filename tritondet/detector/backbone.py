"""Backbones: torchvision classification networks cut for detection (never downloads weights).

Every backbone maps ``images [B, 3, H, W]`` to an ordered dict of feature maps ``[B, C, H_l, W_l]``
and has ``out_channels`` (C). FPN: keys ``"0".."L-1"`` for the returned ResNet stages plus
``"pool"`` (torchvision's ``BackboneWithFPN``, so its state-dict keys are torchvision's); single
level: one key ``"0"`` at stride 16. :func:`backbone_features` runs either with its frozen batch norms
folded into the convolutions (:mod:`.fold`). :class:`LiteBackbone`: the ``lite`` preset's narrow ResNet-like
network with an FPN, for training from scratch on a CPU.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from .config import BackboneConfig
from .fold import run_fpn, run_layers

_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")
# VGG-16 ``features`` indices where conv blocks 2..5 start; conv5_3's ReLU ends at 30 (the last
# max-pooling, index 30, is dropped: the paper pools RoIs from conv5_3 at stride 16).
_VGG16_BLOCK_STARTS = (5, 10, 17, 24)
_VGG16_CONV5_END = 30


class SingleLevelBackbone(nn.Module):
    """One feature map at stride 16, as the ordered dict ``{"0": features}``."""

    def __init__(self, body: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        features = run_layers(self.body, images)
        if isinstance(features, dict):
            features = next(iter(features.values()))
        return OrderedDict([("0", features)])


def backbone_features(backbone: nn.Module, images: Tensor) -> OrderedDict[str, Tensor]:
    """``backbone(images)``: ``images [B, 3, H, W]`` -> the ordered dict of feature maps; torchvision's
    ``BackboneWithFPN`` (a ResNet body) with its frozen batch norms folded into its convolutions
    (:func:`.fold.run_layers`, :func:`.fold.run_fpn`), any other backbone by its own ``forward``."""
    if isinstance(backbone, BackboneWithFPN):
        return run_fpn(backbone.fpn, run_layers(backbone.body, images))
    return backbone(images)


def _freeze_resnet(body: nn.Module, trainable_layers: int) -> None:
    """Freeze all but the top ``trainable_layers`` stages (torchvision's rule; 5 trains ``bn1`` too)."""
    train = list(_RESNET_STAGES[:trainable_layers]) + (["bn1"] if trainable_layers == 5 else [])
    for name, parameter in body.named_parameters():
        if not any(name.startswith(stage) for stage in train):
            parameter.requires_grad_(False)


def build_backbone(config: BackboneConfig) -> nn.Module:
    """The backbone module for ``config`` with random weights (load weights with the compat module)."""
    if not 0 <= config.trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {config.trainable_layers}")
    norm_layer = FrozenBatchNorm2d if config.frozen_batchnorm else nn.BatchNorm2d
    if config.name in _RESNETS:
        body = getattr(torchvision.models, config.name)(weights=None, norm_layer=norm_layer)
        _freeze_resnet(body, config.trainable_layers)
        stage2_channels = body.inplanes // 8  # layer1's output channels (64 or 256)
        if not config.fpn:
            return SingleLevelBackbone(IntermediateLayerGetter(body, {"layer3": "0"}), stage2_channels * 4)
        layers = tuple(config.returned_layers)
        if not layers or min(layers) < 1 or max(layers) > 4:
            raise ValueError(f"returned_layers must be ResNet stages in [1, 4], got {layers}")
        return BackboneWithFPN(
            body,
            {f"layer{stage}": str(i) for i, stage in enumerate(layers)},
            [stage2_channels * 2 ** (stage - 1) for stage in layers],
            config.fpn_channels,
            extra_blocks=LastLevelMaxPool(),
        )
    if config.name == "vgg16":
        if config.fpn:
            raise ValueError("the vgg16 backbone is single-level: set fpn=False")
        features = torchvision.models.vgg16(weights=None).features[:_VGG16_CONV5_END]
        frozen_blocks = 5 - config.trainable_layers  # the paper fine-tunes conv3_1 and up (3 blocks)
        if frozen_blocks > 0:
            for parameter in features[: _VGG16_BLOCK_STARTS[frozen_blocks - 1]].parameters():
                parameter.requires_grad_(False)
        return SingleLevelBackbone(features, 512)
    raise ValueError(f"unknown backbone {config.name!r}: expected one of {(*_RESNETS, 'vgg16')}")


# ---------------------------------------------------------------------------------------------------------------------
# The lite backbone: the CPU model's, narrow and trained from scratch (the ``lite`` preset)
# ---------------------------------------------------------------------------------------------------------------------


def _conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    """Two 3x3 conv + batch norm with an identity shortcut (ResNet's basic block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.body(x))


class LiteBackbone(nn.Module):
    """A narrow ResNet-like network with an FPN, for training from scratch on a CPU.

    Stem: two stride-2 3x3 convolutions (stride 4, ``stem_channels``); then one stage per entry of
    ``widths``, each a stride-2 convolution and a residual block, giving maps at strides 8, 16, 32;
    torchvision's ``FeaturePyramidNetwork`` with ``fpn_channels`` and an extra max-pooled level
    (stride 64). Output keys ``"0", "1", "2", "pool"`` as torchvision's ``BackboneWithFPN``. No
    stride-4 level: at a 192-pixel short side the smallest synthetic objects (~19 pixels) still span
    two stride-8 cells, and the stride-4 level would hold 3/4 of the anchors and of the RPN head's cost.
    """

    def __init__(
        self, widths: tuple[int, ...] = (48, 96, 128), stem_channels: int = 32, fpn_channels: int = 64
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _conv_bn(3, stem_channels // 2, stride=2), _conv_bn(stem_channels // 2, stem_channels, stride=2)
        )
        stages, previous = [], stem_channels
        for width in widths:
            stages.append(nn.Sequential(_conv_bn(previous, width, stride=2), _Residual(width)))
            previous = width
        self.stages = nn.ModuleList(stages)
        self.fpn = FeaturePyramidNetwork(list(widths), fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        x = self.stem(images)
        features = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            features[str(i)] = x
        return self.fpn(features)


def feature_strides(features: list[Tensor], padded_size: tuple[int, int]) -> list[tuple[int, int]]:
    """Pixels per feature-map position of every level: padded image size // feature size
    (torchvision's anchor strides; Python ints from shapes, no host sync)."""
    height, width = padded_size
    return [(height // f.shape[-2], width // f.shape[-1]) for f in features]
