"""One logging setup: drivedit lines once per run (rank 0), Ray's known noise dropped, real warnings kept."""
from __future__ import annotations

import logging

import pytest

from drivedit.logs import RAY_NOISE, setup_logging


@pytest.fixture
def drivedit_logger():
    logger = logging.getLogger("drivedit")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def test_rank_zero_prints_progress_other_ranks_only_warnings(drivedit_logger, capsys):
    setup_logging()
    setup_logging()  # idempotent: one handler, each line once
    log = logging.getLogger("drivedit.finetune")
    log.info("step 1")
    setup_logging(rank=1)
    log.info("step 1 again")
    log.warning("disk almost full")
    setup_logging(rank=0)
    log.info("step 2")
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[1] for line in out] == ["step 1", "disk almost full", "step 2"]
    assert all(" drivedit.finetune: " in line for line in out)


def test_ray_noise_is_dropped_by_its_text_only(drivedit_logger):
    setup_logging()
    name, text = RAY_NOISE[0]
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger(name)
    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning(text + ". State API may be temporarily unavailable. Continuing to monitor.")
        logger.warning("placement group could not be removed")
        logger.error(text.upper())
    finally:
        logger.removeHandler(handler)
    assert seen == ["placement group could not be removed", text.upper()]


def test_no_credential_in_a_log_line(drivedit_logger, capsys):
    setup_logging()
    log = logging.getLogger("drivedit.generate")
    log.info("tracking at %s, output %s", "http://alice:hunter2@mlflow:5000", "https://h/o?X-Amz-Signature=sig123")
    try:
        raise OSError("cannot read postgresql://u:pw456@db/x")
    except OSError:
        log.exception("failed")
    out = capsys.readouterr().out
    assert "http://alice:***@mlflow:5000" in out and "X-Amz-Signature=***" in out and "u:***@db" in out
    assert not any(s in out for s in ("hunter2", "sig123", "pw456")), out
