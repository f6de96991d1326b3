"""The fast CPU path's thin wrappers over torchvision's C++ kernels, where those compute exactly
what our ops promise, and :func:`empty_on_huge_pages` for its large fresh buffers.

Shapes: boxes ``[N, 4]`` xyxy; features ``[N, C, H, W]`` (one per FPN level); rois ``[K, 5]``
(batch index, x1, y1, x2, y2); pooled outputs ``[K, C, PH, PW]``.

On CPU tensors there is no device to stall, so these run data-dependent shapes and host reads
freely. Every wrapper computes in the compute dtype of our ops (fp32, fp64 for fp64 inputs: fp16
and bf16 are upcast before torchvision sees them) and returns the dtype our ops return.
torchvision's pooling kernels index the feature map with the RoI's batch index and coordinates
unchecked, so :func:`torchvision_reads` says when a set of RoIs is safe to hand them; the callers
run the reference otherwise.
"""

from __future__ import annotations

import ctypes
import mmap

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)

from ._common import compute_dtype_of

# A CPU buffer spanning at least two huge pages (2 MiB each on x86-64 and most arm64 kernels) is
# advised huge before it is first written: a fresh buffer's first touch costs one page fault per
# page, which at 4 KiB pages is most of a zero fill (about 25 of 29 ms for the 73 MB gradient of
# 256 RoIs x 91 classes x 28 x 28 on the project's machine), at 2 MiB pages 512 times fewer faults.
HUGE_PAGE_BYTES = 2 << 20
if hasattr(mmap, "MADV_HUGEPAGE"):
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
else:
    _madvise = None  # no transparent huge pages (not Linux)


def empty_on_huge_pages(shape, dtype, device) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``; on the CPU, the huge-page-aligned span
    of a buffer of two huge pages or more is advised ``MADV_HUGEPAGE`` before anything touches it
    (the kernel backs it with transparent huge pages where they are enabled for advised memory;
    elsewhere the advice changes nothing)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if _madvise is not None and out.device.type == "cpu" and nbytes >= 2 * HUGE_PAGE_BYTES:
        start = -(-out.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        end = (out.data_ptr() + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
        _madvise(start, end - start, mmap.MADV_HUGEPAGE)  # advice only: a refusal changes nothing
    return out


def greedy_keep(ranked: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``[N, 4]`` boxes by decreasing score (compute dtype) -> ``[K]`` int64 kept positions, ascending.

    torchvision's C++ NMS is our formula (fp32 or fp64 IoU, suppression when IoU > threshold, a
    NaN IoU never suppresses); it re-sorts by score with an unstable sort and puts NaN first, so
    it is given strictly decreasing rank scores instead of the real ones: our order is kept.
    fp32 ranks are distinct integers up to 2**24 boxes, far beyond what a quadratic NMS takes.
    """
    n = ranked.shape[0]
    if n <= 1:  # nothing to suppress
        return torch.arange(n, device=ranked.device)
    ranks = torch.arange(n, 0, -1, dtype=ranked.dtype, device=ranked.device)
    return torch.ops.torchvision.nms(ranked, ranks, iou_threshold)


def torchvision_reads(rois: torch.Tensor, batch_size: int) -> bool:
    """Whether torchvision's pooling kernels may read ``rois`` (one host read): finite
    coordinates and integral batch indices in ``[0, batch_size)``. Our ops return zeros for the
    other RoIs; torchvision's kernels would read out of bounds."""
    batch = rois[:, 0]
    ok = torch.isfinite(rois[:, 1:]).all() & ((batch >= 0) & (batch < batch_size) & (batch == batch.floor())).all()
    return bool(ok)


def ps_roi_align_cpu(
    input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, output_size: tuple[int, int], sampling_ratio: int
) -> torch.Tensor:
    """``[N, C * PH * PW, H, W], [K, 5] -> [K, C, PH, PW]`` contiguous, the input's dtype."""
    compute_dtype = compute_dtype_of(input.dtype)
    rois = rois.to(compute_dtype)
    out, _ = torch.ops.torchvision.ps_roi_align(
        input.to(compute_dtype), rois, spatial_scale, *output_size, sampling_ratio
    )
    if sampling_ratio <= 0:
        # An adaptive grid has no sample in an RoI of zero or negative width or height on the map
        # (a negative scale flips the RoI): torchvision divides 0 by 0 there, our op returns 0.
        _, x1, y1, x2, y2 = rois.unbind(1)
        width = (x2 * spatial_scale - 0.5) - (x1 * spatial_scale - 0.5)
        height = (y2 * spatial_scale - 0.5) - (y1 * spatial_scale - 0.5)
        out[~((width > 0) & (height > 0))] = 0
    return out.contiguous().to(input.dtype)


def ps_roi_align_backward_cpu(
    grad: torch.Tensor,
    input: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    output_size: tuple[int, int],
    sampling_ratio: int,
    channel_mapping: torch.Tensor,
) -> torch.Tensor:
    """``[K, C, PH, PW]`` -> ``[N, C * PH * PW, H, W]`` gradient (the input's dtype and memory
    format). ``channel_mapping [C, PH, PW]``: the input channel each output bin reads."""
    compute_dtype = compute_dtype_of(input.dtype)
    grad_input = torch.ops.torchvision._ps_roi_align_backward(
        grad.to(compute_dtype).contiguous(),
        rois.to(compute_dtype),
        channel_mapping.to(torch.int32).expand(grad.shape).contiguous(),
        spatial_scale,
        *output_size,
        sampling_ratio,
        *input.shape,
    )
    return torch.empty_like(input).copy_(grad_input)


def roi_pool_cpu(
    input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, output_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, C, H, W], [K, 5] -> ([K, C, PH, PW] maxima in the input's dtype, int32 argmax)``."""
    compute_dtype = compute_dtype_of(input.dtype)
    out, argmax = torch.ops.torchvision.roi_pool(
        input.to(compute_dtype), rois.to(compute_dtype), spatial_scale, *output_size
    )
    return out.contiguous().to(input.dtype), argmax


def ps_roi_pool_cpu(
    input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, output_size: tuple[int, int]
) -> torch.Tensor:
    """``[N, C * PH * PW, H, W], [K, 5] -> [K, C, PH, PW]`` bin means in the input's dtype."""
    compute_dtype = compute_dtype_of(input.dtype)
    out, _ = torch.ops.torchvision.ps_roi_pool(
        input.to(compute_dtype), rois.to(compute_dtype), spatial_scale, *output_size
    )
    return out.contiguous().to(input.dtype)
