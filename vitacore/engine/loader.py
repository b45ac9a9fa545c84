"""The training data loader: the per-rank sampler, the loader built on it, and its accumulation groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from vitacore.data.grouped_sampler import ModalityLengthGroupedSampler
from vitacore.data.sampler import ResumableSampler
from vitacore.engine.config import LoopConfig


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on ``device`` (other entries, e.g. sample ids, as they are)."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train_sampler(train_dataset: Dataset, args: LoopConfig, dist):
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


def worker_options(args: LoopConfig) -> dict:
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


def build_train_loader(train_dataset: Dataset, collate_fn: Callable, args: LoopConfig, dist):
    """``(sampler, loader, generator)`` for the training set.

    The loader's own generator (re-seeded each epoch by the loop) seeds its workers, so creating an
    iterator never draws from the global RNG that dropout uses: a resumed run stays on the same stream.
    """
    sampler = train_sampler(train_dataset, args, dist)
    generator = torch.Generator()
    loader = DataLoader(train_dataset, batch_size=args.per_device_train_batch_size, sampler=sampler,
                        collate_fn=collate_fn, generator=generator, **worker_options(args))
    return sampler, loader, generator


@dataclass
class AccumulationGroup:
    """The micro-batches of one optimizer step.

    Attributes:
        epoch: the epoch they belong to.
        first_micro: the first one's index in the epoch.
        batches: the collated micro-batches, in order.
        closes_epoch: the group ends its epoch.
    """

    epoch: int
    first_micro: int
    batches: list
    closes_epoch: bool

    @property
    def next_micro(self) -> int:
        """The index in the epoch of the micro-batch after this group."""
        return self.first_micro + len(self.batches)


def accumulation_groups(loader: DataLoader, sampler, generator: torch.Generator, loop: LoopConfig,
                        num_micro_per_epoch: int, start_epoch: int = 0, start_micro: int = 0
                        ) -> Iterator[AccumulationGroup]:
    """Yield the run's accumulation groups, epoch after epoch, without end (the trainer stops).

    Micro-batches are read one group ahead. An epoch whose micro-batch count is not a multiple of
    ``gradient_accumulation_steps`` ends with a short group, which still makes an optimizer step
    (as the HF Trainer does). A resumed run starts at ``start_micro`` of ``start_epoch`` (a group
    boundary) by skipping indices: no sample before it is read.
    """
    accumulation = loop.gradient_accumulation_steps
    epoch, first = start_epoch, start_micro
    while True:
        sampler.set_epoch(epoch)
        sampler.skip(first * loop.per_device_train_batch_size)
        generator.manual_seed(loop.seed + epoch)
        group, start = [], first
        batches = iter(loader)
        for index in range(first, num_micro_per_epoch):
            group.append(next(batches))
            if len(group) == accumulation or index + 1 == num_micro_per_epoch:
                yield AccumulationGroup(epoch, start, group, index + 1 == num_micro_per_epoch)
                start, group = index + 1, []
        epoch, first = epoch + 1, 0
