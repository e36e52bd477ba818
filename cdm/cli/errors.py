"""One way every cdm command ends on a user error: one line on stderr naming the problem and the
fix, exit status 2, nothing left behind (in the manner of lightning-hydra-template's
``task_wrapper``). ``HYDRA_FULL_ERROR=1`` gives the traceback instead; real bugs always do.

Torch-free: a typo is reported before the training stack is imported.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException, MissingConfigException
from omegaconf import DictConfig

from cdm.jobs.config import config_dir

USER_ERROR_EXIT = 2
FULL_ERROR = "HYDRA_FULL_ERROR"

# errors cdm raises about what a user typed or stored (checked by name: importing their modules
# here would pull in torch; tests/test_cli_errors.py checks that each name resolves)
USER_ERROR_CLASSES = (
    "cdm.store.errors.StoreError",
    "cdm.provenance.graph.ProvenanceError",
    "cdm.lifecycle.add_source.AddSourceError",
    "cdm.lifecycle.serving.AccessDenied",
    "cdm.lifecycle.serving.PolicyError",
    "cdm.lifecycle.journal.ForgetError",
    "cdm.eval.inception.InceptionWeightsError",
    "cdm.cli.checks.ChoiceError",
)
# built-in errors that are user errors when cdm's own code raises them (a check of its input);
# raised inside a library (torch, numpy, ...) they are bugs and keep their traceback
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is about the user's input (one line, exit 2) rather than a bug (traceback)."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        return is_user_error(err.__cause__)
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(err).__mro__}
    if names & set(USER_ERROR_CLASSES):
        return True
    return isinstance(err, INPUT_ERRORS) and raised_by_cdm(err)


def raised_by_cdm(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is cdm's code (an explicit check)."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    cdm_root = str(Path(__file__).resolve().parents[1])
    return str(Path(frames[-1].filename).resolve()).startswith(cdm_root)


def one_line(command: str, err: BaseException) -> str:
    """``command: message`` on one line (an instantiation error shows its cause)."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return f"{command}: {' '.join(str(err).split())}"


def composition_line(command: str, err: CompactHydraException) -> str:
    """Hydra's composition error (unknown option, unknown key, bad override) as one line."""
    if isinstance(err, MissingConfigException) and err.options:
        group = Path(str(err.missing_cfg_file)).parent.as_posix()
        value = Path(str(err.missing_cfg_file)).name
        return (
            f"{command}: {group}={value} does not exist; choose one of: {', '.join(err.options)} "
            f"(add your own with --config-dir)"
        )
    text = str(err).split("Config search path:")[0]
    cause = err.__cause__
    if cause is not None and str(cause).split("\n")[0] not in text:
        text += " (" + str(cause).split("\n")[0] + ")"
    return f"{command}: {' '.join(text.split())} (see {command} --help)"


def remove_run_dir() -> None:
    """Remove this run's Hydra output folder if it holds only what Hydra itself wrote (never the
    working directory or a folder above it)."""
    if not HydraConfig.initialized():
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    cwd = Path.cwd().resolve()
    if run_dir == cwd or run_dir in cwd.parents or not run_dir.is_dir():
        return  # a query's run dir is the working directory (cdm-list, cdm-provenance)
    # only Hydra's config copy and an empty log: a folder reused by earlier runs keeps their logs
    if any(
        p.name != ".hydra" and (p.suffix != ".log" or p.stat().st_size > 0)
        for p in run_dir.iterdir()
    ):
        return
    for handler in list(logging.getLogger().handlers):  # Hydra's log file in it: let go of it
        if (
            isinstance(handler, logging.FileHandler)
            and run_dir in Path(handler.baseFilename).parents
        ):
            logging.getLogger().removeHandler(handler)
            handler.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    while parent != cwd and cwd in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def task_wrapper(command: str, env: dict[str, str | None]) -> Callable:
    """Wrap a Hydra task: a user error ends the run with one line and exit 2, leaving nothing."""

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
        @functools.wraps(task)
        def wrapped(cfg: DictConfig) -> Any:
            restore_env(env)  # composition is over: a bug in the task is reported as Hydra does
            try:
                return task(cfg)
            except Exception as err:
                if os.environ.get(FULL_ERROR) == "1" or not is_user_error(err):
                    raise
                remove_run_dir()
                print(one_line(command, err), file=sys.stderr)
                sys.exit(USER_ERROR_EXIT)

        return wrapped

    return decorate


def restore_env(saved: dict[str, str | None]) -> None:
    """Put back the environment variables ``saved`` holds (None: unset)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextmanager
def composition_errors(command: str) -> Iterator[dict[str, str | None]]:
    """Report Hydra's composition errors as one line and exit 2 (unless HYDRA_FULL_ERROR=1).

    Hydra prints them itself and exits 1; asking it for the raw exception (its own switch,
    ``HYDRA_FULL_ERROR``) only while it composes lets this line be written instead.
    """
    saved = {FULL_ERROR: os.environ.get(FULL_ERROR)}
    if saved[FULL_ERROR] == "1":
        yield saved
        return
    os.environ[FULL_ERROR] = "1"
    try:
        yield saved
    except CompactHydraException as err:
        print(composition_line(command, err), file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    finally:
        restore_env(saved)


def cdm_main(command: str, config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable]:
    """``@hydra.main`` over cdm's configs, with cdm's error handling (one line, exit 2).

    ``checks`` (cdm.cli.checks) validates every choice after composition, before heavy imports.
    """

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        env: dict[str, str | None] = {}

        def checked(cfg: DictConfig) -> Any:
            from cdm.cli.checks import check_choices

            check_choices(cfg)
            return task(cfg)

        hydra_main = hydra.main(
            version_base="1.3", config_path=config_dir(), config_name=config_name
        )(functools.wraps(task)(task_wrapper(command, env)(checked)))

        @functools.wraps(task)
        def main() -> Any:
            with composition_errors(command) as saved:
                env.update(saved)
                return hydra_main()

        return main

    return decorate
