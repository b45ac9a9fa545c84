"""vitacore's log: one ``logging`` logger whose console output comes from rank 0 only.

Library code logs with ``logger.info(...)`` and never prints. An entry point (``train_stage.py``, a
user's script) calls :func:`enable_console` once to see those lines on stdout; without it, the
messages follow the user's own ``logging`` set-up, as any library's do.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

logger = logging.getLogger("vitacore")


def global_rank() -> int:
    """This process's rank in the job: the process group's when it exists, else the launcher's ``RANK``."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return global_rank() == 0


class _ProgressAwareHandler(logging.Handler):
    """Writes each message on its own line through ``tqdm.write``, so a live progress bar is not torn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


class _DropOptionalKernelNotice(logging.Filter):
    """bitsandbytes warns on import, on CPUs with AVX-512 BF16, that an optional downloadable 4-bit kernel
    is absent; its built-in CPU kernel is used instead, so the line tells a user nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def enable_console(level: int = logging.INFO) -> None:
    """Print vitacore's messages (text only, no prefix) to stdout on rank 0; idempotent.

    Args:
        level: the lowest level shown.
    """
    logger.setLevel(level)
    if not any(isinstance(h, _ProgressAwareHandler) for h in logger.handlers):
        handler = _ProgressAwareHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_RankZeroFilter())
        logger.addHandler(handler)
    logger.propagate = False  # the entry point owns the console: no second copy through the root logger
    notices = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropOptionalKernelNotice) for f in notices.filters):
        notices.addFilter(_DropOptionalKernelNotice())
