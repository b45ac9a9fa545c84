"""The training data loader: the per-rank sampler, the loader built on it, and its accumulation groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from vitacore.constants import IGNORE_INDEX
from vitacore.data.grouped_sampler import ModalityLengthGroupedSampler
from vitacore.data.sampler import ResumableSampler
from vitacore.engine.config import LoopConfig
from vitacore.engine.signals import worker_signal_options


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on ``device`` (other entries, e.g. sample ids, as they are)."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def loss_divisor(batches: list[dict], dist, accumulation: int) -> Optional[torch.Tensor]:
    """Supervised tokens of an accumulation group over all ranks / (ranks x accumulation steps).

    DeepSpeed averages gradients over ranks and divides each micro-batch's by the accumulation
    steps; dividing a token *sum* by this makes the step's gradient the mean over every token of
    the global batch, so 1 process x 8 samples and 2 processes x 4 give the same update. None when a
    batch has no labels (every rank's batches have the same keys, so all skip the collective together).
    """
    if any("labels" not in b for b in batches):
        return None
    count = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    total = torch.tensor([float(count)], device=dist.device)
    if dist.world_size > 1:
        torch.distributed.all_reduce(total)
    scale = dist.world_size * accumulation
    return (total / scale).clamp(min=1.0 / scale).squeeze(0)


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
    """DataLoader worker arguments: workers, and with workers, persistence, prefetch depth, and workers
    that ignore SIGTERM / SIGINT / SIGUSR1 (the main process handles them).

    Persistent workers keep resume exact: the sampler (set per epoch, skipped on resume) runs in the
    main process and the workers only map indices to samples, which does not draw random numbers.
    Torch seeds workers once, from ``loader_generator`` when they start, so with persistence a
    dataset that did draw in its workers would see one stream across epochs, not a stream per epoch.
    """
    options = {"num_workers": args.dataloader_num_workers}
    if args.dataloader_num_workers > 0:
        options.update(worker_signal_options())  # torch seeds the worker before its worker_init_fn
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


def _as_raised_in_worker(error: Exception) -> Exception:
    """A DataLoader worker's error with the worker's own message.

    Torch re-raises a worker's exception in the main process with the worker's whole traceback as
    its message; the user needs the last line (the file, record and field), not the traceback.
    """
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return error
    last = text.rstrip().splitlines()[-1]
    message = last.split(": ", 1)[1] if ": " in last else last
    try:
        clean = type(error)(message)
    except Exception:  # noqa: BLE001 - a type that does not take one message: keep the original
        return error
    clean.__cause__ = error
    return clean


@dataclass
class AccumulationGroup:
    """The micro-batches of one optimizer step.

    Attributes:
        epoch: the epoch they belong to.
        first_micro: the first one's index in the epoch.
        batches: the collated micro-batches, in order.
        closes_epoch: the group ends its epoch.
        failure: the error that stopped reading the group (a bad record under ``--on_bad_sample
            error``, a worker that died); ``batches`` then holds the micro-batches read before it.
            The trainer agrees on it with the other ranks before the group's first forward.
    """

    epoch: int
    first_micro: int
    batches: list
    closes_epoch: bool
    failure: Optional[BaseException] = None

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

    An error while reading is not raised here: it ends the run's groups with one that carries it
    (:attr:`AccumulationGroup.failure`), so the trainer raises it on every rank at the same point
    (a bad record that one rank alone draws must not leave the others waiting in a collective).
    """
    accumulation = loop.gradient_accumulation_steps
    epoch, first = start_epoch, start_micro
    while True:
        sampler.set_epoch(epoch)
        sampler.skip(first * loop.per_device_train_batch_size)
        generator.manual_seed(loop.seed + epoch)
        group, start = [], first
        try:
            batches = iter(loader)
        except Exception as err:  # noqa: BLE001 - handed to the trainer, which raises it on every rank
            yield AccumulationGroup(epoch, start, group, False, failure=err)
            return
        for index in range(first, num_micro_per_epoch):
            try:
                group.append(next(batches))
            except Exception as err:  # noqa: BLE001 - as above
                yield AccumulationGroup(epoch, start, group, False, failure=_as_raised_in_worker(err))
                return
            if len(group) == accumulation or index + 1 == num_micro_per_epoch:
                yield AccumulationGroup(epoch, start, group, index + 1 == num_micro_per_epoch)
                start, group = index + 1, []
        epoch, first = epoch + 1, 0
