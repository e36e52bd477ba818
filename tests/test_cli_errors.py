"""Every command ends a user error with one line on stderr, exit 2 and nothing written (issue 11,
items 4-8): typos are reported before anything heavy is imported, and every config key a message
names exists."""

from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=digits_2split", "debug=tiny"]
COMMANDS = {  # module -> (command, config name)
    "train": ("cdm-train", "train"),
    "sample": ("cdm-sample", "sample"),
    "evaluate": ("cdm-eval", "eval"),
    "table1": ("cdm-table1", "table1"),
    "fig2": ("cdm-fig2", "fig2"),
    "table2": ("cdm-table2", "table2"),
    "forget": ("cdm-forget", "forget"),
    "add_source": ("cdm-add-source", "add_source"),
    "serve": ("cdm-serve", "serve"),
    "provenance": ("cdm-provenance", "provenance"),
    "list_artifacts": ("cdm-list", "list"),
    "verify": ("cdm-verify", "verify"),
    "attribute": ("cdm-attribute", "attribute"),
}
HEAVY = ("torch", "pytorch_lightning", "lightning", "diffusers")


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    """A tiny trained store: backbone, two shards, a router (no k-NN centroids)."""
    from tests.conftest import run_inprocess

    root = tmp_path_factory.mktemp("errors-store")
    for stage in ("stage=backbone", "stage=shard shard.index=0", "stage=shard shard.index=1",
                  "stage=router"):  # fmt: skip
        run_inprocess(*TINY, *stage.split(), artifacts=root)
    return root


def snapshot(*dirs: Path) -> dict[str, int]:
    """Every file and folder under ``dirs`` with its size (None for folders)."""
    return {
        str(p): (p.stat().st_size if p.is_file() else -1)
        for d in dirs
        for p in sorted(d.rglob("*"))
    }


def run(module: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m cdm.cli.<module> args`` in a fresh process, from ``cwd``."""
    base = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env = {**base, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", f"cdm.cli.{module}", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, command: str, *words: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"{command}: "), proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]


# ---- item 8: typos and --help without the heavy stack ---------------------------------------

CHECK_IN_FRESH_PROCESS = """
import sys
module, args = sys.argv[1], sys.argv[2:]
main = __import__("cdm.cli." + module, fromlist=["main"]).main
sys.argv = [module, *args]
try:
    main()
except SystemExit as exc:
    code = exc.code
heavy = [m for m in HEAVY if m in sys.modules]
print("HEAVY", heavy, "CODE", code)
"""


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_a_bad_override_and_help_never_import_the_heavy_stack(module, tmp_path):
    script = f"HEAVY = {HEAVY!r}\n{CHECK_IN_FRESH_PROCESS}"
    bad = ["composition=avrage"] if module == "sample" else ["no_such_key=1"]
    for args in (bad, ["--help"]):
        proc = subprocess.run([sys.executable, "-c", script, module, *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        last = proc.stdout.strip().splitlines()[-1]
        assert last == f"HEAVY [] CODE {0 if args == ['--help'] else 2}", proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


# ---- item 4: every choice is checked before anything is loaded ------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["composition=avrage"], ["composition=avrage", "average", "classifier"]),
        (["sampler=dpm"], ["sampler=dpm", "ddim"]),
        (["experiment=nope"], ["experiment=nope", "digits_4split"]),
        (["prior=unifrom"], ["prior=unifrom", "sizes, uniform"]),
        (["device=gpu"], ["device=gpu", "device=cpu"]),
        (["cuda_graph=fast"], ["cuda_graph=fast", "true, false or compiled"]),
        (["labels=[12]"], ["labels=", "below 10"]),
        (["shards=[a]"], ["shards="]),
        (["no_such_key=1"], ["no_such_key"]),
    ],
)
def test_sample_choices_fail_before_loading(args, words, tmp_path):
    proc = run("sample", *TINY, *args, f"paths.artifacts={tmp_path}/store", cwd=tmp_path)
    assert_one_line_exit_2(proc, "cdm-sample", *words)
    assert list(tmp_path.iterdir()) == []


def test_eval_and_paper_choices_are_checked(tmp_path):
    for module, arg in (("evaluate", "evaluate.reference=tests"),
                        ("evaluate", "evaluate.feature_spaces=[domian]"),
                        ("table1", "table1.metric=FID"), ("fig2", "fig2.feature_space=clip"),
                        ("table2", "table2.feature_space=clip")):  # fmt: skip
        proc = run(module, arg, f"paths.artifacts={tmp_path}/store", cwd=tmp_path)
        assert_one_line_exit_2(proc, COMMANDS[module][0], arg.split("=")[0])
    assert list(tmp_path.iterdir()) == []


def test_checked_values_are_the_ones_the_code_accepts():
    from omegaconf import OmegaConf

    from cdm.cli import checks
    from cdm.jobs.evaluate import REFERENCES
    from cdm.jobs.pipeline import CUDA_GRAPH

    assert checks.REFERENCES == REFERENCES
    assert checks.CUDA_GRAPH == CUDA_GRAPH
    # a shard's own data is a reference too (shard-KK); anything else is refused by name
    for ok in ("private", "test", "shard-01"):
        checks.check_choices(OmegaConf.create({"evaluate": {"reference": ok}}))
    for bad in ("shard01", "shard-", "tests"):
        with pytest.raises(checks.ChoiceError, match=f"evaluate.reference={bad} .*shard-01"):
            checks.check_choices(OmegaConf.create({"evaluate": {"reference": bad}}))


# ---- item 6: each error path of each command ------------------------------------------------


def test_user_error_classes_exist():
    from cdm.cli.errors import USER_ERROR_CLASSES

    for name in USER_ERROR_CLASSES:
        module, _, cls = name.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), cls), Exception), name


def test_every_command_reports_user_errors_in_one_line(store_root, tmp_path):
    empty = tmp_path / "empty.npz"
    np.savez(empty, images=np.zeros((0, 1, 8, 8), np.uint8), labels=np.zeros((0,), np.int64))
    store = f"paths.artifacts={store_root}"
    cases = [
        ("train", [*TINY, "stage=shard", "shard.index=7"], ["shard.index=7"]),
        ("train", [*TINY, "data=npz", f"data.root={tmp_path}/missing.npz"], ["missing.npz"]),
        ("sample", [*TINY, "shards=[5]"], ["shards=[5]", "[0, 1]"]),
        ("sample", [*TINY, "router_name=nope"], ["nope", "cdm-train"]),
        ("sample", [*TINY, "composition=knn"], ["knn"]),
        (
            "evaluate",
            [*TINY, "evaluate.samples=[nope]", "evaluate.feature_spaces=[pixels]"],
            ["nope"],
        ),
        ("forget", [*TINY, "forget.source=nope"], ["nope"]),
        ("add_source", [*TINY, "source.name=extra", f"source.path={tmp_path}/missing.npz"], []),
        (
            "serve",
            [*TINY, "serve.once=true", "serve.user=bob", f"serve.policy={tmp_path}/missing.yaml"],
            [],
        ),
        ("provenance", ["provenance.sample=nope/000001"], ["nope/000001"]),
        ("list_artifacts", ["experiment=nope"], ["experiment=nope"]),
    ]
    before = snapshot(store_root)

    def refuse(index: int, module: str, args: list[str]):
        cwd = tmp_path / f"cwd-{index}-{module}"
        cwd.mkdir()
        return cwd, run(module, *args, store, cwd=cwd)

    # independent processes (each its own cwd; none may write to the store): run two at a time
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda c: refuse(c[0], *c[1][:2]), enumerate(cases)))
    for (module, args, words), (cwd, proc) in zip(cases, outcomes, strict=True):
        assert_one_line_exit_2(proc, COMMANDS[module][0], *words)
        assert list(cwd.iterdir()) == [], (module, args, list(cwd.rglob("*")))
    after = snapshot(store_root)
    audit = (
        store_root / "audit" / "serve.jsonl"
    )  # a refusal is audited (its one record), nothing else
    assert "bob" in audit.read_text()
    before.update({p: s for p, s in after.items() if p.startswith(str(audit.parent))})
    assert after == before, sorted(set(after.items()) ^ set(before.items()))


def test_full_error_still_gives_the_traceback(tmp_path):
    proc = run("sample", *TINY, "prior=unifrom", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ChoiceError" in proc.stderr


# ---- item 5: the hint of a corrupt adapter is a command that works ---------------------------


def test_the_corrupt_adapter_hint_retrains_it(store_root, tmp_path):
    from tests.conftest import run_inprocess

    root = tmp_path / "store"
    shutil.copytree(store_root, root)
    weights = next((root / "experiments" / "digits_2split").rglob("shard-01/*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    sample = [*TINY, "num_samples=2", "batch_size=2", "steps=2", "progress=false"]
    proc = run("sample", *sample, f"paths.artifacts={root}", cwd=tmp_path)
    assert_one_line_exit_2(proc, "cdm-sample", "corrupt", "retrain=true")
    hint = re.search(r"`(cdm-train [^`]*)`", proc.stderr).group(1)
    overrides = shlex.split(hint)[1:]
    assert "retrain=true" in overrides
    run_inprocess(*TINY, *overrides, artifacts=root)
    card = run_inprocess(*sample, artifacts=root, config="sample")
    assert Path(card["path"]).is_dir()


# ---- item 7: every config key a message names exists -----------------------------------------

KEY = re.compile(r"(?<![\w./\-])([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)(?==|[\s`'\",);:]|$)")
FILE_SUFFIXES = {"safetensors", "json", "npz", "yaml", "png", "ckpt", "txt", "pt", "log", "py", "bin", "csv", "md"}  # fmt: skip


def message_strings(path: Path) -> list[str]:
    """String literals of a module that are not docstrings (messages, hints, log formats)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }  # fmt: skip
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_every_config_key_named_in_a_message_exists():
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from cdm.jobs.config import register_resolvers

    register_resolvers()
    with initialize_config_module(config_module="cdm.conf", version_base="1.3"):
        configs = [OmegaConf.to_container(compose(config_name=c)) for _, c in COMMANDS.values()]
        # a key of a non-default option counts too (attribution/method=datamodels, adapter=deep_prompt)
        conf = REPO / "cdm" / "conf"
        options = [
            ("attribute", [f"attribution/method={p.stem}"])
            for p in sorted((conf / "attribution" / "method").glob("*.yaml"))
        ]
        options += [
            ("train", ["stage=shard", f"adapter={p.stem}"])
            for p in sorted((conf / "adapter").glob("*.yaml"))
        ]
        options += [  # backbone=sd_local: backbone.codec.path, backbone.text_encoder.path
            ("train", [f"backbone={p.stem}"]) for p in sorted((conf / "backbone").glob("*.yaml"))
        ]
        options += [  # sharding/scorer=file: sharding.scorer.path
            ("train", ["sharding=by_score", f"sharding/scorer={p.stem}"])
            for p in sorted((conf / "sharding" / "scorer").glob("*.yaml"))
        ]
        options += [  # the groups a stage adds: feature_net.epochs, router.convergence, knn.*
            ("train", [f"stage={p.stem}"]) for p in sorted((conf / "stage").glob("*.yaml"))
        ]
        options += [  # knn=clip: knn.embedder.path; router=backbone_head: router.model.block
            ("train", [f"stage={group}", f"{group}={p.stem}"])
            for group in ("knn", "router")
            for p in sorted((conf / group).glob("*.yaml"))
        ]
        configs += [OmegaConf.to_container(compose(config_name=c, overrides=o)) for c, o in options]

    def exists(key: str) -> bool:
        for cfg in configs:
            node = cfg
            for part in key.split("."):
                if node == {}:  # a free-form mapping (data.kwargs): any key
                    return True
                if not isinstance(node, dict) or part not in node:
                    break
                node = node[part]
            else:
                return True
        return False

    tops = {k for cfg in configs for k, v in cfg.items() if isinstance(v, dict)}
    wrong = set()
    for path in sorted((REPO / "cdm").rglob("*.py")):
        for text in message_strings(path):
            for key in KEY.findall(text):
                first, last = key.split(".")[0], key.split(".")[-1]
                if first in tops and last not in FILE_SUFFIXES and not exists(key):
                    wrong.add(f"{path.relative_to(REPO)}: {key}")
    assert not wrong, sorted(wrong)
