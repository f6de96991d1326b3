"""RPN proposal stage: ``rpn_proposals`` against torchvision's RPN post-processing (anchors,
``BoxCoder.decode``, ``filter_proposals``) on the same raw head outputs.

Full size: B = 1, 2, 8 images of 800x1333 (padded to 800x1344) with the five FPN levels of
R50-FPN, test setting (1000 / 1000). Strides are torchvision's: padded size // feature-map size.
The CPU runs B = 1.
"""

from __future__ import annotations

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers

from ... import ops
from .. import harness

SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = ((0.5, 1.0, 2.0),) * 5
# (padded height, width), (image height, width), (pre, post nms top n), batch sizes per device.
_SIZES = {
    "tiny": {"cpu": [((64, 96), (61, 90), (50, 20), 1)], "cuda": [((64, 96), (61, 90), (50, 20), 2)]},
    "quick": {
        "cpu": [((800, 1344), (800, 1333), (1000, 1000), 1)],
        "cuda": [((800, 1344), (800, 1333), (1000, 1000), 2)],
    },
    "full": {
        "cpu": [((800, 1344), (800, 1333), (1000, 1000), 1)],
        "cuda": [((800, 1344), (800, 1333), (1000, 1000), b) for b in (1, 2, 8)],
    },
}


def _grid_sizes(padded):
    # ResNet-FPN feature maps: stride 4..32 by ceil division, the pool level halves P5 again.
    sizes = [(-(-padded[0] // s), -(-padded[1] // s)) for s in (4, 8, 16, 32)]
    return [*sizes, (-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2))]


def _inputs(padded, image_size, batch, dtype, device):
    def inputs():
        generator = torch.Generator().manual_seed(batch)
        objectness, deltas = [], []
        for height, width in _grid_sizes(padded):
            objectness.append((torch.randn(batch, 3, height, width, generator=generator) * 3).to(device, dtype))
            deltas.append((torch.randn(batch, 12, height, width, generator=generator) * 0.5).to(device, dtype))
        sizes = [image_size] * batch
        return objectness, deltas, torch.tensor(sizes, device=device), sizes

    return inputs


def _ours(padded, top_n):
    strides = [(padded[0] // h, padded[1] // w) for h, w in _grid_sizes(padded)]

    def run(objectness, deltas, image_sizes, _):
        return ops.rpn_proposals(objectness, deltas, image_sizes, SIZES, RATIOS, strides, *top_n)

    return run


def _torchvision(padded, top_n):
    pre, post = top_n
    rpn = RegionProposalNetwork(
        TorchvisionAnchorGenerator(SIZES, RATIOS), RPNHead(1, 3), 0.7, 0.3, 256, 0.5,
        {"training": pre, "testing": pre}, {"training": post, "testing": post}, 0.7,
    ).eval()  # fmt: skip

    def run(objectness, deltas, _, image_sizes):
        batch = objectness[0].shape[0]
        images = ImageList(objectness[0].new_empty(batch, 3, *padded), image_sizes)
        anchors = rpn.anchor_generator(images, objectness)
        counts = [o[0].numel() for o in objectness]
        flat_objectness, flat_deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(flat_deltas.detach(), anchors).view(batch, -1, 4)
        return rpn.filter_proposals(proposals, flat_objectness, image_sizes, counts)

    return run


def _same_proposals(result, expected) -> None:
    """Same count and scores; the same boxes, except that the last kept score may tie with
    candidates left out, and then either may be kept (sigmoids of large random logits tie)."""
    boxes, scores, num_valid = result
    for image, (their_boxes, their_scores) in enumerate(zip(*expected, strict=True)):
        n = int(num_valid[image])
        assert n == len(their_scores), f"image {image}: {n} proposals, torchvision has {len(their_scores)}"
        torch.testing.assert_close(scores[image, :n], their_scores, rtol=1e-4, atol=1e-6)
        inner = scores[image, :n] > scores[image, n - 1] if n else scores[image, :0] > 0
        mine, theirs = boxes[image, :n][inner], their_boxes[inner]
        same = ((mine[:, None] - theirs[None]).abs() <= 1e-3 + 1e-4 * theirs[None].abs()).all(-1)
        assert same.any(1).all() and same.any(0).all(), f"image {image}: boxes differ"


def cases(device: torch.device, sizes: str) -> list:
    result = []
    for padded, image_size, top_n, batch in _SIZES[sizes][device.type]:
        head_bytes = sum(5 * 3 * h * w for h, w in _grid_sizes(padded)) * batch * 4
        result.append(
            harness.Case(
                op="rpn_proposals",
                size=f"{batch}x{image_size[0]}x{image_size[1]}-{top_n[0]}/{top_n[1]}",
                dtype=torch.float32,
                device=device,
                inputs=_inputs(padded, image_size, batch, torch.float32, device),
                ours=_ours(padded, top_n),
                torchvision=_torchvision(padded, top_n),
                # Read every logit and delta once, write the padded proposals once.
                min_bytes=head_bytes + batch * top_n[1] * 5 * 4,
                check=_same_proposals,
            )
        )
    return result
