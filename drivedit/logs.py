"""One logging setup for every job and worker, and the Ray noise it keeps out of the user's way.

`setup_logging(rank)`: the `drivedit.*` loggers print "time name: message" lines to stdout, credentials
masked (`storage.redact`). On a Ray
Train worker only rank 0 prints progress (INFO); the other ranks print warnings and errors only, so
a line of a run appears once, not once per worker.

`quiet_ray_noise()`: drops, by exact text, Ray's own warnings that are not about the user's run
(e.g. Ray Train's placement-group cleaner failing to poll the state API on a busy machine: it
retries by itself). Every other warning and error, Ray's included, still shows.
"""
from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(name)s: %(message)s"
_HANDLER_FLAG = "_drivedit_handler"

# (logger name, text the message starts with) of Ray warnings that say nothing about the run
RAY_NOISE = (
    ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
     "Failed to query Ray Train Controller actor state"),
)


class _RedactingFormatter(logging.Formatter):
    """FORMAT, with any credential a message or traceback quotes (a URI's password, a token) masked."""

    def format(self, record: logging.LogRecord) -> str:
        from drivedit.storage import redact

        return redact(super().format(record))


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time of each record (a redirected or captured stdout too)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(rank: int | None = None, level: int = logging.INFO) -> logging.Logger:
    """Configure the `drivedit` logger of this process (idempotent); returns it.

    rank: the Ray Train world rank of a worker (None on a driver): ranks other than 0 log warnings only.
    """
    logger = logging.getLogger("drivedit")
    if not any(getattr(h, _HANDLER_FLAG, False) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(_RedactingFormatter(FORMAT))
        setattr(handler, _HANDLER_FLAG, True)
        logger.addHandler(handler)
        logger.propagate = False  # a root handler (basicConfig, pytest) would print each line twice
    logger.setLevel(level if not rank else max(level, logging.WARNING))
    quiet_ray_noise()
    return logger


class _DropText(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_ray_noise() -> None:
    """Filter RAY_NOISE in this process (idempotent). Also the `worker_process_setup_hook` of a local
    Ray started by `raylocal.connect_ray`, since Ray Train's controller runs in a worker process."""
    for name, prefix in RAY_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropText) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropText(prefix))
