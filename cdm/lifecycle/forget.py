"""cdm-forget's entry point: a request for sample ids or a whole source, after rolling forward
any interrupted one (journaled in the store)."""

from __future__ import annotations

import shutil

from omegaconf import DictConfig

from cdm.core.logging import get_logger
from cdm.lifecycle.downstream import finish
from cdm.lifecycle.forget_samples import forget, plan_forget, read_request
from cdm.lifecycle.forget_source import commit_source, forget_source, plan_forget_source
from cdm.lifecycle.journal import ForgetError, commit, experiment_lock
from cdm.store import ArtifactStore
from cdm.store.records import read_forget_journal, write_forget_journal

log = get_logger(__name__)

__all__ = ["ForgetError", "recover", "run_forget"]


def recover(cfg: DictConfig, store: ArtifactStore, experiment: str) -> dict | None:
    """Finish (roll forward) a committed request that was interrupted, or drop an uncommitted one."""
    pending = store.forget_pending_dir(experiment)
    journal = read_forget_journal(store, experiment)
    if journal is None or journal.get("state") == "training":
        if pending.exists():
            log.info("forget: dropping the unfinished retrain in %s; nothing had changed", pending)
            shutil.rmtree(pending)
        return None
    log.info("forget: finishing the interrupted request %s", journal["tag"])
    if journal["state"] == "committing":
        if journal.get("kind") == "source":
            commit_source(store, experiment, journal)
        else:
            commit(store, experiment, journal)
        journal["state"] = "committed"
        write_forget_journal(store, experiment, journal)
    return finish(cfg, store, experiment, journal)


# ------------------------------------------------------------------------------ entry point


def run_forget(cfg: DictConfig) -> dict:
    """Forget ``cfg.forget.ids`` / ``ids_file`` from ``cfg.experiment_name`` exactly; the certificate."""
    store = ArtifactStore(cfg.paths.artifacts)
    experiment = cfg.experiment_name
    f = cfg.forget
    with experiment_lock(store, experiment):
        recovered = recover(cfg, store, experiment)
        source = f.get("source")
        if recovered is not None and not f.ids and not f.ids_file and source is None:
            return recovered
        if source is not None:
            if f.ids or f.ids_file:
                raise ForgetError(
                    "give either forget.source (a whole source) or forget.ids/forget.ids_file "
                    "(samples), not both: run two requests"
                )
            return forget_source(cfg, store, plan_forget_source(store, experiment, source))
        ids = read_request(f.ids, f.ids_file)
        plan = plan_forget(store, experiment, ids)
        return forget(cfg, store, plan)
