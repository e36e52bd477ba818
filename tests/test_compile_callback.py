"""``callbacks=compile`` (cdm.training.callbacks.CompileModel): the trained network goes through
torch.compile in place. With dynamo's eager backend (it traces, generates no code, so it runs on
the CPU in seconds) the stored adapter equals an uncompiled run's, bit for bit and key for key."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file

from cdm.store import ArtifactStore

TINY = ["experiment=digits_4split", "debug=tiny", "stage=shard"]


def test_compiled_shard_training_equals_eager_under_the_same_keys(
    tiny_digits_backbone, train, tmp_path, monkeypatch
):
    from torch._dynamo.utils import counters

    root = shutil.copytree(tiny_digits_backbone, tmp_path / "artifacts")
    train(*TINY, "experiment_name=eager", artifacts=root)
    compiled: list[tuple[str, dict]] = []
    original = torch.nn.Module.compile

    def recording(self, *args, **kwargs):
        compiled.append((type(self).__name__, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", recording)
    frames = counters["frames"]["ok"]
    train(*TINY, "experiment_name=compiled", "callbacks=compile", "callbacks.compile.backend=eager",
          artifacts=root)  # fmt: skip
    assert compiled == [("PeftModel", {"mode": "default", "backend": "eager"})]
    assert counters["frames"]["ok"] > frames  # dynamo traced the training forward
    store = ArtifactStore(root)
    eager, comp = (
        load_file(store.adapter_dir(e, "shard-00") / "adapter_model.safetensors")
        for e in ("eager", "compiled")
    )
    assert eager.keys() == comp.keys()
    assert all(torch.equal(eager[k], comp[k]) for k in eager)


def test_channels_last_training_stores_the_same_adapter_layout(
    tiny_digits_backbone, train, tmp_path
):
    """channels_last=true (with layout_opt=true, as on a GPU): NHWC weights while training; the
    stored adapter has the eager run's keys and shapes, and its values to float tolerance (other
    conv kernels, same math); inductor's layout option is back to its default after the job."""
    import torch._inductor.config as inductor_config

    root = shutil.copytree(tiny_digits_backbone, tmp_path / "artifacts")
    train(*TINY, "experiment_name=eager", artifacts=root)
    before = inductor_config.force_layout_optimization
    train(*TINY, "experiment_name=nhwc", "callbacks=compile", "callbacks.compile.backend=eager",
          "callbacks.compile.channels_last=true", "callbacks.compile.layout_opt=true",
          artifacts=root)  # fmt: skip
    assert inductor_config.force_layout_optimization == before
    store = ArtifactStore(root)
    eager, nhwc = (
        load_file(store.adapter_dir(e, "shard-00") / "adapter_model.safetensors")
        for e in ("eager", "nhwc")
    )
    assert eager.keys() == nhwc.keys()
    for k in eager:
        torch.testing.assert_close(nhwc[k], eager[k], rtol=1e-4, atol=1e-5)


def test_a_job_without_a_network_attribute_trains_uncompiled(caplog):
    import pytorch_lightning as pl

    from cdm.training.callbacks import CompileModel

    class NoModel(pl.LightningModule):
        pass

    with caplog.at_level("INFO"):
        CompileModel().setup(None, NoModel(), "fit")
    assert "NoModel has no .model; it trains uncompiled" in caplog.text


def test_layout_opt_is_forced_while_the_job_runs_and_restored_after():
    """``callbacks.compile.layout_opt=true``: inductor's layout optimisation is forced from setup
    (the graphs compile during the run) to teardown, and after a failed run too."""
    import pytorch_lightning as pl
    import torch._inductor.config as inductor_config

    from cdm.training.callbacks import CompileModel

    class Job(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Conv2d(3, 3, 3)

    before = inductor_config.force_layout_optimization
    callback = CompileModel(backend="eager", layout_opt=True)
    for end in (callback.teardown, callback.on_exception):
        callback.setup(None, Job(), "fit")
        assert inductor_config.force_layout_optimization is True
        end(None, None, None)
        assert inductor_config.force_layout_optimization == before
    CompileModel(backend="eager").setup(None, Job(), "fit")  # the default leaves it alone
    assert inductor_config.force_layout_optimization == before
