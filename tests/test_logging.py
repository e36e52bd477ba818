"""cdm's loggers: rank zero only under DDP (the launcher's RANK), visible through logging."""

from __future__ import annotations

import logging

import pytest

from cdm.core.logging import console_logging, get_logger, process_rank


@pytest.fixture
def rank(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(key, raising=False)
    return lambda r: monkeypatch.setenv("RANK", str(r))


def test_messages_are_logged_on_rank_zero_only(rank, caplog):
    caplog.set_level(logging.INFO, logger="cdm")
    log = get_logger("cdm.test")
    assert process_rank() == 0
    log.info("from %s", "rank zero")
    rank(1)
    assert process_rank() == 1
    log.info("from %s", "rank one")
    log.warning("a warning on rank one")
    assert [r.getMessage() for r in caplog.records] == ["from rank zero"]
    assert caplog.records[0].name == "cdm.test"


def test_every_rank_logs_with_its_rank_when_asked(rank, caplog):
    caplog.set_level(logging.INFO, logger="cdm")
    rank(3)
    get_logger("cdm.test", rank_zero_only=False).info("step %d", 7)
    assert [r.getMessage() for r in caplog.records] == ["[rank 3] step 7"]


def test_console_logging_leaves_the_main_process_alone():
    root = logging.getLogger()
    handlers = list(root.handlers)
    console_logging()  # not a worker process: the entry point (Hydra) configures logging
    assert root.handlers == handlers
