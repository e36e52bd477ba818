"""A non-editable install (a wheel) ships the Hydra configs and gives working commands.

The project is built offline from a copy of the checkout (``--no-build-isolation --no-index``: the
venv's setuptools, which must meet ``[build-system] requires``; `make install` sees to it), so the
checkout itself gets no ``build/`` folder.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip"]
OFFLINE = ["--no-deps", "--no-build-isolation", "--no-index", "--quiet"]


def shipped_sources() -> set[str]:
    """Every ``.py`` and ``.yaml`` file of the checkout's ``cdm`` package, relative to the repo."""
    return {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "cdm").rglob("*")
        if p.suffix in {".py", ".yaml"} and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of the current checkout, built offline from a copy of it."""
    root = tmp_path_factory.mktemp("build")
    src = root / "src"
    shutil.copytree(REPO / "cdm", src / "cdm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    proc = subprocess.run(
        [
            *PIP,
            "wheel",
            *OFFLINE,
            "--check-build-dependencies",
            "--wheel-dir",
            str(root / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"building the wheel failed:\n{proc.stdout}\n{proc.stderr}"
    (built,) = (root / "dist").glob("cdm-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed with ``pip install --target`` (packages and ``bin/`` scripts)."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [*PIP, "install", *OFFLINE, "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"installing the wheel failed:\n{proc.stdout}\n{proc.stderr}"
    return target


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``args`` with the install first on PYTHONPATH, from ``cwd`` (outside the checkout)."""
    path = [str(site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def console_scripts(site: Path) -> list[str]:
    """The ``[console_scripts]`` names of the installed distribution."""
    (dist_info,) = site.glob("cdm-*.dist-info")
    entry_points = configparser.ConfigParser()
    entry_points.read(dist_info / "entry_points.txt")
    return sorted(entry_points["console_scripts"])


def test_wheel_ships_every_config_and_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = shipped_sources()
    assert "cdm/conf/__init__.py" in expected
    assert "cdm/conf/hydra/launcher/slurm.yaml" in expected  # a nested group
    assert sum(name.startswith("cdm/conf/") for name in expected) > 50
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}: add them to [tool.setuptools.package-data]"


def test_installed_cdm_train_composes_its_own_configs(site, tmp_path):
    """`cdm-train --cfg job` from the install, in a folder outside the checkout, reads ``site/cdm/conf``."""
    conf = site / "cdm" / "conf"
    with (conf / "train.yaml").open("a") as f:  # a key only the installed copy has
        f.write("\ninstalled_copy_marker: 8123\n")
    script = str(site / "bin" / "cdm-train")

    where = run_installed(site, tmp_path, sys.executable, "-c", "import cdm; print(cdm.__file__)")
    assert Path(where.stdout.strip()) == site / "cdm" / "__init__.py"

    job = run_installed(
        site, tmp_path, sys.executable, script, "experiment=digits_2split", "--cfg", "job"
    )
    assert "installed_copy_marker: 8123" in job.stdout, job.stdout[-3000:]
    assert "n_shards: 2" in job.stdout, job.stdout[-3000:]  # the experiment delta came along

    searchpath = run_installed(site, tmp_path, sys.executable, script, "--info", "searchpath")
    main = [line for line in searchpath.stdout.splitlines() if "| main " in line]
    assert main and (f"file://{conf}" in main[0] or "pkg://cdm.conf" in main[0]), searchpath.stdout
    assert str(REPO) not in searchpath.stdout
    assert not list(tmp_path.glob("outputs")), "--cfg job must not start a run"


def test_every_installed_command_starts(site, tmp_path):
    """Each console script of the install imports and parses its configuration (``--help``)."""
    scripts = console_scripts(site)
    assert "cdm-train" in scripts and len(scripts) >= 10, scripts
    for name in scripts:
        run_installed(site, tmp_path, sys.executable, str(site / "bin" / name), "--help")
