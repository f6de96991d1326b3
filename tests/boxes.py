"""Box factories shared by the tests: random, degenerate and adversarial box sets."""

from __future__ import annotations

import torch


def random_boxes(n: int, *, scale: float = 100.0, generator: torch.Generator | None = None, batch=()) -> torch.Tensor:
    """``[*batch, n, 4]`` valid xyxy boxes (x1 < x2, y1 < y2) in fp32 inside ``[0, 2 * scale]``."""
    corner = torch.rand(*batch, n, 2, generator=generator) * scale
    size = torch.rand(*batch, n, 2, generator=generator) * scale + scale * 1e-3
    return torch.cat([corner, corner + size], dim=-1)


def special_boxes() -> torch.Tensor:
    """``[12, 4]``: zero-width, zero-height, point, inverted, identical, disjoint, huge and tiny boxes."""
    return torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 10.0],  # identical to the first
            [5.0, 5.0, 5.0, 15.0],  # zero width
            [5.0, 5.0, 15.0, 5.0],  # zero height
            [3.0, 3.0, 3.0, 3.0],  # a point
            [10.0, 10.0, 0.0, 0.0],  # inverted
            [100.0, 100.0, 110.0, 110.0],  # disjoint from the rest
            [0.0, 0.0, 1e6, 1e6],  # huge
            [-1e6, -1e6, 1e6, 1e6],  # huge, around the origin
            [1.0, 1.0, 1.001, 1.001],  # tiny
            [10.0, 0.0, 20.0, 10.0],  # touches the first along an edge
            [2.0, 2.0, 8.0, 8.0],  # inside the first
        ]
    )
