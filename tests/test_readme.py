"""Every example in README.md is run (issue 11, "Done when").

The README is read when the tests are collected, so a command added to it is covered without
editing this file:

- every ``cdm-*`` line of a ```bash block composes its config (``--cfg job --resolve``, in
  process through the command's own ``main``: this validates every override and option);
- each distinct command then runs once, in README order, on one tiny store (``debug=tiny``, 8
  samples) in a temporary directory; the README's placeholders (``...``, ``/models/unet``,
  ``/data/x.npz``, ``/abs/path/my_conf``, ``mine.npz``, ...) are replaced by files made here;
- commands that cannot run here are only composed (``COMPOSE_ONLY`` says why for each);
- a ```python or ```yaml block whose first line names a file (``# my_conf/data/stripes.yaml``)
  is written to that file, every other ```python block is executed against the tiny store;
- ``make -n demo`` names only commands that exist, and they compose.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO

README = REPO / "README.md"
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]

# ------------------------------------------------------------------------------ the README


@dataclass(frozen=True)
class Command:
    """One documented command line (a ``for`` loop and ``a | b`` alternatives are expanded)."""

    lineno: int
    argv: tuple[str, ...]  # as written, placeholders included
    comment: str = ""

    @property
    def text(self) -> str:
        return shlex.join(self.argv)

    @property
    def expects_refusal(self) -> bool:
        """The README says this command is refused (e.g. ``cdm-serve ... # refused``)."""
        return "refused" in self.comment.lower()


@dataclass(frozen=True)
class FileBlock:
    """A README block that documents a file: its first line is ``# path`` (a comment)."""

    lineno: int
    path: str
    text: str


@dataclass
class Readme:
    commands: list[Command] = field(default_factory=list)
    heredocs: list[FileBlock] = field(default_factory=list)  # cat > f <<'X' ... X in bash blocks
    files: list[FileBlock] = field(default_factory=list)  # python/yaml blocks naming their file
    snippets: list[FileBlock] = field(default_factory=list)  # python blocks to execute


FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
FILE_HEADER = re.compile(r"#\s*([\w./-]+\.(?:py|yaml|yml|json))\b")


def split_comment(line: str) -> tuple[str, str]:
    """``code  # comment`` -> (code, comment); a ``#`` inside quotes or a word is code."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def bash_commands(block: str, start: int) -> tuple[list[Command], list[FileBlock]]:
    """The ``cdm-*`` commands and heredoc files of one bash block (``start``: its first line)."""
    lines = block.split("\n")
    commands: list[Command] = []
    heredocs: list[FileBlock] = []
    loop: tuple[str, list[str]] | None = None
    i = 0
    while i < len(lines):
        lineno, line = start + i, lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        i += 1
        code, comment = split_comment(line.strip())
        if heredoc := re.fullmatch(r"cat > (\S+) <<'?(\w+)'?", code):
            end = lines.index(heredoc.group(2), i)
            heredocs.append(FileBlock(lineno, heredoc.group(1), "\n".join(lines[i:end]) + "\n"))
            i = end + 1
            continue
        if match := re.fullmatch(r"for (\w+) in (.+); do", code):
            loop = (match.group(1), match.group(2).split())
            continue
        if code == "done":
            loop = None
            continue
        if not code.startswith("cdm-"):
            continue  # make targets, shell: out of scope (make -n demo is checked below)
        variants = [code] if loop is None else [code.replace(f"${loop[0]}", v) for v in loop[1]]
        for variant in variants:
            commands += [Command(lineno, argv, comment) for argv in alternatives(variant)]
    return commands, heredocs


def alternatives(code: str) -> list[tuple[str, ...]]:
    """``cdm-train ... a=1 | a=2 b=3`` documents two commands: ``cdm-train ... a=1``, ``... a=2 b=3``."""
    tokens = shlex.split(code)
    if "|" not in tokens:
        return [tuple(tokens)]
    groups: list[list[str]] = [[]]
    for token in tokens:
        if token == "|":
            groups.append([])
        else:
            groups[-1].append(token)
    first = groups[0]
    shared = first[: len(first) - first[::-1].index("...")] if "..." in first else first[:1]
    return [tuple(first)] + [tuple(shared + g) for g in groups[1:]]


def parse_readme(text: str) -> Readme:
    """Every command, documented file and python snippet of the README, in order."""
    readme = Readme()
    for fence in FENCE.finditer(text):
        lang, body = fence.group(1), fence.group(2)
        start = text.count("\n", 0, fence.start(2)) + 1
        first = body.split("\n", 1)[0]
        header = FILE_HEADER.match(first)
        if lang == "bash":
            commands, heredocs = bash_commands(body.rstrip("\n"), start)
            readme.commands += commands
            readme.heredocs += heredocs
        elif lang in ("python", "yaml") and header:
            readme.files.append(FileBlock(start, header.group(1), body))
        elif lang == "python":
            readme.snippets.append(FileBlock(start, "", body))
    return readme


README_DOC = parse_readme(README.read_text(encoding="utf-8"))


def test_the_readme_parser_finds_the_documented_examples():
    """The parser itself: it must find the README's kinds of examples (or this file tests nothing)."""
    names = {c.argv[0] for c in README_DOC.commands}
    assert {"cdm-train", "cdm-sample", "cdm-eval", "cdm-forget", "cdm-serve"} <= names
    assert names <= set(SCRIPTS), (
        f"README names commands that are not installed: {names - set(SCRIPTS)}"
    )
    loop = [
        c for c in README_DOC.commands if c.argv[0] == "cdm-sample" and "num_samples=200" in c.argv
    ]
    assert len({c.argv for c in loop}) >= 4, "the demo's `for c in ...` loop was not expanded"
    assert any(c.expects_refusal for c in README_DOC.commands)
    assert any(f.path.endswith(".yaml") for f in README_DOC.files)
    assert README_DOC.snippets, "no ```python block to execute"
    example = "cdm-train ... sharding=random | sharding=manifest sharding.manifest_path=o.json"
    assert alternatives(example) == [
        ("cdm-train", "...", "sharding=random"),
        ("cdm-train", "...", "sharding=manifest", "sharding.manifest_path=o.json"),
    ]
    assert split_comment("cdm-x a='#b' c  # note") == ("cdm-x a='#b' c", "note")


# ------------------------------------------------------------------------------ placeholders

EXPERIMENT = "digits_4split"  # the tiny store's experiment (the README's own examples use it)
STORE_SPLITS = 4


def base_overrides(command: Command) -> list[str]:
    """What the README's ``...`` stands for ("as above"): the demo's shard jobs, or an experiment."""
    if command.argv[0] != "cdm-train":
        return [f"experiment={EXPERIMENT}"]
    if "-m" in command.argv:  # a sweep as in "What the demo does": the launcher is what changes
        return [f"experiment={EXPERIMENT}", "stage=shard", "shard.index=0,1,2,3"]
    # one shard job under other settings (adapter=full, another sharding) in an experiment of its
    # own: reusing the store's shard-00 under other settings is refused by the job identity
    name = f"readme-line{command.lineno}-" + "-".join(
        re.sub(r"\W+", "", a.split("=", 1)[-1])[:12] for a in command.argv[2:]
    )
    return [f"experiment={EXPERIMENT}", f"experiment_name={name}", "stage=shard", "shard.index=0"]


@dataclass(frozen=True)
class Workspace:
    """The temporary directory the README's commands run in: cwd, store and placeholder files."""

    root: Path

    @property
    def store(self) -> Path:
        return self.root / "artifacts"

    def path_placeholders(self) -> dict[str, str]:
        return {
            "/abs/path/my_conf": str(self.root / "my_conf"),
            "/models/unet": str(self.root / "models" / "unet"),
            "/data/x.npz": str(self.root / "x.npz"),
        }


def substitute(command: Command, ws: Workspace) -> list[str]:
    """The command's arguments with the README's placeholders replaced (not the command name)."""
    args: list[str] = []
    for token in command.argv[1:]:
        if token == "...":
            args += base_overrides(command)
            continue
        if token == "experiment=...":
            token = "experiment=digits_2split"  # the pretrained-backbone example: an experiment of its own
        for placeholder, real in ws.path_placeholders().items():
            token = token.replace(placeholder, real)
        args.append(token)
    return args


def make_npz(path: Path, n: int = 40, seed: int = 0) -> None:
    """An 8x8 uint8 dataset in the digits' 10 classes (``images``, ``labels``, ``scores``)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=labels, scores=rng.random(n))


def make_pretrained_unet(path: Path) -> None:
    """A tiny class-conditional diffusers UNet saved with ``save_pretrained`` (for ``/models/unet``)."""
    import torch

    from cdm.models.backbone import build_unet

    unet_cfg = yaml.safe_load((REPO / "cdm" / "conf" / "backbone" / "tiny.yaml").read_text())[
        "unet"
    ]
    torch.manual_seed(0)
    build_unet("unet2d", unet_cfg, sample_size=8, channels=1, num_classes=10).save_pretrained(path)


def make_owners(path: Path, store: Path) -> None:
    """``sharding=manifest``'s file: one source per shard of the tiny store's experiment."""
    manifests = store / "experiments" / EXPERIMENT / "manifests"
    shards = sorted(manifests.glob("shard-*.json"))
    assert shards, f"owners.json is made from {manifests}: run the README's shard jobs first"
    owners = {f"owner{k}": json.loads(p.read_text())["ids"] for k, p in enumerate(shards)}
    path.write_text(json.dumps({"sources": owners}))


# files a command may name by a relative path, made in its working directory when first needed
RELATIVE_FILES: dict[str, Callable[[Path, Path], None]] = {
    "mine.npz": lambda p, store: make_npz(p, n=200),
    "batch5.npz": lambda p, store: make_npz(p, seed=5),
    "owners.json": make_owners,
    "ids.txt": lambda p, store: p.write_text("digits/000747\n"),
}


def prepare_files(args: list[str], ws: Workspace) -> None:
    """Make the placeholder files ``args`` name (once)."""
    text = " ".join(args)
    if "models/unet" in text and not (ws.root / "models" / "unet").is_dir():
        make_pretrained_unet(ws.root / "models" / "unet")
    if "x.npz" in text and not (ws.root / "x.npz").is_file():
        make_npz(ws.root / "x.npz", n=200)
    for name, make in RELATIVE_FILES.items():
        if re.search(rf"(^|[=/\s]){re.escape(name)}", text) and not (ws.root / name).exists():
            make(ws.root / name, ws.store)


# ------------------------------------------------------------------------------ running a command


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    seconds: float = 0.0

    def report(self, argv: list[str]) -> str:
        return f"{shlex.join(argv)} -> exit {self.code} after {self.seconds:.1f} s\n{self.out[-3000:]}\n{self.err[-5000:]}"


def run_main(name: str, args: list[str], cwd: Path) -> Outcome:
    """Run the installed command ``name`` (its ``main``, from pyproject) in this process."""
    module, func = SCRIPTS[name].split(":")
    main = getattr(importlib.import_module(module), func)
    out, err = io.StringIO(), io.StringIO()
    code, start = 0, time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setattr(sys, "argv", [name, *args])
        mp.delenv("HYDRA_FULL_ERROR", raising=False)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            if not isinstance(exc.code, int) and exc.code is not None:
                err.write(str(exc.code))
        except Exception as exc:  # a bug: keep it for the report
            code = -1
            err.write("".join(traceback.format_exception(exc)))
    return Outcome(code, out.getvalue(), err.getvalue(), time.perf_counter() - start)


def job_overrides(args: list[str]) -> list[list[str]]:
    """A multirun's jobs (Hydra's own sweep expansion); a single run is one job."""
    if "-m" not in args and "--multirun" not in args:
        return [args]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    rest = [a for a in args if a not in ("-m", "--multirun")]
    options = [a for a in rest if a.startswith("-")]
    overrides = [a for a in rest if not a.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    return [[*options, *job] for job in jobs]


def compose(name: str, args: list[str], cwd: Path) -> dict:
    """``name ARGS --cfg job --resolve`` (each job of a multirun): the resolved config."""
    cfg: dict = {}
    jobs = job_overrides(args)
    for job in jobs[:1] + jobs[1:][-1:]:  # a sweep: its first and last job
        outcome = run_main(name, [*job, "--cfg", "job", "--resolve"], cwd)
        assert outcome.code == 0, outcome.report([name, *job, "--cfg", "job", "--resolve"])
        cfg = yaml.safe_load(outcome.out)
        assert isinstance(cfg, dict) and cfg, outcome.report([name, *job])
    return cfg


# Commands that are only composed here, and why (a predicate on the arguments, the reason).
COMPOSE_ONLY: list[tuple[Callable[[list[str]], bool], str]] = [
    (
        lambda a: "hydra/launcher=slurm" in a,
        "needs a SLURM cluster (tests/test_slurm.py renders the sbatch script)",
    ),
    (lambda a: "trainer=gpu" in a, "needs GPUs"),
    (
        lambda a: "adapter=deep_prompt" in a and any(x.startswith("table1.") for x in a),
        "trains a whole table (11 min); tests/test_prompts*.py run its jobs at tiny size",
    ),
    (
        lambda a: any(x.startswith("attribution/method=datamodels") for x in a),
        "trains hundreds of models; tests/test_removal.py runs the experiment at tiny size",
    ),
    (lambda a: "trainer=ddp_cpu" in a, "spawns 2 processes; tests/test_ddp.py runs it"),
    (
        lambda a: "logger=wandb" in a,
        "W&B online needs an account; offline runs are covered by the logger tests",
    ),
    (
        lambda a: any("inception" in x for x in a if x.startswith("evaluate.feature_spaces")),
        "Inception-v3 on CPU is ~3-5 images/s: minutes for the reference set",
    ),
    (
        lambda a: any("fashion" in x for x in a if x.startswith("table1.datasets")),
        "trains every split on Fashion-MNIST (make table1-fashion)",
    ),
    (
        lambda a: any(x.startswith("verify.certificate=") and "TAG.json" in x for x in a),
        "names a certificate of the reader's store; tests/test_verify.py runs cdm-verify end to end",
    ),
    (
        lambda a: (
            any(x.startswith("serve.policy=") for x in a)
            and not any(x.startswith(("serve.once=true", "serve.add_user=")) for x in a)
        ),
        "starts the HTTP service until stopped; tests/test_service.py runs it with an HTTP client",
    ),
]


COMPOSED: dict[Command, dict] = {}  # what test_readme_command_composes saw (the runs reuse it)


def compose_only_reason(args: list[str]) -> str | None:
    return next((why for test, why in COMPOSE_ONLY if test(args)), None)


# Commands that change the store destructively run on a copy of it, so later README examples
# (serving shard 2, the pipeline over shards 0 and 2) still find what they document.
ON_A_COPY = {"cdm-forget", "cdm-add-source"}


# Local launchers run their jobs in worker processes that re-import the training stack (~10 s
# each): the smoke run uses Hydra's in-process launcher instead (tests/test_multirun.py runs both).
LOCAL_LAUNCHERS = ("hydra/launcher=joblib", "hydra/launcher=submitit_local")


def smoke_args(args: list[str], cfg: dict) -> list[str]:
    """``args`` made tiny: the store, ``debug=tiny``, 8 samples, the smallest Table 1 split, and
    the in-process launcher."""
    if any(a in LOCAL_LAUNCHERS for a in args):
        args = [a for a in args if a not in LOCAL_LAUNCHERS and not a.startswith("hydra.launcher.")]
    shrink = {"paths.artifacts": None}
    if "pretrain" in cfg:  # a config built on train.yaml has the debug group
        shrink["debug"] = "tiny"
    if cfg.get("data", {}).get("resolution", 8) > 8:  # a user's npz: 8x8 like the digits
        shrink["data.resolution"] = "8"
    if "num_samples" in cfg:
        shrink["num_samples"] = "8"
    if "add" in cfg and "num_samples" in cfg["add"]:
        shrink["add.num_samples"] = "8"
    if "table1" in cfg:  # one split: the store's own if the table has it (nothing to train)
        splits = cfg["table1"]["splits"]
        shrink["table1.splits"] = f"[{STORE_SPLITS if STORE_SPLITS in splits else min(splits)}]"
    kept = [a for a in args if a.split("=", 1)[0].lstrip("+~") not in shrink]
    return shrink_sweeps(kept) + [f"{k}={v}" for k, v in shrink.items() if v is not None]


def shrink_sweeps(args: list[str], max_jobs: int = 4) -> list[str]:
    """A sweep of more than ``max_jobs`` jobs runs its first two values of each swept key (the
    rest are the same job with another index)."""
    if len(job_overrides(args)) <= max_jobs:
        return args
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for arg in args:
        if arg.startswith("-"):
            out.append(arg)
            continue
        override = OverridesParser.create().parse_override(arg)
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())[:2]
            arg = f"{override.get_key_element()}={','.join(values)}"
        out.append(arg)
    return out


# ------------------------------------------------------------------------------ the tiny store


@dataclass
class Runs:
    ws: Workspace
    outcomes: dict[Command, tuple[list[str], Outcome]] = field(default_factory=dict)
    setup: dict[Command, tuple[list[str], Outcome]] = field(
        default_factory=dict
    )  # backbones for "..."


def distinct(commands: list[Command]) -> list[Command]:
    seen: set[tuple[str, ...]] = set()
    out = []
    for c in commands:
        if c.argv not in seen:
            seen.add(c.argv)
            out.append(c)
    return out


COMMANDS = distinct(README_DOC.commands)


def write_documented_files(ws: Workspace) -> None:
    """The README's own files: its heredocs (policy.yaml) and blocks that name a file."""
    for block in [*README_DOC.heredocs, *README_DOC.files]:
        path = ws.root / block.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(fill_python_placeholders(block.text))


def fill_python_placeholders(text: str) -> str:
    """``images = ...`` / ``labels = ...`` in the README's dataset class: stripes, 2 classes."""
    fills = {
        "images": "np.zeros((2 * n_per_class, resolution, resolution), np.uint8)\n"
        "for i in range(n_per_class):\n"
        "    images[i, i % resolution, :] = 255\n"
        "    images[n_per_class + i, :, i % resolution] = 255",
        "labels": "np.repeat([0, 1], n_per_class)",
    }
    for name, code in fills.items():
        pattern = re.compile(rf"^( *){name} = \.\.\..*$", re.MULTILINE)
        text = pattern.sub(
            lambda m, code=code, name=name: textwrap.indent(f"{name} = {code}", m.group(1)), text
        )
    return text


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory) -> Iterator[Runs]:
    """Run each distinct README command once, in README order, on one tiny store."""
    ws = Workspace(tmp_path_factory.mktemp("readme"))
    write_documented_files(ws)
    runs = Runs(ws)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CDM_ARTIFACTS", str(ws.store))
        mp.syspath_prepend(str(ws.root))  # the README's my_methods/, my_data/ packages
        for command in COMMANDS:
            args = substitute(command, ws)
            prepare_files(args, ws)
            if compose_only_reason(args):
                continue
            name = command.argv[0]
            cfg = COMPOSED.get(command) or compose(name, args, ws.root)
            argv = smoke_args(args, cfg)
            store = ws.store
            if name in ON_A_COPY:
                store = ws.root / f"store-copy-{len(runs.outcomes)}"
                shutil.copytree(ws.store, store)
            argv.append(f"paths.artifacts={store}")
            if "..." in command.argv and any(a.startswith("data=") for a in args):
                # "..." on another dataset: its backbone first, as in "What the demo does"
                setup = [a if not a.startswith("stage=") else "stage=backbone" for a in argv]
                runs.setup[command] = (setup, run_main(name, setup, ws.root))
            done = next((o for a, o in runs.outcomes.values() if a == argv), None)  # same command
            runs.outcomes[command] = (argv, done or run_main(name, argv, ws.root))
        yield runs


# ------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"L{c.lineno}:{c.text[:70]}")
def test_readme_command_composes(command: Command, tmp_path):
    """Every documented command composes (``--cfg job --resolve``: options, overrides, values)."""
    ws = Workspace(tmp_path)
    write_documented_files(ws)
    args = substitute(command, ws)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(tmp_path))
        cfg = compose(command.argv[0], [*args, f"paths.artifacts={ws.store}"], tmp_path)
    COMPOSED[command] = cfg
    assert cfg.get("paths", {}).get("artifacts") == str(ws.store)


RUNNABLE = [
    c for c in COMMANDS if compose_only_reason(substitute(c, Workspace(Path("/ws")))) is None
]


@pytest.mark.parametrize("command", RUNNABLE, ids=lambda c: f"L{c.lineno}:{c.text[:70]}")
def test_readme_command_runs(command: Command, readme_runs: Runs):
    """Each distinct documented command runs on the tiny store (or is refused where the README says so)."""
    if command in readme_runs.setup:
        argv, outcome = readme_runs.setup[command]
        assert outcome.code == 0, outcome.report([command.argv[0], *argv])
    argv, outcome = readme_runs.outcomes[command]
    report = outcome.report([command.argv[0], *argv])
    if command.expects_refusal:
        assert outcome.code not in (0, -1), f"the README says this is refused:\n{report}"
        assert "Traceback" not in outcome.err, report
    else:
        assert outcome.code == 0, report


@pytest.mark.parametrize("snippet", README_DOC.snippets, ids=lambda s: f"L{s.lineno}")
def test_readme_python_block_runs(snippet: FileBlock, readme_runs: Runs):
    """Each ```python example runs against the tiny store (cwd: the directory holding ``artifacts``)."""
    code = snippet.text
    # CDMPipeline.from_store composes the experiment's config: the tiny store has debug=tiny's backbone
    code = re.sub(
        r"(CDMPipeline\.from_store\(.*)\)$", r'\1, overrides=["debug=tiny"])', code, flags=re.M
    )
    # the README names the demo's backbone (small preset, its hash): use the tiny store's one
    backbones = sorted(
        p.name for p in (readme_runs.ws.store / "backbones").glob("digits-r8-tiny-*")
    )
    assert backbones, "the README's commands trained no digits backbone"
    code = re.sub(
        r"artifacts/backbones/digits-r8-[\w.-]+", f"artifacts/backbones/{backbones[0]}", code
    )
    namespace: dict = {"__name__": "readme"}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(readme_runs.ws.root)
        exec(compile(code, f"README.md:{snippet.lineno}", "exec"), namespace)
    if "out" in namespace and hasattr(namespace["out"], "weights"):
        # the pipeline example documents its outputs in a comment: `[B, steps, shards]`
        shape = re.search(r"out\.weights.*\[(\d+), (\d+), (\d+)\]", code)
        assert shape, "the README's pipeline example no longer states the weights' shape"
        assert tuple(namespace["out"].weights.shape) == tuple(int(x) for x in shape.groups())
        assert len(namespace["out"].images) == int(shape.group(1))


def test_readme_documented_files_import(readme_runs: Runs):
    """The README's own package files (my_methods/, my_data/) import as written (placeholders filled)."""
    modules = [f.path for f in README_DOC.files if f.path.endswith("__init__.py")]
    assert modules
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(readme_runs.ws.root))
        for path in modules:
            name = Path(path).parent.as_posix().replace("/", ".")
            sys.modules.pop(name, None)
            assert importlib.import_module(name).__file__ == str(readme_runs.ws.root / path)


def test_make_demo_runs_only_commands_that_exist(tmp_path):
    """``make -n demo`` (a dry run): every cdm command it would run is installed and composes."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    proc = subprocess.run(
        [make, "-n", "demo", f"ART={tmp_path / 'art'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [line for line in proc.stdout.splitlines() if re.search(r"/bin/cdm-", line)]
    assert lines, proc.stdout
    for line in lines:
        argv = shlex.split(line)
        binary = Path(argv[0])
        name = binary.name
        assert name in SCRIPTS, f"make demo runs {name}, which pyproject.toml does not install"
        assert (REPO / binary).is_file() or binary.is_file(), (
            f"make demo runs {binary}: not installed"
        )
        compose(name, argv[1:], tmp_path)
