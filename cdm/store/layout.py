"""Where every artifact lives: the only code in cdm that builds paths under a store root.

Layout under ``root``::

    backbones/<backbone_id>/                      diffusers save_pretrained layout + card.json
    feature_nets/<key>/, checkpoints/<key>/, logs/   domain feature nets (shared by experiments)
    stats/<feature_space>/<key>/                  reference features (``StatsKey`` names them)
    tables/<name>/                                table1 / fig2 outputs
    audit/serve.jsonl                             one line per cdm-serve request
    experiments/<exp>/manifests/<name>.json       shard manifests (safe, private, shard-00, ...)
    experiments/<exp>/shards/shard-<kk>/          adapter (peft LoRA or diffusers full) + card.json
    experiments/<exp>/heads/shard-<kk>/           the compartmental router's head of shard kk + card.json
    experiments/<exp>/<job>/                      other adapters (paragon/) and routers (router/)
    experiments/<exp>/checkpoints/<job>/          Lightning slice-<ss>.ckpt and last.ckpt
    experiments/<exp>/logs/                       csv / wandb dirs
    experiments/<exp>/knn/<embedder>/shard-<kk>/  k-NN centroids
    experiments/<exp>/samples/<name>/, evals/<name>/   cdm-sample and cdm-evaluate outputs
    experiments/<exp>/sources.json, sources/<name>.npz|.json   cdm-add-source / forget.source
    experiments/<exp>/forget/                     forgotten.json, lock, pending/ (a forget request
                                                  in progress: journal.json, manifests/,
                                                  adapters/<job>/, heads/<shard>/, checkpoints/<job>/),
                                                  quarantine/<tag>/ (set aside by cdm-forget)
    experiments/<exp>/certificates/<tag>.json     one per forget request
    experiments/<exp>/verify/<tag>/               cdm-verify of a certificate: sources.json, report.json
    experiments/<exp>/attribution/<name>/         cdm-attribute: values.json, table.md, credit.png, card.json

Names are checked (``validate_name``) so no path escapes its directory. On-disk names are part of
the stores already written: change them only with a migration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cdm.core.names import ShardId
from cdm.store.errors import InvalidNameError

LAST_CKPT = "last.ckpt"
SAMPLES_FILE = "samples.npz"
GRID_FILE = "grid.png"
WEIGHTS_PLOT_FILE = "weights.png"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"

# Top-level folders of a store root, and the bookkeeping folders of an experiment (not jobs).
ROOT_DIRS = ("backbones", "experiments", "feature_nets", "stats", "tables", "audit")
EXPERIMENT_DIRS = ("manifests", "shards", "heads", "checkpoints", "logs", "knn", "samples", "evals",
                   "tables", "forget", "certificates", "sources", "verify", "attribution")  # fmt: skip
# Folders a forget request stages under forget/pending/, and the other files under forget/.
PENDING_DIRS = ("manifests", "adapters", "heads", "checkpoints")
RESERVED_JOBS = frozenset(EXPERIMENT_DIRS) - {"sources"}
FEATURE_NET_RESERVED = frozenset({"checkpoints", "logs"})

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*")
_MAX_NAME_LEN = 128
_SLICE_RE = re.compile(r"slice-(\d+)\.ckpt")


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a safe single path component, else raise ``InvalidNameError``.

    Allowed: letters, digits and ``_ . = + -``; must not start with ``.`` or ``-``, contain ``..``
    or be longer than 128 characters.
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"{what} must be a string, got {type(name).__name__}: {name!r}")
    if not name or len(name) > _MAX_NAME_LEN or ".." in name or _NAME_RE.fullmatch(name) is None:
        raise InvalidNameError(
            f"invalid {what} {name!r}: use 1-{_MAX_NAME_LEN} characters from [A-Za-z0-9_.=+-], "
            "not starting with '.' or '-', without path separators or '..'"
        )
    return name


def is_hidden(name: str) -> bool:
    """True for a writer's temp or set-aside entry (``.tmp-*``, ``.old-*``) or any dot-name."""
    return name.startswith(".")


def visible_dirs(path: Path) -> list[Path]:
    """The sub-directories of ``path`` that are not hidden, sorted (none if it does not exist)."""
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and not is_hidden(p.name))


def last_checkpoint(directory: Path) -> Path:
    """``<directory>/last.ckpt``: where Lightning keeps the newest checkpoint of a job."""
    return Path(directory) / LAST_CKPT


def slice_index(path: Path) -> int | None:
    """The slice of a ``slice-<ss>.ckpt`` file, None for any other file name."""
    match = _SLICE_RE.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class StatsKey:
    """Key of cached reference statistics: ``<dataset>-r<resolution>-<reference>-<ids hash[:16]>``.

    ``reference`` is the image set (``train``, ``test``, a manifest name); ``ids_hash`` is the
    sha256 of its sample ids (only its first 16 hex digits are in the name).
    """

    dataset: str
    resolution: int
    reference: str
    ids_hash: str

    @property
    def name(self) -> str:
        """The folder name under ``stats/<feature_space>/``."""
        return f"{self.dataset}-r{int(self.resolution)}-{self.reference}-{self.ids_hash[:16]}"

    @classmethod
    def parse(cls, name: str) -> StatsKey | None:
        """The key a folder name encodes (``ids_hash`` holds its 16 digits), or None."""
        match = re.fullmatch(
            r"(?P<dataset>.+)-r(?P<r>\d+)-(?P<reference>[A-Za-z0-9_-]+)-(?P<h>[0-9a-f]{16})", name
        )
        if match is None:
            return None
        return cls(match["dataset"], int(match["r"]), match["reference"], match["h"])


class StoreLayout:
    """Every path of a store rooted at ``root``; no method reads or writes anything."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()

    # ---- store-wide ----------------------------------------------------------------------

    def backbones_root(self) -> Path:
        """``<root>/backbones``."""
        return self.root / "backbones"

    def backbone_dir(self, backbone_id: str) -> Path:
        """``<root>/backbones/<backbone_id>``."""
        return self.backbones_root() / validate_name(backbone_id, "backbone id")

    def experiments_root(self) -> Path:
        """``<root>/experiments``."""
        return self.root / "experiments"

    def experiment_dir(self, experiment: str) -> Path:
        """``<root>/experiments/<experiment>``."""
        return self.experiments_root() / validate_name(experiment, "experiment name")

    def feature_nets_root(self) -> Path:
        """``<root>/feature_nets``."""
        return self.root / "feature_nets"

    def feature_net_dir(self, key: str) -> Path:
        """``<root>/feature_nets/<key>``."""
        validate_name(key, "feature net id")
        if key in FEATURE_NET_RESERVED:
            raise InvalidNameError(
                f"feature net id {key!r} is reserved ({sorted(FEATURE_NET_RESERVED)})"
            )
        return self.feature_nets_root() / key

    def feature_net_checkpoint_dir(self, key: str) -> Path:
        """``<root>/feature_nets/checkpoints/<key>`` (Lightning ``last.ckpt`` while training)."""
        return self.feature_nets_root() / "checkpoints" / self.feature_net_dir(key).name

    def feature_net_log_dir(self) -> Path:
        """``<root>/feature_nets/logs`` (not created here)."""
        return self.feature_nets_root() / "logs"

    def stats_root(self) -> Path:
        """``<root>/stats``."""
        return self.root / "stats"

    def stats_dir(self, feature_space: str, key: str | StatsKey) -> Path:
        """``<root>/stats/<feature_space>/<key>``."""
        name = key.name if isinstance(key, StatsKey) else key
        return (
            self.stats_root() / validate_name(feature_space, "feature space") / validate_name(name)
        )

    def tables_root(self) -> Path:
        """``<root>/tables``."""
        return self.root / "tables"

    def table_dir(self, name: str) -> Path:
        """``<root>/tables/<name>``."""
        return self.tables_root() / validate_name(name, "table name")

    def audit_log_path(self, service: str = "serve") -> Path:
        """``<root>/audit/<service>.jsonl``: one JSON line per request, granted or refused."""
        return self.root / "audit" / f"{validate_name(service, 'audit log name')}.jsonl"

    # ---- one experiment ------------------------------------------------------------------

    def manifests_dir(self, experiment: str) -> Path:
        """``<root>/experiments/<experiment>/manifests``."""
        return self.experiment_dir(experiment) / "manifests"

    def manifests_pattern(self) -> str:
        """``<root>/experiments/<experiment>/manifests/*.json``: where manifests are, for messages."""
        return str(self.experiments_root() / "<experiment>" / "manifests" / "*.json")

    def manifest_path(self, experiment: str, name: str) -> Path:
        """``<root>/experiments/<experiment>/manifests/<name>.json``."""
        return self.manifests_dir(experiment) / f"{validate_name(name, 'manifest name')}.json"

    def adapter_dir(self, experiment: str, job: str) -> Path:
        """``shards/shard-<kk>`` for ``job="shard-kk"``, else ``<job>/`` (e.g. ``paragon``)."""
        validate_name(job, "job name")
        if ShardId.is_shard(job):
            return self.experiment_dir(experiment) / "shards" / job
        if job in RESERVED_JOBS:
            raise InvalidNameError(f"job name {job!r} is reserved ({sorted(RESERVED_JOBS)})")
        return self.experiment_dir(experiment) / job

    def head_dir(self, experiment: str, shard: str) -> Path:
        """``<root>/experiments/<experiment>/heads/shard-<kk>``: shard kk's compartmental-router
        head. Not inside ``shards/shard-<kk>/``, which the adapter writer replaces as a whole."""
        return self.experiment_dir(experiment) / "heads" / ShardId.parse(shard).name

    def router_dir(self, experiment: str, name: str = "router") -> Path:
        """``<root>/experiments/<experiment>/<name>`` (a router: weights, config, card)."""
        validate_name(name, "router name")
        if ShardId.is_shard(name) or name in RESERVED_JOBS or name == "paragon":
            raise InvalidNameError(
                f"router name {name!r} is taken by another kind of artifact (shard-KK, paragon, "
                f"{sorted(RESERVED_JOBS)}); use e.g. 'router' or 'router-small'"
            )
        return self.experiment_dir(experiment) / name

    def checkpoint_dir(self, experiment: str, job: str) -> Path:
        """``<root>/experiments/<experiment>/checkpoints/<job>`` (Lightning ``dirpath``)."""
        return self.experiment_dir(experiment) / "checkpoints" / validate_name(job, "job name")

    def slice_checkpoint_path(self, experiment: str, job: str, slice_index: int) -> Path:
        """Checkpoint written after SISA slice ``slice_index``: ``.../slice-<ss>.ckpt``."""
        if isinstance(slice_index, bool) or not isinstance(slice_index, int) or slice_index < 0:
            raise InvalidNameError(f"slice index must be a non-negative int, got {slice_index!r}")
        return self.checkpoint_dir(experiment, job) / f"slice-{slice_index:02d}.ckpt"

    def last_checkpoint_path(self, experiment: str, job: str) -> Path:
        """``.../checkpoints/<job>/last.ckpt``."""
        return last_checkpoint(self.checkpoint_dir(experiment, job))

    def log_dir(self, experiment: str) -> Path:
        """``<root>/experiments/<experiment>/logs`` (not created here)."""
        return self.experiment_dir(experiment) / "logs"

    def knn_dir(self, experiment: str) -> Path:
        """``<root>/experiments/<experiment>/knn``: one folder per embedder."""
        return self.experiment_dir(experiment) / "knn"

    def centroids_dir(self, experiment: str, embedder: str, job: str) -> Path:
        """``<root>/experiments/<experiment>/knn/<embedder>/<job>``."""
        return (
            self.knn_dir(experiment) / validate_name(embedder, "embedder name") / validate_name(job)
        )

    def samples_root(self, experiment: str) -> Path:
        """``<root>/experiments/<experiment>/samples``."""
        return self.experiment_dir(experiment) / "samples"

    def samples_dir(self, experiment: str, name: str) -> Path:
        """``<root>/experiments/<experiment>/samples/<name>``."""
        return self.samples_root(experiment) / validate_name(name, "samples name")

    def evals_root(self, experiment: str) -> Path:
        """``<root>/experiments/<experiment>/evals``."""
        return self.experiment_dir(experiment) / "evals"

    def evals_dir(self, experiment: str, samples_name: str) -> Path:
        """``<root>/experiments/<experiment>/evals/<samples_name>``."""
        return self.evals_root(experiment) / validate_name(samples_name, "samples name")

    # ---- sources added (cdm-add-source) and removed (cdm-forget forget.source) ---------------

    def sources_path(self, experiment: str) -> Path:
        """``<root>/experiments/<experiment>/sources.json``: shards added to or removed from the
        split the config makes (``cdm.jobs.context.split_data`` applies it)."""
        return self.experiment_dir(experiment) / "sources.json"

    def source_data_path(self, experiment: str, source: str) -> Path:
        """``.../sources/<source>.npz``: the store's own copy of an added source's samples."""
        return (
            self.experiment_dir(experiment)
            / "sources"
            / f"{validate_name(source, 'source name')}.npz"
        )

    def source_record_path(self, experiment: str, source: str) -> Path:
        """``.../sources/<source>.json``: what cdm-add-source did for a source."""
        return self.source_data_path(experiment, source).with_suffix(".json")

    # ---- forgetting (cdm-forget; SISA, paper App. B) ---------------------------------------

    def forget_dir(self, experiment: str) -> Path:
        """``<root>/experiments/<experiment>/forget``: forgotten ids, pending request, quarantine."""
        return self.experiment_dir(experiment) / "forget"

    def forgotten_path(self, experiment: str) -> Path:
        """``.../forget/forgotten.json``: the ids forgotten so far and the requests that did it."""
        return self.forget_dir(experiment) / "forgotten.json"

    def forget_lock_path(self, experiment: str) -> Path:
        """``.../forget/lock``: held (with the holder's pid) while a forget request runs."""
        return self.forget_dir(experiment) / "lock"

    def forget_pending_dir(self, experiment: str) -> Path:
        """``.../forget/pending``: the staged retrain and journal of a forget request in progress."""
        return self.forget_dir(experiment) / "pending"

    def forget_journal_path(self, experiment: str) -> Path:
        """``.../forget/pending/journal.json``: the state of the forget request in progress."""
        return self.forget_pending_dir(experiment) / "journal.json"

    def pending_manifests_dir(self, experiment: str) -> Path:
        """``.../forget/pending/manifests``: the manifests a forget request will commit."""
        return self.forget_pending_dir(experiment) / "manifests"

    def pending_manifest_path(self, experiment: str, name: str) -> Path:
        """``.../forget/pending/manifests/<name>.json``."""
        return (
            self.pending_manifests_dir(experiment) / f"{validate_name(name, 'manifest name')}.json"
        )

    def pending_adapter_dir(self, experiment: str, job: str) -> Path:
        """``.../forget/pending/adapters/<job>``: a retrained adapter staged before its swap."""
        return self.forget_pending_dir(experiment) / "adapters" / validate_name(job, "job name")

    def pending_head_dir(self, experiment: str, shard: str) -> Path:
        """``.../forget/pending/heads/shard-<kk>``: a retrained head staged before its swap."""
        return self.forget_pending_dir(experiment) / "heads" / ShardId.parse(shard).name

    def pending_checkpoint_dir(self, experiment: str, job: str) -> Path:
        """``.../forget/pending/checkpoints/<job>``: the staged retrain's checkpoints."""
        return self.forget_pending_dir(experiment) / "checkpoints" / validate_name(job, "job name")

    def quarantine_root(self, experiment: str) -> Path:
        """``.../forget/quarantine``: derived artifacts set aside by forget requests."""
        return self.forget_dir(experiment) / "quarantine"

    def quarantine_dir(self, experiment: str, tag: str) -> Path:
        """``.../forget/quarantine/<tag>``: derived artifacts set aside by one forget request."""
        return self.quarantine_root(experiment) / validate_name(tag, "quarantine tag")

    def certificate_dir(self, experiment: str) -> Path:
        """``<root>/experiments/<experiment>/certificates``."""
        return self.experiment_dir(experiment) / "certificates"

    def certificate_path(self, experiment: str, tag: str) -> Path:
        """``.../certificates/<tag>.json``: the certificate of one forget request."""
        return self.certificate_dir(experiment) / f"{validate_name(tag, 'certificate name')}.json"

    def attribution_dir(self, experiment: str, name: str) -> Path:
        """``.../attribution/<name>/``: one ``cdm-attribute`` result (values, table, plot, card)."""
        folder = self.experiment_dir(experiment) / "attribution"
        return folder / validate_name(name, "attribution name")

    def attribution_records_path(self, experiment: str, fingerprint: str) -> Path:
        """``.../attribution/.records/<fingerprint>.jsonl``: the models ``cdm-attribute`` runs
        measured with these settings (one JSON line each); any later run with the same settings
        (another name, a sweep over the unlearning settings) reads them back instead of training
        them again."""
        folder = self.experiment_dir(experiment) / "attribution" / ".records"
        return folder / f"{validate_name(fingerprint[:32], 'records fingerprint')}.jsonl"

    def verify_dir(self, experiment: str, tag: str) -> Path:
        """``.../verify/<tag>/``: ``cdm-verify``'s sources file and report for certificate ``tag``."""
        return self.experiment_dir(experiment) / "verify" / validate_name(tag, "certificate name")
