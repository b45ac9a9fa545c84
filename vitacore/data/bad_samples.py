"""Bad samples: what counts as one, how it is replaced, and how the run accounts for it.

A bad sample is a record whose media file is missing or unreadable, whose conversation has no
answer to train on, or whose text before the first answer is already longer than
``--model_max_length``. With ``--on_bad_sample skip`` the dataset returns the next good record in
index order instead (so a resumed run sees exactly the same data) and marks it with
:class:`BadSample`. The dataset may run in DataLoader worker processes, whose counters the trainer
cannot see, so the marker travels with the sample into the batch (``batch["bad_samples"]``) and the
main process counts it (:class:`BadSampleLog`); the trainer's metrics window sums it over ranks into
the ``bad_samples`` field of ``metrics.jsonl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from vitacore.console import logger

ON_BAD_SAMPLE = ("error", "skip")


class BadSampleError(ValueError):
    """A record that cannot become a training sample.

    Args:
        message: where and what is wrong.
        key: what the one-time warning is about (the media file); None: the record itself.
    """

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class BadSample:
    """Marker on a sample that stands in for a bad one.

    Attributes:
        message: the bad record's origin and problem (``"a.json, record 3 (id 'x'): missing image ..."``).
        key: what the warning is logged once for: the media file, else the record's origin.
        index: the bad record's dataset index.
        replaced_by: the index of the record returned instead.
    """

    message: str
    key: str
    index: int
    replaced_by: int


class BadSampleLog:
    """The main process's bad-sample accounting: one warning per file, and the ratio check.

    Args:
        max_ratio: the largest tolerated share of bad samples among those seen (over all ranks).
        is_main: only the main rank prints warnings (other ranks still count).
        write: where warnings go.
        min_samples: the ratio is checked only once this many samples were seen (over all ranks):
            one bad sample among the first few is no evidence that the data is bad
            (``--min_samples_for_bad_ratio``).
    """

    def __init__(self, max_ratio: float, is_main: bool = True, write: Callable[[str], None] = logger.warning,
                 *, min_samples: int = 200):
        self.max_ratio = max_ratio
        self.min_samples = min_samples
        self.is_main = is_main
        self.write = write
        self.warned: set[str] = set()
        self.bad, self.seen = 0, 0

    def observe(self, batch: dict) -> int:
        """Remove the batch's markers (the model does not take them), warn once per new file; the count."""
        markers = batch.pop("bad_samples", None) or []
        for marker in markers:
            if self.is_main and marker.key not in self.warned:
                self.warned.add(marker.key)
                self.write(f"warning: skipped a bad sample, {marker.message}; used record {marker.replaced_by} "
                           "instead (--on_bad_sample skip; later samples of this file are counted, not logged)")
        return len(markers)

    def add(self, bad: int, seen: int) -> None:
        """Add a logged window's totals over all ranks.

        Raises:
            ValueError: more than ``max_ratio`` of the samples seen so far were bad, and at least
                ``min_samples`` were seen.
        """
        self.bad, self.seen = self.bad + int(bad), self.seen + int(seen)
        if self.seen >= self.min_samples and self.bad > self.max_ratio * self.seen:
            raise ValueError(
                f"{self.bad} of the {self.seen} training samples seen so far were bad "
                f"({self.bad / max(1, self.seen):.1%}), "
                f"more than --max_bad_sample_ratio {self.max_ratio}; the warnings above name the files. Fix the "
                "data, or raise --max_bad_sample_ratio")

    def state_dict(self) -> dict:
        return {"bad": self.bad, "seen": self.seen}

    def load_state_dict(self, state: Optional[dict]) -> None:
        state = state or {"bad": 0, "seen": 0}  # checkpoints from before this counter
        self.bad, self.seen = state["bad"], state["seen"]
