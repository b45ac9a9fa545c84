"""The training data loader: the per-rank sampler and the loader built on it."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from vitacore.data.grouped_sampler import ModalityLengthGroupedSampler
from vitacore.data.sampler import ResumableSampler


def train_sampler(train_dataset: Dataset, args, dist):
    """The shuffled per-rank order; VITA's modality/length grouping with ``--group_by_modality_length``."""
    if not args.group_by_modality_length:
        return ResumableSampler(train_dataset, dist.world_size, dist.rank, seed=args.seed)
    lengths = getattr(train_dataset, "modality_lengths", None)
    if lengths is None:
        raise ValueError("--group_by_modality_length True needs a training dataset with `modality_lengths` "
                         f"(signed token lengths); {type(train_dataset).__name__} has none")
    if len(lengths) != len(train_dataset):
        raise ValueError(f"--group_by_modality_length True: the dataset has {len(train_dataset)} samples "
                         f"but {len(lengths)} modality_lengths")
    return ModalityLengthGroupedSampler(lengths, args.per_device_train_batch_size, dist.world_size,
                                        dist.rank, seed=args.seed,
                                        accumulation=args.gradient_accumulation_steps)


def worker_options(args) -> dict:
    """DataLoader worker arguments: workers, and with workers, persistence and prefetch depth.

    Persistent workers keep resume exact: the sampler (set per epoch, skipped on resume) runs in the
    main process and the workers only map indices to samples, which does not draw random numbers.
    Torch seeds workers once, from ``loader_generator`` when they start, so with persistence a
    dataset that did draw in its workers would see one stream across epochs, not a stream per epoch.
    """
    options = {"num_workers": args.dataloader_num_workers}
    if args.dataloader_num_workers > 0:
        options["persistent_workers"] = args.dataloader_persistent_workers
        if args.dataloader_prefetch_factor is not None:
            options["prefetch_factor"] = args.dataloader_prefetch_factor
    return options


def build_train_loader(train_dataset: Dataset, collate_fn: Callable, args, dist):
    """``(sampler, loader, generator)`` for the training set.

    The loader's own generator (re-seeded each epoch by the loop) seeds its workers, so creating an
    iterator never draws from the global RNG that dropout uses: a resumed run stays on the same stream.
    """
    sampler = train_sampler(train_dataset, args, dist)
    generator = torch.Generator()
    loader = DataLoader(train_dataset, batch_size=args.per_device_train_batch_size, sampler=sampler,
                        collate_fn=collate_fn, generator=generator, **worker_options(args))
    return sampler, loader, generator
