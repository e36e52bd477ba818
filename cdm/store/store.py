"""The artifact store: backbones, adapters, routers, heads, manifests and checkpoints, checked on load.

``ArtifactStore`` is a ``StoreLayout`` (every path comes from ``cdm.store.layout``) that writes
each artifact through the generic ``cdm.store.artifact.save_artifact`` (atomic directory,
safetensors weights, card with sha256) and refuses on load a missing, corrupt, stale
(``cdm.store.staleness``) or other-backbone artifact, naming the command that remakes it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cdm.core.hashing import hash_state_dict
from cdm.core.names import ShardId
from cdm.store import records
from cdm.store.artifact import (
    checked_card,
    cpu_tensors,
    load_config,
    load_tensors,
    save_artifact,
    verify_weights,
)
from cdm.store.cards import CARD_FILENAME, utc_now
from cdm.store.errors import (
    BackboneMismatchError,
    CorruptArtifactError,
    StaleArtifactError,
    StoreError,
)
from cdm.store.io import clean_temp, delete_path, install_dir, load_checkpoint, read_card
from cdm.store.layout import (
    StoreLayout,
    slice_index,
)
from cdm.store.listing import list_artifacts
from cdm.store.staleness import stale_reason

__all__ = ["ADAPTER_KINDS", "ArtifactStore", "train_hint"]

ADAPTER_KINDS = ("lora", "full", "deep_prompt")
ROUTER_WEIGHTS = "router.safetensors"
ROUTER_CONFIG = "router_config.json"
# Commands named in error messages; kept here so they can follow the CLI.
TRAIN_HINTS = {
    "backbone": "cdm-train stage=backbone ...  (backbone id '{backbone_id}')",
    "shard": "cdm-train stage=shard shard.index={index} experiment={experiment}",
    "job": "cdm-train stage={job} experiment={experiment}",
}


def train_hint(experiment: str, job: str) -> str:
    """The command that trains ``job`` (``shard-03``, ``paragon``, ...) of ``experiment``."""
    if ShardId.is_shard(job):
        index = ShardId.parse(job).index
        return TRAIN_HINTS["shard"].format(index=index, experiment=experiment)
    return TRAIN_HINTS["job"].format(job=job, experiment=experiment)


def _is_peft_model(model: Any) -> bool:
    """isinstance(model, peft.PeftModel), without importing peft (slow) when nothing has yet."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


# --------------------------------------------------------------------------------------------
# the store


class ArtifactStore(StoreLayout):
    """Checked writes and loads of every model artifact under one root (paths: ``StoreLayout``)."""

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

    # ---- manifests (JSON records: cdm.store.records) ---------------------------------------

    def save_manifest(
        self, experiment: str, manifest_json: Mapping[str, Any], name: str | None = None
    ) -> Path:
        """Write a manifest atomically; ``name`` defaults to ``manifest_json["name"]``."""
        return records.save_manifest(self, experiment, manifest_json, name)

    def load_manifest(self, experiment: str, name: str) -> dict[str, Any]:
        """Read a manifest; ``MissingArtifactError`` names the command that makes it."""
        return records.load_manifest(self, experiment, name)

    def list_manifests(self, experiment: str) -> list[str]:
        """Names of the manifests of ``experiment``, sorted."""
        return records.list_manifests(self, experiment)

    def delete_manifest(self, experiment: str, name: str) -> bool:
        """Delete a manifest (a forgotten source's shard); False if there was none."""
        return records.delete_manifest(self, experiment, name)

    def list_experiments(self) -> list[str]:
        """Names of the experiments under the root, sorted."""
        return records.list_experiments(self)

    # ---- backbones -----------------------------------------------------------------------

    def save_backbone(self, backbone_id: str, unet: Any, card: Mapping[str, Any]) -> dict[str, Any]:
        """Save a diffusers model (``save_pretrained``, safetensors) + card; returns the written card.

        The card gains ``kind="backbone"``, ``name`` (default ``backbone_id``), ``weights_file``,
        ``weights_sha256``, ``backbone_hash = hash_state_dict(unet.state_dict())`` and ``created``.
        """
        full = dict(card)
        full["kind"] = "backbone"
        full.setdefault("name", backbone_id)
        full.setdefault("created", utc_now())
        full["backbone_hash"] = hash_state_dict(unet.state_dict())
        return save_artifact(
            self.backbone_dir(backbone_id),
            full,
            lambda tmp: unet.save_pretrained(str(tmp), safe_serialization=True),
        )

    def load_backbone(
        self,
        backbone_id: str,
        cls: Any = None,
        *,
        verify_state_hash: bool = False,
        **from_pretrained_kwargs: Any,
    ) -> tuple[Any, dict[str, Any]]:
        """Load a saved backbone (default ``cls`` = ``diffusers.UNet2DModel``) -> ``(unet, card)``.

        The weights' sha256 is checked against the card first. With ``verify_state_hash`` the
        loaded state dict is also re-hashed and compared with ``card["backbone_hash"]`` (only
        meaningful when loaded in the dtype it was saved in).
        """
        directory = self.backbone_dir(backbone_id)
        remedy = (
            f"Train it with `{TRAIN_HINTS['backbone'].format(backbone_id=backbone_id)}` "
            "(with retrain=true if it exists but is corrupt) "
            f"or restore {directory} from a backup."
        )
        card = checked_card(directory, f"no backbone {backbone_id!r} at {directory}. {remedy}")
        verify_weights(directory, card, remedy)
        if cls is None:
            from diffusers import UNet2DModel

            cls = UNet2DModel
        from_pretrained_kwargs.setdefault("local_files_only", True)
        unet = cls.from_pretrained(str(directory), **from_pretrained_kwargs)
        if verify_state_hash:
            actual = hash_state_dict(unet.state_dict())
            if actual != card.get("backbone_hash"):
                raise CorruptArtifactError(
                    f"backbone {directory} is corrupt: state hash {actual} differs from "
                    f"{card.get('backbone_hash')} in its card. {remedy}"
                )
        return unet, card

    def has_backbone(self, backbone_id: str) -> bool:
        """True if a backbone card exists for ``backbone_id``."""
        return (self.backbone_dir(backbone_id) / CARD_FILENAME).is_file()

    # ---- adapters ------------------------------------------------------------------------

    def save_adapter(
        self,
        experiment: str,
        job: str,
        model: Any,
        card: Mapping[str, Any],
        kind: str = "lora",
        *,
        adapter_name: str | None = None,
        directory: str | Path | None = None,
    ) -> dict[str, Any]:
        """Save a shard/paragon adapter + card atomically; returns the written card.

        ``kind="lora"``: ``model`` is a ``peft.PeftModel``; the adapter ``adapter_name`` (default:
        the active one) is written in the standard peft layout (``adapter_model.safetensors`` +
        ``adapter_config.json``) at the top of the dir. ``kind="full"``: a plain diffusers model,
        diffusers ``save_pretrained`` layout. ``kind="deep_prompt"``: a prompted model whose
        ``save_pretrained`` writes its prompts alone (``cdm.models.prompts.PromptedDiT``). ``card`` must carry ``backbone_hash``; it gains
        ``adapter_kind`` (= ``kind``), ``kind`` (unless the card has one, e.g. "shard"), ``job``,
        ``experiment``, ``name`` (default ``job``), ``weights_file``, ``weights_sha256`` and
        ``created``. An existing artifact is replaced atomically. ``directory`` writes it
        elsewhere than ``adapter_dir`` (cdm-forget stages a retrained adapter there first).
        """
        if kind not in ADAPTER_KINDS:
            raise StoreError(f"adapter kind must be one of {ADAPTER_KINDS}, got {kind!r}")
        if not card.get("backbone_hash"):
            raise StoreError(
                f"card for {experiment}/{job} has no backbone_hash: pass the backbone card's "
                "backbone_hash so the adapter can be checked against its backbone on load"
            )
        final = Path(directory) if directory is not None else self.adapter_dir(experiment, job)
        if kind == "lora":
            if not _is_peft_model(model):
                raise StoreError(f"kind='lora' needs a peft.PeftModel, got {type(model).__name__}")
            name = adapter_name or model.active_adapter
            if name not in model.peft_config:
                raise StoreError(f"adapter {name!r} not in model (has {list(model.peft_config)})")
        elif _is_peft_model(model):
            raise StoreError(f"kind={kind!r} needs a plain model, got a peft.PeftModel")

        def write(tmp: Path) -> None:
            if kind == "lora":
                model.save_pretrained(str(tmp), selected_adapters=[name], safe_serialization=True)
                if name != "default":  # peft writes non-default adapters into a subdir
                    for item in (tmp / name).iterdir():
                        os.replace(item, tmp / item.name)
                    (tmp / name).rmdir()
            else:
                model.save_pretrained(str(tmp), safe_serialization=True)

        full = dict(card)
        full.setdefault("kind", kind)  # the caller's kind (e.g. "shard") is kept
        full.update(adapter_kind=kind, job=job, experiment=experiment)
        full.setdefault("name", job)
        full.setdefault("created", utc_now())
        return save_artifact(final, full, write)

    def install_adapter(self, experiment: str, job: str, staged: str | Path) -> dict[str, Any]:
        """Move an adapter staged by ``save_adapter(directory=...)`` into its place, atomically,
        after checking its weights against its card; the previous one is deleted. Its card."""
        staged = Path(staged)
        card = read_card(staged)
        verify_weights(staged, card, f"The staged adapter {staged} is corrupt; train it again.")
        install_dir(staged, self.adapter_dir(experiment, job))
        return card

    def checked_adapter(
        self, experiment: str, job: str, *, backbone_hash: str
    ) -> tuple[Path, dict[str, Any]]:
        """``(directory, card)`` of an adapter whose weights match its card and ``backbone_hash``.

        Raises ``MissingArtifactError``, ``CorruptArtifactError``, ``StaleArtifactError`` or
        ``BackboneMismatchError`` with the command that (re)makes it. Loads nothing.
        """
        directory = self.adapter_dir(experiment, job)
        hint = train_hint(experiment, job)
        card = checked_card(
            directory,
            f"no adapter {job!r} for experiment {experiment!r} at {directory}. Make it with: {hint}",
        )
        stale = stale_reason(self, experiment, card)
        if stale:
            raise StaleArtifactError(
                f"adapter {experiment}/{job} is stale: it was trained on data the experiment no "
                f"longer holds ({stale}; see {self.certificate_dir(experiment)}). Retrain it with "
                f"`{hint} retrain=true`."
            )
        verify_weights(
            directory,
            card,
            f"Retrain it with `{hint} retrain=true` or restore {directory} from a backup.",
        )
        trained_on = card.get("backbone_hash")
        if trained_on != backbone_hash:
            raise BackboneMismatchError(
                f"adapter {experiment}/{job} was trained on another backbone: its card has "
                f"backbone_hash {trained_on}, but the backbone given has {backbone_hash}. "
                f"Load the backbone it was trained on, or retrain it with `{hint} retrain=true`."
            )
        return directory, card

    def load_adapter(
        self,
        experiment: str,
        job: str,
        base_unet: Any,
        *,
        backbone_hash: str,
        adapter_name: str | None = None,
        is_trainable: bool = False,
    ) -> tuple[Any, dict[str, Any]]:
        """Load a checked adapter -> ``(model, card)``.

        Refuses (``StoreError`` subclasses) if the artifact is missing, its weights are corrupt,
        or ``card["backbone_hash"] != backbone_hash``. LoRA: ``PeftModel.from_pretrained(base_unet,
        dir, adapter_name=adapter_name or "default")`` (``base_unet`` gets LoRA layers injected);
        if ``base_unet`` already is a PeftModel the adapter is added to it under ``adapter_name``
        (default: the job name) and it is returned. Full: ``type(base_unet).from_pretrained(dir)``
        (``UNet2DModel`` if ``base_unet`` is None). Deep prompts are read by
        ``cdm.models.prompts.read_prompts`` from ``checked_adapter``'s directory.
        """
        directory, card = self.checked_adapter(experiment, job, backbone_hash=backbone_hash)
        kind = self.adapter_kind(card)
        if kind == "deep_prompt":
            raise StoreError(
                f"adapter {experiment}/{job} holds deep prompts: read them with "
                "cdm.models.prompts.read_prompts(store.checked_adapter(...)[0])"
            )
        if kind == "lora":
            from peft import PeftModel

            if _is_peft_model(base_unet):
                name = adapter_name or job
                base_unet.load_adapter(str(directory), adapter_name=name, is_trainable=is_trainable)
                return base_unet, card
            model = PeftModel.from_pretrained(
                base_unet,
                str(directory),
                adapter_name=adapter_name or "default",
                is_trainable=is_trainable,
            )
            return model, card
        if (
            base_unet is None
            or _is_peft_model(base_unet)
            or not hasattr(type(base_unet), "from_pretrained")
        ):
            from diffusers import UNet2DModel

            cls: Any = UNet2DModel
        else:
            cls = type(base_unet)
        return cls.from_pretrained(str(directory), local_files_only=True), card

    def adapter_kind(self, card: Mapping[str, Any]) -> str:
        """The stored layout of a checked adapter card: ``lora`` (peft folder), ``full`` (a
        whole diffusers model) or ``deep_prompt`` (``prompts.safetensors``); any other value is
        refused as a corrupt card."""
        kind = card.get("adapter_kind", card.get("kind"))
        if kind not in ADAPTER_KINDS:
            experiment, job = card.get("experiment", "?"), card.get("job", "?")
            raise CorruptArtifactError(
                f"adapter {experiment}/{job} has unknown adapter_kind {kind!r} on its card "
                f"(expected one of {ADAPTER_KINDS}). Retrain it with "
                f"`{train_hint(str(experiment), str(job))} retrain=true`."
            )
        return kind

    def has_adapter(self, experiment: str, job: str) -> bool:
        """True if an adapter card exists for ``experiment``/``job``."""
        return (self.adapter_dir(experiment, job) / CARD_FILENAME).is_file()

    def read_adapter_card(self, experiment: str, job: str) -> dict[str, Any]:
        """The card of an adapter, without loading or checking its weights."""
        return read_card(self.adapter_dir(experiment, job))

    def delete_adapter(self, experiment: str, job: str) -> bool:
        """Delete an adapter's folder (weights and card); False if there was none."""
        return delete_path(self.adapter_dir(experiment, job))

    # ---- routers -------------------------------------------------------------------------

    def save_router(
        self,
        experiment: str,
        model_state: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
        card: Mapping[str, Any],
        *,
        name: str | None = None,
    ) -> dict[str, Any]:
        """Save a router atomically: ``router.safetensors`` + ``router_config.json`` + card.

        ``model_state`` holds the router's own weights only (never the backbone's); ``config``
        is what rebuilds its architecture. ``name`` defaults to ``card["name"]`` or "router".
        ``card`` must carry ``backbone_hash``; it gains ``kind`` (default "router"), ``name``,
        ``experiment``, ``created``, ``weights_file``, ``weights_sha256`` and
        ``router_config_sha256``. Returns the written card.
        """
        name = name or card.get("name") or "router"
        final = self.router_dir(experiment, name)
        if not card.get("backbone_hash"):
            raise StoreError(
                f"card for router {experiment}/{name} has no backbone_hash: a router is trained "
                "on the backbone's noise schedule (and maybe its features); pass its hash"
            )
        full = dict(card)
        full.setdefault("kind", "router")
        full.update(name=name, experiment=experiment)
        full.setdefault("created", utc_now())
        return save_artifact(
            final,
            full,
            tensors=cpu_tensors(model_state, f"router {experiment}/{name}"),
            weights_file=ROUTER_WEIGHTS,
            config=config,
            config_file=ROUTER_CONFIG,
            config_key="router_config_sha256",
        )

    def load_router(
        self, experiment: str, name: str = "router", *, backbone_hash: str | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """Load a checked router -> ``(state_dict, config, card)``.

        Refuses (``StoreError`` subclasses) a missing router, weights or config whose sha256
        differs from the card, and, when ``backbone_hash`` is given, a router trained on
        another backbone.
        """
        hint = f"cdm-train stage=router router.name={name} experiment={experiment}"
        return self._checked_network(
            self.router_dir(experiment, name), experiment, f"router {name!r}",
            f"router {experiment}/{name}", hint, backbone_hash,
        )  # fmt: skip

    def _checked_network(
        self, directory: Path, experiment: str, what: str, full_name: str, hint: str,
        backbone_hash: str | None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:  # fmt: skip
        """``(state_dict, config, card)`` of a router-like artifact (weights + config), checked:
        present, not stale, weights and config matching the card, trained on ``backbone_hash``."""
        card = checked_card(
            directory,
            f"no {what} for experiment {experiment!r} at {directory}. Make it with: {hint}",
        )
        stale = stale_reason(self, experiment, card)
        if stale:
            raise StaleArtifactError(
                f"{full_name} is stale: it was trained on shard data the experiment "
                f"no longer holds ({stale}; see {self.certificate_dir(experiment)}). Retrain it "
                f"with `{hint} retrain=true`."
            )
        remedy = f"Retrain it with `{hint} retrain=true` or restore {directory} from a backup."
        verify_weights(directory, card, remedy)
        config = load_config(
            directory, card, ROUTER_CONFIG, "router_config_sha256", "router", remedy
        )
        trained_on = card.get("backbone_hash")
        if backbone_hash is not None and trained_on != backbone_hash:
            raise BackboneMismatchError(
                f"{full_name} was trained on another backbone: its card has "
                f"backbone_hash {trained_on}, but the backbone given has {backbone_hash}. "
                f"Load the backbone it was trained on, or retrain it with `{hint} retrain=true`."
            )
        return load_tensors(directory, card), config, card

    def has_router(self, experiment: str, name: str = "router") -> bool:
        """True if a router card exists for ``experiment``/``name``."""
        return (self.router_dir(experiment, name) / CARD_FILENAME).is_file()

    # ---- compartmental-router heads (one per shard, stored beside it) -------------------

    def save_head(
        self,
        experiment: str,
        shard: str,
        model_state: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
        card: Mapping[str, Any],
        *,
        directory: str | Path | None = None,
    ) -> dict[str, Any]:
        """Save shard ``shard``'s head atomically (``router.safetensors`` + ``router_config.json``
        + card, as a router); ``directory`` stages it elsewhere (cdm-forget). Returns the card."""
        final = Path(directory) if directory is not None else self.head_dir(experiment, shard)
        if not card.get("backbone_hash"):
            raise StoreError(
                f"card for head {experiment}/{shard} has no backbone_hash: pass the backbone's"
            )
        full = dict(card)
        full.update(kind="head", name=shard, experiment=experiment)
        full.setdefault("created", utc_now())
        return save_artifact(
            final, full, tensors=cpu_tensors(model_state, f"head {experiment}/{shard}"),
            weights_file=ROUTER_WEIGHTS, config=config, config_file=ROUTER_CONFIG,
            config_key="router_config_sha256",
        )  # fmt: skip

    def load_head(
        self, experiment: str, shard: str, *, backbone_hash: str | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """Load shard ``shard``'s checked head -> ``(state_dict, config, card)``; refused like
        a router (missing, corrupt, stale: its shard's manifest changed, other backbone)."""
        index = ShardId.parse(shard).index
        hint = f"cdm-train stage=head shard.index={index} experiment={experiment}"
        return self._checked_network(
            self.head_dir(experiment, shard), experiment, f"head of {shard}",
            f"head {experiment}/{shard}", hint, backbone_hash,
        )  # fmt: skip

    def has_head(self, experiment: str, shard: str) -> bool:
        """True if shard ``shard`` has a head card."""
        return (self.head_dir(experiment, shard) / CARD_FILENAME).is_file()

    def read_head_card(self, experiment: str, shard: str) -> dict[str, Any]:
        """The card of a head, without loading or checking its weights."""
        return read_card(self.head_dir(experiment, shard))

    def install_head(self, experiment: str, shard: str, staged: str | Path) -> dict[str, Any]:
        """Move a head staged by ``save_head(directory=...)`` into place after checking it."""
        staged = Path(staged)
        card = read_card(staged)
        verify_weights(staged, card, f"The staged head {staged} is corrupt; train it again.")
        install_dir(staged, self.head_dir(experiment, shard))
        return card

    def delete_head(self, experiment: str, shard: str) -> bool:
        """Delete a head's folder (weights and card); False if there was none."""
        return delete_path(self.head_dir(experiment, shard))

    # ---- checkpoints ---------------------------------------------------------------------

    def list_slice_checkpoints(self, experiment: str, job: str) -> dict[int, Path]:
        """``{slice_index: path}`` of the ``slice-<ss>.ckpt`` files of a job."""
        directory = self.checkpoint_dir(experiment, job)
        if not directory.is_dir():
            return {}
        found = {}
        for path in directory.iterdir():
            index = slice_index(path)
            if index is not None and path.is_file():
                found[index] = path
        return dict(sorted(found.items()))

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """See ``cdm.store.io.load_checkpoint``."""
        return load_checkpoint(path)

    def clear_checkpoints(self, experiment: str, job: str) -> bool:
        """Delete the checkpoint dir of a job (before retraining it); True if there was one."""
        return delete_path(self.checkpoint_dir(experiment, job))

    # ---- listing -------------------------------------------------------------------------

    def list_artifacts(self, experiment: str | None = None) -> list[dict[str, Any]]:
        """Every artifact card under the root or of one experiment (``cdm.store.listing``)."""
        return list_artifacts(self, experiment)

    def clean_temp(self, max_age_s: float = 3600.0) -> list[Path]:
        """Remove hidden temp dirs/files older than ``max_age_s`` left by crashed writers (see
        ``cdm.store.io.clean_temp``). Returns the removed paths."""
        return clean_temp(self.root, max_age_s)
