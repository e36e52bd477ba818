"""Loggers that speak once under DDP: ``log = get_logger(__name__)``, then ``log.info(...)``.

Library code never configures handlers: ``@hydra.main`` commands get Hydra's ``job_logging``
(the console and the run's ``.log`` file). Worker processes that Hydra did not start (DDP's
spawned ranks, joblib's loky workers) call ``console_logging()`` so messages still reach the console.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

CONSOLE_FORMAT = "[%(asctime)s] %(message)s"  # as conf/hydra/default.yaml's console handler
CONSOLE_DATEFMT = "%H:%M:%S"
_RANK_ENV = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # as Lightning reads them

# Lightning's rank-zero info lines, printed for every trainer: "GPU available: ...", "TPU
# available: ...", the litlogger tip, "`Trainer.fit` stopped: ...". Its warnings still show.
LIBRARY_CHATTER = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
# (message regex, why it is not worth a line): third-party warnings cdm cannot act on
IGNORED_WARNINGS = (
    # Lightning's _pytree uses torch's deprecated LeafSpec; fixed upstream, nothing to do here
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # cdm logs the epoch's mean loss every epoch and the step loss every log_every_n_steps
    # global steps (TrackedModule), so a short epoch loses nothing
    (r"The number of training batches \(\d+\) is smaller than the logging interval", Warning),
)


def process_rank() -> int:
    """This process's global rank: torch.distributed's once initialised, else the launcher's."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for key in _RANK_ENV:
        value = os.environ.get(key)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


class RankedLogger(logging.LoggerAdapter):
    """A ``logging.Logger`` that logs on rank zero only, or on every rank with a rank prefix.

    The pattern of the lightning-hydra-template's ``RankedLogger``, without Lightning: the rank
    comes from ``torch.distributed`` or the launcher's environment (``process_rank``).
    """

    def __init__(
        self, name: str, rank_zero_only: bool = True, extra: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(logging.getLogger(name), extra or {})
        self.rank_zero_only = rank_zero_only

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        rank = process_rank()
        if self.rank_zero_only and rank != 0:
            return
        if not self.rank_zero_only:
            msg = f"[rank {rank}] {msg}"
        msg, kwargs = self.process(msg, kwargs)
        kwargs.setdefault("stacklevel", 3)  # the caller of log.info, not this adapter
        self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str, rank_zero_only: bool = True) -> RankedLogger:
    """The module logger ``name`` (pass ``__name__``), rank zero only by default."""
    return RankedLogger(name, rank_zero_only=rank_zero_only)


def quiet_libraries() -> None:
    """Silence the library chatter above (``LIBRARY_CHATTER``, ``IGNORED_WARNINGS``) in this
    process: called wherever a trainer is built, so DDP ranks and loky workers are quiet too."""
    for name in LIBRARY_CHATTER:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message, category in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def console_logging(level: int = logging.INFO) -> None:
    """In a worker process (DDP spawn, joblib's loky) whose root logger has no handler yet, send
    messages of ``level`` and above to stdout; elsewhere do nothing (the entry point decides)."""
    root = logging.getLogger()
    if multiprocessing.parent_process() is None or root.handlers:
        return
    logging.basicConfig(
        level=level, stream=sys.stdout, format=CONSOLE_FORMAT, datefmt=CONSOLE_DATEFMT
    )
