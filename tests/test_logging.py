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


def test_the_training_bar_names_the_job_and_an_open_epoch_count(monkeypatch):
    # with a stopping rule max_epochs is -1, which Lightning's own bar prints as "Epoch 210/-2"
    from types import SimpleNamespace

    import torch
    from pytorch_lightning.callbacks.progress.progress_bar import ProgressBar

    from cdm.training.progress import JobProgressBar

    bar = JobProgressBar("shard-01")
    trainer = SimpleNamespace(max_epochs=-1, global_step=1470)
    bar._trainer = trainer  # what Lightning sets in setup()
    assert bar._get_train_description(210) == "shard-01 · epoch 211 · step 1470"
    trainer.max_epochs = 40
    assert bar._get_train_description(3) == "shard-01 · epoch 4/40 · step 1470"
    # one number: the epoch loss, not v_num or the per-step loss
    logged = {"train/loss": torch.tensor(0.125), "train/loss_step": 0.1, "v_num": 7}
    monkeypatch.setattr(ProgressBar, "get_metrics", lambda self, t, m: dict(logged))
    assert bar.get_metrics(trainer, None) == {"train/loss": 0.125}
