"""Synthetic training data for bench/gpu_mfu.py: fixed-length samples, a VITA-like length mix, padded and packed rows.

Every sample is ``<bos-like token> <image>*n question... answer...`` with random token ids; only the
answer is supervised. Its :class:`SampleStats` are known before any sample is read, so the benchmark
can count the positions, supervised targets and FLOPs of exactly the micro-batches it timed from
their ``sample_ids`` alone (no read-back from the device inside the timed steps).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from vitacore.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

PAD_ID = 0  # the random LLM's padding id (masked everywhere, so any id works)
NUM_POOL_IMAGES = 8  # images come from a small pool made once: the loader stays cheap next to a step

# A VITA-like record mix in real token counts (VITA-1.5's kinds; audio left out: its encoder stays frozen
# and small here): (share, kind, images (low, high), question tokens (low, high), answer tokens (low, high)).
# Video frames are full images. The shares are this benchmark's assumption of "many short text / image
# samples, a few long video ones", not measured on VITA's data.
VITA_LIKE_MIX = (
    (0.50, "image", (1, 1), (10, 120), (5, 300)),  # one image, a question or a caption
    (0.40, "text", (0, 0), (20, 500), (20, 600)),  # text-only instructions
    (0.10, "video", (4, 8), (10, 120), (30, 300)),  # 4-8 frames
)


@dataclass(frozen=True)
class SampleStats:
    """What one sample costs and carries.

    Attributes:
        text_tokens: input ids that are not image placeholders.
        images: image placeholders (each becomes ``image_tokens`` LLM positions).
        positions: LLM positions once images are expanded.
        supervised: next-token targets (labels after the first position that are not ignored): the
            positions the chunked output head runs on, and the tokens a step learns from.
    """

    text_tokens: int
    images: int
    positions: int
    supervised: int


@dataclass
class Workload:
    """A run's data: the dataset, its collate function, and how to read a micro-batch's rows from its ids.

    Attributes:
        dataset: what the Trainer's loader reads (samples, or packs of samples).
        collate: its collate function.
        rows_of: a micro-batch's flattened ``sample_ids`` -> its rows, each a tuple of sample indices.
        stats: per sample index, its :class:`SampleStats`.
    """

    dataset: Dataset
    collate: Callable
    rows_of: Callable
    stats: list[SampleStats]


@dataclass(frozen=True)
class SampleSpec:
    """A sample's layout, drawn up front: ``1 + images + question`` unsupervised ids, then ``answer``."""

    images: int
    question: int
    answer: int

    def stats(self, image_tokens: int) -> SampleStats:
        text = 1 + self.question + self.answer
        return SampleStats(text, self.images, text + self.images * image_tokens, self.answer)


def draw_mix(count: int, seed: int, text_scale: float, image_tokens: int, max_positions: int) -> list[SampleSpec]:
    """``count`` seeded samples of :data:`VITA_LIKE_MIX`, text lengths times ``text_scale``.

    A sample longer than ``max_positions`` (media expanded) keeps fewer question tokens, then fewer
    answer tokens, so none is truncated by the model.
    """
    rng = random.Random(seed)
    shares = [share for share, *_ in VITA_LIKE_MIX]
    specs = []
    for _ in range(count):
        _, _, images, question, answer = rng.choices(VITA_LIKE_MIX, weights=shares)[0]
        num_images = rng.randint(*images)
        num_question = max(1, round(rng.randint(*question) * text_scale))
        num_answer = max(1, round(rng.randint(*answer) * text_scale))
        room = max_positions - 1 - num_images * image_tokens
        if room < 2:
            raise ValueError(f"--packing_max_length {max_positions} cannot hold {num_images} image(s) of "
                             f"{image_tokens} tokens and 2 text tokens: raise --packing_max_length")
        num_question = min(num_question, room - 1)
        specs.append(SampleSpec(num_images, num_question, min(num_answer, room - num_question)))
    return specs


class SyntheticSamples(Dataset):
    """Random samples laid out by ``specs``; item ``i`` is always the same tensors (seeded by ``i``)."""

    def __init__(self, specs: Sequence[SampleSpec], vocab: int, image_size: int, image_tokens: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.specs, self.vocab, self.seed = list(specs), vocab, seed
        self.stats = [spec.stats(image_tokens) for spec in self.specs]
        self.images = torch.rand(NUM_POOL_IMAGES, 3, image_size, image_size, generator=g) * 2 - 1

    @classmethod
    def fixed(cls, count: int, text_tokens: int, vocab: int, image_size: int, image_tokens: int, seed: int):
        """``count`` samples of one image and ``text_tokens`` text tokens, all but the first supervised."""
        return cls([SampleSpec(1, 0, text_tokens - 1)] * count, vocab, image_size, image_tokens, seed)

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int) -> dict:
        spec = self.specs[index]
        g = torch.Generator().manual_seed(self.seed + 1 + index)
        ids = torch.randint(0, self.vocab, (1 + spec.images + spec.question + spec.answer,), generator=g)
        ids[1:1 + spec.images] = IMAGE_TOKEN_INDEX
        labels = ids.clone()
        labels[:len(ids) - spec.answer] = IGNORE_INDEX
        picks = [(index + j) % NUM_POOL_IMAGES for j in range(spec.images)]
        return {"input_ids": ids, "labels": labels, "images": self.images[picks], "sample_id": f"s{index}"}


def sample_index(sample_id: str) -> int:
    """The dataset index a ``sample_id`` of :class:`SyntheticSamples` names."""
    return int(sample_id[1:])


def _rows_to_batch(rows: list[list[dict]], packed: bool) -> dict:
    """Rows of samples, right-padded to the longest row; ``segment_ids`` (1..k per row, 0 on padding) if packed."""
    longest = max(sum(len(s["input_ids"]) for s in row) for row in rows)
    input_ids = torch.full((len(rows), longest), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    segment_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for k, sample in enumerate(row, start=1):
            n = len(sample["input_ids"])
            input_ids[r, offset:offset + n] = sample["input_ids"]
            labels[r, offset:offset + n] = sample["labels"]
            segment_ids[r, offset:offset + n] = k
            offset += n
    flat = [s for row in rows for s in row]
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": (segment_ids > 0).long(),
             "images": torch.cat([s["images"] for s in flat]), "sample_ids": [s["sample_id"] for s in flat]}
    if packed:
        batch["segment_ids"] = segment_ids
    return batch


def collate_padded(samples: list[dict]) -> dict:
    """One sample per row, right-padded to the longest (what the plain Collator does)."""
    return _rows_to_batch([[s] for s in samples], packed=False)


def collate_packed(packs: list[list[dict]]) -> dict:
    """One pack per row, each sample its own segment (the packed-batch contract)."""
    return _rows_to_batch([list(p) for p in packs], packed=True)


def plan_packs(order: Sequence[int], positions: Sequence[int], max_length: int) -> list[tuple[int, ...]]:
    """Next-fit: consecutive samples of ``order`` join a pack while its positions stay within ``max_length``.

    The rule ``--packing True`` plans its packs by, so the fill (and the padding left) is the product's.
    """
    packs: list[tuple[int, ...]] = []
    current: list[int] = []
    used = 0
    for index in order:
        if current and used + positions[index] > max_length:
            packs.append(tuple(current))
            current, used = [], 0
        current.append(index)
        used += positions[index]
    if current:
        packs.append(tuple(current))
    return packs


class Rows(Dataset):
    """Rows of samples, laid out so that the Trainer's seeded shuffle reads them in list order.

    The Trainer's loader draws a seeded shuffle (``ResumableSampler``, epoch 0 first); item ``k`` here
    is the row at ``k``'s place in that shuffle, so a run reads ``rows[0]``, ``rows[1]``, ... in order,
    and the padded and packed runs of a :class:`MixPlan` time exactly the same samples. An item is a
    sample (padded: one per row) or a row's list of samples (packed).
    """

    def __init__(self, samples: SyntheticSamples, rows: Sequence[tuple[int, ...]], packed: bool, seed: int):
        from vitacore.data.sampler import ResumableSampler

        self.samples, self.rows, self.packed = samples, list(rows), packed
        self._row_of_item = [0] * len(self.rows)
        for place, item in enumerate(ResumableSampler(range(len(self.rows)), num_replicas=1, rank=0, seed=seed)):
            self._row_of_item[item] = place
        self._by_first = {row[0]: row for row in self.rows}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int):
        row = self.rows[self._row_of_item[item]]
        return [self.samples[i] for i in row] if self.packed else self.samples[row[0]]

    def rows_of(self, sample_ids: Sequence[str]) -> list[tuple[int, ...]]:
        """A micro-batch's rows (sample indices) from its flattened ``sample_ids``."""
        rows, at = [], 0
        while at < len(sample_ids):
            row = self._by_first[sample_index(sample_ids[at])]
            rows.append(row)
            at += len(row)
        return rows


@dataclass
class MixPlan:
    """The VITA-like mix for padded vs packed: warm-up samples, then a timed pool both sides train on once.

    Attributes:
        specs: every sample's layout, the warm-up ones first.
        image_tokens: LLM positions per image the lengths assume.
        padded_rows / packed_rows: each side's rows in reading order: its warm-up rows, then the timed
            pool's (one sample per padded row; next-fit packs of at most ``max_length`` positions).
        num_timed_packs: packed rows of the timed pool.
    """

    specs: list[SampleSpec]
    image_tokens: int
    padded_rows: list[tuple[int, ...]]
    packed_rows: list[tuple[int, ...]]
    num_timed_packs: int


def plan_mix(num_timed: int, warmup_padded_rows: int, warmup_packed_rows: int, text_scale: float,
             image_tokens: int, max_length: int, seed: int) -> MixPlan:
    """``num_timed`` samples of the mix for both sides, after enough warm-up samples for each side's warm-up rows."""
    def positions(specs):
        return [spec.stats(image_tokens).positions for spec in specs]

    count = max(1, warmup_padded_rows)
    while True:  # next-fit's last pack may be short: draw until the full packs are enough
        warm = draw_mix(count, seed + 1, text_scale, image_tokens, max_length)
        warm_packs = plan_packs(range(count), positions(warm), max_length)
        if len(warm_packs) > warmup_packed_rows:
            break
        count *= 2
    timed = draw_mix(num_timed, seed, text_scale, image_tokens, max_length)  # drawn i.i.d.: already shuffled
    offset = len(warm)
    timed_packs = [tuple(offset + i for i in pack) for pack in plan_packs(range(num_timed), positions(timed),
                                                                          max_length)]
    padded = [(i,) for i in range(warmup_padded_rows)] + [(offset + i,) for i in range(num_timed)]
    return MixPlan(warm + timed, image_tokens, padded, warm_packs[:warmup_packed_rows] + timed_packs,
                   len(timed_packs))


def padded_rows_of(sample_ids: Sequence[str]) -> list[tuple[int, ...]]:
    """A padded micro-batch's rows: one sample each."""
    return [(sample_index(i),) for i in sample_ids]


def fixed_workload(count: int, text_tokens: int, seed: int) -> Callable:
    """``make(model, shapes)`` -> fixed-length samples (one image + ``text_tokens``), one per padded row."""
    def make(model, shapes) -> Workload:
        samples = SyntheticSamples.fixed(count, text_tokens, shapes.vocab, model.vision_tower.image_spec.image_size,
                                         shapes.image_tokens, seed)
        return Workload(samples, collate_padded, padded_rows_of, samples.stats)
    return make


def mix_workload(plan: MixPlan, packed: bool, seed: int) -> Callable:
    """``make(model, shapes)`` -> the plan's samples, padded (one per row) or packed, read in the plan's order."""
    def make(model, shapes) -> Workload:
        if shapes.image_tokens != plan.image_tokens:
            raise ValueError(f"the vision tower gives {shapes.image_tokens} tokens per image, the length mix was "
                             f"planned with {plan.image_tokens}: a tower this script does not know how to size")
        samples = SyntheticSamples(plan.specs, shapes.vocab, model.vision_tower.image_spec.image_size,
                                   shapes.image_tokens, seed)
        rows = Rows(samples, plan.packed_rows if packed else plan.padded_rows, packed, seed)
        return Workload(rows, collate_packed if packed else collate_padded, rows.rows_of, samples.stats)
    return make
