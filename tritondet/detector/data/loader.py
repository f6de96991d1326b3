"""Batching detection samples: the collate function and a seeded (optionally distributed) ``DataLoader``.

Shape shorthand: B images in a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict] | None]) -> tuple[list[torch.Tensor], list[dict]]:
    """``[(image, target)] * B`` -> ``(images, targets)``: two lists of length B; images keep their own sizes.

    ``None`` samples (images the dataset skipped as unreadable) are left out, so a batch may be shorter, or empty."""
    kept = [sample for sample in batch if sample is not None]
    images = [image for image, _ in kept]
    targets = [target for _, target in kept]
    return images, targets


def make_data_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A ``DataLoader`` of ``(images, targets)`` lists (:func:`collate_detection`), reproducible from ``seed``.

    With ``distributed`` (an initialized ``torch.distributed`` process group), a ``DistributedSampler``
    gives each rank its share; call ``loader.sampler.set_epoch(epoch)`` every epoch so the shuffle
    changes. Note that it pads the last round with repeated images so every rank gets the same count:
    deduplicate by ``image_id`` when gathering evaluation results. Otherwise a seeded ``RandomSampler``
    (``shuffle``) or a ``SequentialSampler``. The loader's generator, seeded with ``seed``, also
    seeds each worker process's torch generator (and so :class:`DetectionTransform`'s flips); with
    ``num_workers=0`` the transforms draw from the main process's generator instead.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be non-negative, got {num_workers}")
    generator = torch.Generator().manual_seed(seed)
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_detection,
        drop_last=drop_last,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
    )
