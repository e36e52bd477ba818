"""The SLURM launcher asks for one task per trainer device on each node (Lightning's SLURM check:
ntasks-per-node == devices), rendered as the sbatch script submitit would submit, no cluster."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cdm.jobs.config import config_dir, register_resolvers

register_resolvers()


def sbatch_script(tmp_path, monkeypatch, *overrides: str) -> str:
    """The sbatch text of the ``hydra/launcher=slurm`` launcher for ``cdm-train`` with ``overrides``,
    built the way hydra-submitit-launcher's ``launch`` builds its executor (``srun`` is faked)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: 1))

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}", *overrides],
            return_hydra_config=True,
        )
    launcher = instantiate(cfg.hydra.launcher)
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params.pop("max_num_timeout", None)
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("cdm-train", "0")


def directive(script: str, name: str) -> str | None:
    match = re.search(rf"^#SBATCH --{name}=(\S+)$", script, re.MULTILINE)
    return None if match is None else match.group(1)


@pytest.mark.parametrize(
    ("overrides", "nodes", "tasks", "gpus"),
    [
        (["trainer=gpu", "trainer.devices=4"], "1", "4", "4"),
        (["trainer=gpu", "trainer.devices=2", "trainer.num_nodes=3"], "3", "2", "2"),
        (["trainer=gpu"], "1", "1", "1"),
        (["trainer=ddp_cpu"], "1", "2", "0"),
    ],
)
def test_sbatch_follows_the_trainer(tmp_path, monkeypatch, overrides, nodes, tasks, gpus):
    script = sbatch_script(tmp_path, monkeypatch, *overrides)
    assert directive(script, "nodes") == nodes
    assert directive(script, "ntasks-per-node") == tasks
    assert directive(script, "gpus-per-node") == gpus


def test_sbatch_refuses_a_device_list(tmp_path, monkeypatch):
    with pytest.raises(Exception, match="give a device count"):
        sbatch_script(tmp_path, monkeypatch, "trainer=gpu", "trainer.devices=[0,1]")
