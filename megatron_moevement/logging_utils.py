"""Rank-aware logging for library code.

Library modules call :func:`get_logger` and never ``print``. Every record carries the global
rank of the process (``-`` before ``torch.distributed`` is initialized), so interleaved logs
of several local processes stay readable.
"""

from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    """Adds ``record.rank`` from torch.distributed, or from ``RANK`` before it is initialized."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging API name
        rank = os.environ.get("RANK", "-")
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                rank = str(dist.get_rank())
        except Exception:  # pragma: no cover - torch missing or torn-down group
            pass
        record.rank = rank
        return True


def get_logger(name: str) -> logging.Logger:
    """Returns the package logger ``name`` with the rank filter attached."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, _RankFilter) for f in logger.filters):
        logger.addFilter(_RankFilter())
    return logger


def configure_logging(level: int | str = logging.INFO) -> None:
    """Configures a root handler with the rank-aware format (for CLIs, workers and demos)."""
    level = logging.getLevelName(level) if isinstance(level, str) else level
    root = logging.getLogger()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(_RankFilter())
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Megatron-Core logs its whole configuration and parameter lists at INFO; keep it quieter.
    logging.getLogger("megatron").setLevel(max(level, logging.WARNING))
