"""What a training step asks of the host and of memory beyond the math (issue 16, goal 3).

- Under mixed precision, peft's cast of each LoRA layer's input to its fp32 factors (undone by
  autocast) is off while the fit runs: the adapter comes out bit for bit the same, with fewer
  copies per step; the switch is back on after the fit.
- A step keeps its batch's dataset indices where they are; they reach the host when fed_mask is
  read, so a step needs no device round trip (on a GPU, one per step stopped the host running
  ahead). Counted: no value read back to the host in any step but a logger's.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from cdm.models.adapters import trainable_parameters
from cdm.models.backbone import build_scheduler, build_unet
from cdm.training.jobs import ShardTraining
from cdm.training.tracked import TrackedModule
from tests.conftest import TINY_ATTN_UNET

ADAPTER = {
    "_target_": "cdm.models.adapters.lora_adapter",
    "kind": "lora",
    "rank": 4,
    "alpha": 4,
    "dropout": 0.0,
    "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
}
STEPS, BATCH = 3, 4


class PeftCasts(ShardTraining):
    """ShardTraining as it was: peft casts every LoRA input to fp32 under mixed precision too."""

    def on_fit_start(self) -> None:
        TrackedModule.on_fit_start(self)


class CountCopiesAndCasting(pl.Callback):
    """Counts dtype copies (aten._to_copy) in the first training step, forward and backward,
    and records peft's casting switch of every LoRA layer while the fit runs."""

    def __init__(self) -> None:
        self.copies, self.casting = 0, set()
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                outer.copies += func.overloadpacket is torch.ops.aten._to_copy
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        layers = [m for m in pl_module.model.modules() if isinstance(m, BaseTunerLayer)]
        self.casting |= {m.cast_input_dtype_enabled for m in layers}
        if batch_idx == 0:
            self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.mode.__exit__(None, None, None)


def shard_and_batches(cls: type[ShardTraining], steps: int) -> tuple[ShardTraining, DataLoader]:
    """A tiny attention UNet's LoRA shard (factors non-zero) and ``steps`` batches of BATCH."""
    torch.manual_seed(0)
    unet = build_unet("unet2d", TINY_ATTN_UNET, sample_size=8, channels=1, num_classes=10)
    alphas = build_scheduler({"num_train_timesteps": 100}).alphas_cumprod
    module = cls(unet, alphas, ADAPTER, dataset_size=BATCH, lr=1e-2, cond_drop_prob=0.2, seed=3)
    with torch.no_grad():  # LoRA B starts at zero: give the factors a value so both matter
        for name, p in trainable_parameters(module.model):
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    g = torch.Generator().manual_seed(1)
    data = [
        {"image": torch.rand(1, 8, 8, generator=g) * 2 - 1, "label": torch.tensor(i % 10),
         "index": torch.tensor(i)}
        for i in range(BATCH)
    ]  # fmt: skip
    return module, DataLoader(data * steps, batch_size=BATCH)


def fit(cls: type[ShardTraining], precision: str) -> tuple[ShardTraining, CountCopiesAndCasting]:
    module, batches = shard_and_batches(cls, STEPS)
    counter = CountCopiesAndCasting()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    pl.Trainer(
        accelerator="cpu", precision=precision, max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[counter],
    ).fit(module, batches)  # fmt: skip
    return module, counter


def test_mixed_precision_fit_skips_peft_input_casts_and_gets_the_same_adapter():
    ours, counted = fit(ShardTraining, "bf16-mixed")
    before, counted_before = fit(PeftCasts, "bf16-mixed")
    assert counted.casting == {False} and counted_before.casting == {True}
    # bf16 -> fp32 -> bf16 is exact: the same losses, gradients and adapter, bit for bit
    for (name, a), (_, b) in zip(
        trainable_parameters(ours.model), trainable_parameters(before.model), strict=True
    ):
        assert torch.equal(a, b), name
    # two copies per adapted layer in the forward, and their gradients' casts in the backward
    assert counted.copies < counted_before.copies - 20, (counted.copies, counted_before.copies)
    layers = [m for m in ours.model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)  # restored after the fit


def test_full_precision_fit_leaves_peft_casting_alone():
    _, counted = fit(ShardTraining, "32-true")
    assert counted.casting == {True}


def test_a_step_records_its_indices_without_reading_them():
    """track_step keeps the batch's indices where they are (here on the meta device, which has
    no data to read: a read would raise); fed_mask reads them when asked."""
    torch.manual_seed(0)
    unet = build_unet("unet2d", TINY_ATTN_UNET, sample_size=8, channels=1, num_classes=10)
    module = ShardTraining(unet, torch.linspace(0.99, 0.01, 10), ADAPTER, dataset_size=8, lr=1e-3)
    module.track_step({"index": torch.tensor([1, 2], device="meta")}, torch.tensor(0.5))
    module.fed_mask = torch.zeros(8, dtype=torch.bool)  # as a checkpoint loads it: pending dropped
    module.track_step({"index": torch.tensor([5, 7])}, torch.tensor(0.5))
    module.track_step({"index": torch.tensor([7, 0])}, torch.tensor(0.25))
    assert module.fed_mask.nonzero().flatten().tolist() == [0, 5, 7]
    assert module.fed_mask.nonzero().flatten().tolist() == [0, 5, 7]  # read once, kept


class FusedAdamShard(ShardTraining):
    """The optimizer cdm uses on a GPU (fused AdamW), here on the CPU: its step reads no number
    back to the host, so every read-back left in a step is cdm's or Lightning's."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for _, p in trainable_parameters(self.model)]
        return torch.optim.AdamW(params, lr=self.lr, fused=True)


def test_a_training_step_reads_no_value_back_from_the_device(tmp_path):
    """On a GPU, every ``.item()`` or copy to the host waits for all queued work: the host can no
    longer run ahead. With cdm's progress bar and a logger, a step reads back nothing, except a
    step that writes the logger (every ``log_every_n_steps``)."""
    from pytorch_lightning.loggers import CSVLogger

    from cdm.training.progress import JobProgressBar

    reads: list[int] = []
    step = [-1]

    class ReadBacks(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            to_host = (
                func.overloadpacket is torch.ops.aten._to_copy
                and str(kwargs.get("device")) == "cpu"
            )
            if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero):
                to_host = True
            if to_host:
                reads.append(step[0])
            return func(*args, **kwargs)

    class Steps(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            step[0] = trainer.global_step

    module, batches = shard_and_batches(FusedAdamShard, 12)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=12, log_every_n_steps=5, logger=CSVLogger(tmp_path),
        enable_checkpointing=False, enable_model_summary=False,
        callbacks=[Steps(), JobProgressBar("shard-00")],
    )  # fmt: skip
    with ReadBacks():
        trainer.fit(module, batches)
    in_steps = [s for s in reads if 0 <= s < 11]  # the last step also ends the fit
    assert set(in_steps) <= {4, 9}, sorted(in_steps)  # the logger's steps: (step + 1) % 5 == 0
