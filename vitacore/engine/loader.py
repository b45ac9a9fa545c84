"""The training data loader: the per-rank sampler, the loader built on it, and its accumulation groups."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from vitacore.constants import IGNORE_INDEX
from vitacore.data.grouped_sampler import ModalityLengthGroupedSampler
from vitacore.data.packed_batch import PackedCollator, PackedDataset
from vitacore.data.packing import PackSampler, grouped_order, pack_lengths, shuffled_order
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
    In a packed batch (``segment_ids``), a segment's first token is never a target: it would be
    predicted from the previous sample's last token.
    """
    if any("labels" not in b for b in batches):
        return None
    count = sum(supervised_targets(b) for b in batches)
    total = torch.tensor([float(count)], device=dist.device)
    if dist.world_size > 1:
        torch.distributed.all_reduce(total)
    scale = dist.world_size * accumulation
    return (total / scale).clamp(min=1.0 / scale).squeeze(0)


def supervised_targets(batch: dict) -> int:
    """Next-token targets of a batch: positions ``t >= 1`` whose label is not ignored and, in a packed
    batch, whose token is in the same segment as the token before it."""
    targets = batch["labels"][:, 1:] != IGNORE_INDEX
    segment_ids = batch.get("segment_ids")
    if segment_ids is not None:
        targets &= segment_ids[:, 1:] == segment_ids[:, :-1]
    return int(targets.sum())


def _modality_lengths(train_dataset: Dataset, flag: str):
    """The dataset's signed per-sample token lengths, which ``flag`` needs."""
    lengths = getattr(train_dataset, "modality_lengths", None)
    if lengths is None:
        raise ValueError(f"{flag} needs a training dataset with `modality_lengths` (signed token lengths, media "
                         f"expanded); {type(train_dataset).__name__} has none: use a VitaJsonDataset, give "
                         f"yours that property, or drop the flag")
    if len(lengths) != len(train_dataset):
        raise ValueError(f"{flag}: the dataset has {len(train_dataset)} samples but {len(lengths)} modality_lengths")
    return lengths


def pack_sampler(train_dataset: Dataset, args: LoopConfig, dist) -> PackSampler:
    """This rank's packs of each epoch's global order (the grouped order with ``--group_by_modality_length``).

    A record takes at most the dataset's ``model_max_length`` in its pack (the model truncates it there).
    """
    lengths = _modality_lengths(train_dataset, "--packing True")
    room = pack_lengths(lengths, getattr(train_dataset, "model_max_length", None))
    if args.group_by_modality_length:
        # A megabatch of about the samples one optimizer step packs over all ranks.
        per_pack = max(1, args.packing_max_length // max(1, round(sum(room) / len(room))))
        packs_per_step = dist.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps
        order = grouped_order(lengths, args.seed, packs_per_step * per_pack, args.gradient_accumulation_steps)
    else:
        order = shuffled_order(len(train_dataset), args.seed)
    return PackSampler(room, args.packing_max_length, dist.world_size, dist.rank, order)


def train_sampler(train_dataset: Dataset, args: LoopConfig, dist):
    """The shuffled per-rank order; VITA's modality/length grouping with ``--group_by_modality_length``;
    packs of samples with ``--packing``."""
    if args.packing:
        return pack_sampler(train_dataset, args, dist)
    if not args.group_by_modality_length:
        return ResumableSampler(train_dataset, dist.world_size, dist.rank, seed=args.seed)
    lengths = _modality_lengths(train_dataset, "--group_by_modality_length True")
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
    if args.packing:  # the loader's items are packs; each micro-batch is per_device_train_batch_size of them
        train_dataset, collate_fn = PackedDataset(train_dataset), PackedCollator(collate_fn)
    generator = torch.Generator()
    loader = DataLoader(train_dataset, batch_size=args.per_device_train_batch_size, sampler=sampler,
                        collate_fn=collate_fn, generator=generator, **worker_options(args))
    return sampler, loader, generator


def micro_batches_in_epoch(sampler, batch_size: int, epoch: int) -> int:
    """This rank's micro-batches in ``epoch`` (the same on every rank).

    A pack sampler's count can change from epoch to epoch (each epoch packs its own order); the
    other samplers have one count for every epoch.
    """
    per_epoch = getattr(sampler, "num_samples_in_epoch", None)
    return math.ceil((per_epoch(epoch) if per_epoch is not None else sampler.num_samples_per_epoch) / batch_size)


def run_length(sampler, loop: LoopConfig) -> tuple[Callable[[int], int], int]:
    """``(epoch -> this rank's micro-batches in that epoch, the run's optimizer steps)`` for ``sampler``."""
    micro_in_epoch = functools.partial(micro_batches_in_epoch, sampler, loop.per_device_train_batch_size)
    return micro_in_epoch, num_optimizer_steps(loop, micro_in_epoch)


def num_optimizer_steps(loop: LoopConfig, micro_in_epoch: Callable[[int], int]) -> int:
    """The run's optimizer steps: ``max_steps``, else the steps of ``num_train_epochs`` epochs.

    With one micro-batch count for every epoch this is the HF Trainer's ``ceil(epochs x steps per
    epoch)``; with per-epoch counts (packing), the whole epochs' steps plus the started fraction of the last.
    """
    if loop.max_steps > 0:
        return loop.max_steps
    epochs = loop.num_train_epochs
    updates = [max(1, math.ceil(micro_in_epoch(epoch) / loop.gradient_accumulation_steps))
               for epoch in range(math.ceil(epochs))]
    if len(set(updates)) == 1:
        return max(1, math.ceil(epochs * updates[0]))
    last = len(updates) - 1
    return max(1, sum(updates[:last]) + math.ceil((epochs - last) * updates[last]))


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
                        micro_in_epoch: Callable[[int], int], start_epoch: int = 0, start_micro: int = 0
                        ) -> Iterator[AccumulationGroup]:
    """Yield the run's accumulation groups, epoch after epoch, without end (the trainer stops).

    Micro-batches are read one group ahead. An epoch whose micro-batch count is not a multiple of
    ``gradient_accumulation_steps`` ends with a short group, which still makes an optimizer step
    (as the HF Trainer does); ``micro_in_epoch(epoch)`` is the epoch's micro-batch count
    (:func:`micro_batches_in_epoch`). A resumed run starts at ``start_micro`` of ``start_epoch`` (a group
    boundary) by skipping indices (packs, with packing): no sample before it is read.

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
        num_micro_per_epoch = micro_in_epoch(epoch)
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
