"""The package's shape: the layer contracts in pyproject.toml hold and no module imports in a cycle."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(config: Path) -> subprocess.CompletedProcess:
    """Run `lint-imports` on the contracts in ``config`` against the checkout's ``cdm``."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(config), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_contracts_are_kept():
    """`lint-imports` checks every `[[tool.importlinter.contracts]]` in pyproject.toml."""
    proc = lint_imports(REPO / "pyproject.toml")
    assert proc.returncode == 0, f"a layer contract is broken:\n{proc.stdout[-6000:]}{proc.stderr}"
    assert " 0 broken" in proc.stdout, proc.stdout[-2000:]


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The same run fails when a contract is broken: here the layers are listed upside down."""
    config = tmp_path / "contracts.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "cdm"\n'
        '[[tool.importlinter.contracts]]\nname = "upside down"\ntype = "layers"\n'
        'containers = ["cdm"]\nlayers = ["core", "jobs", "cli"]\n'
    )
    proc = lint_imports(config)
    assert proc.returncode != 0 and "upside down BROKEN" in proc.stdout, proc.stdout[-2000:]


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child))))
                    )
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def describe(graph: grimp.ImportGraph, cycle: list[str]) -> str:
    """The import lines that close one cycle, as `importer:line -> imported`."""
    members = set(cycle)
    lines = []
    for importer in cycle:
        for imported in sorted(graph.find_modules_directly_imported_by(importer) & members):
            for detail in graph.get_import_details(importer=importer, imported=imported):
                lines.append(f"  {importer}:{detail['line_number']} -> {imported}")
    return "\n".join(lines)


def test_cycle_finder_finds_a_planted_cycle():
    graph = grimp.ImportGraph()
    for module in ("pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d"):
        graph.add_module(module)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.c")
    graph.add_import(importer="pkg.c", imported="pkg.a")
    graph.add_import(importer="pkg.d", imported="pkg.a")
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_no_import_cycle_between_modules():
    """Any cycle fails, also inside one layer and through function-level imports."""
    graph = grimp.build_graph("cdm", cache_dir=None)
    cycles = import_cycles(graph)
    report = "\n".join(f"cycle {' <-> '.join(c)}:\n{describe(graph, c)}" for c in cycles)
    assert not cycles, (
        f"import cycles in cdm (break them by moving the shared code down):\n{report}"
    )


def test_no_private_name_is_imported_across_modules():
    """A leading underscore means "this module's own": another module that needs it gets a public name."""
    offenders = []
    for path in sorted((REPO / "cdm").rglob("*.py")):
        text = path.read_text()
        for block in re.finditer(r"^\s*from cdm[\w.]* import (\([^)]*\)|[^\n]*)", text, re.M):
            names = [n.split(" as ")[0].strip() for n in block.group(1).strip("()").split(",")]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.startswith("_")]
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def test_weights_load_only_as_safetensors_or_weights_only():
    """Every ``torch.load`` in cdm passes ``weights_only=True``: a checkpoint never runs code."""
    unsafe = []
    for path in sorted((REPO / "cdm").rglob("*.py")):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        for call in re.finditer(r"torch\.load\(([^()]*(\([^()]*\))?)*\)", code):
            if "weights_only=True" not in call.group(0):
                unsafe.append(f"{path.relative_to(REPO)}: {call.group(0)}")
    assert not unsafe, "torch.load without weights_only=True:\n" + "\n".join(unsafe)
