"""Import hygiene of the moetrain package: every module imports on its own, module-level imports form no
cycle (imports inside functions are the way to break one, and are not counted), and no import runs up the
layers docs/DESIGN.md draws (there, inside functions too, but for the deferred imports DESIGN.md names)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "moetrain"
DESIGN = ROOT / "docs" / "DESIGN.md"
# (importer, imported) imports that run up the layers inside a function, to defer a heavy dependency; each is
# named in DESIGN.md's "Layers"
DEFERRED_UPWARD = {("moetrain.train.trainer", "moetrain.plot"),  # matplotlib only where a plot is written
                   ("moetrain.train.monitor.wandb_logger", "moetrain.plot")}


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _runtime_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run at import time: the module body, descending into if/try/with blocks but not into
    functions, classes or `if TYPE_CHECKING:`."""
    statements = []
    for node in body:
        if isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                statements += _runtime_statements(node.body) + _runtime_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                statements += _runtime_statements(block)
        elif isinstance(node, ast.With):
            statements += _runtime_statements(node.body)
        else:
            statements.append(node)
    return statements


def _imported_modules(name: str, path: Path, everywhere: bool = False) -> set[str]:
    """moetrain modules whose code runs when `name` is imported: each module it imports at module level, and
    the packages above that module which are not also above `name` (their __init__ runs first). `everywhere`:
    the imports inside functions and under TYPE_CHECKING too."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree) if everywhere else _runtime_statements(tree.body):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if _module_path(submodule) else base)
    own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1 + is_package)}
    imported = set()
    for target in targets:
        if target.split(".")[0] != "moetrain":
            continue
        parts = target.split(".")
        imported.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {module for module in imported if module not in own_packages and module != name and _module_path(module)}


def import_graph(everywhere: bool = False) -> dict[str, set[str]]:
    return {name: _imported_modules(name, _module_path(name), everywhere) for name in module_names()}


def design_layers() -> list[list[str]]:
    """The rows of the picture under "## Layers" in docs/DESIGN.md, top row first: in each row, the names
    before the description (two or more spaces on), comma-separated top-level packages and modules."""
    section = DESIGN.read_text().split("\n## Layers\n", 1)[1]
    picture = section.split("```", 2)[1]
    return [re.split(r"\s{2,}", line.strip(), maxsplit=1)[0].split(", ")
            for line in picture.splitlines() if line.strip()]


def _top(module: str) -> str:
    """The top-level package or module of moetrain a module belongs to ("moetrain.moe.router" -> "moe")."""
    return module.split(".")[1]


def upward_imports(graph: dict[str, set[str]], layers: list[list[str]]) -> list[tuple[str, str]]:
    """(importer, imported) for each import between two top-level packages that does not go to a lower row
    of `layers` (top row first): up, or sideways within a row."""
    row = {name: i for i, names in enumerate(layers) for name in names}
    return sorted((module, target) for module, targets in graph.items() for target in targets
                  if _top(module) != _top(target) and row[_top(target)] <= row[_top(module)])


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_cycle_finder_sees_a_cycle_through_a_package_init():
    graph = {"moetrain.a": {"moetrain.b"}, "moetrain.b": {"moetrain.c"}, "moetrain.c": {"moetrain.a"},
             "moetrain.d": {"moetrain.a"}}
    assert find_cycles(graph) == [["moetrain.a", "moetrain.b", "moetrain.c"]]
    assert find_cycles({"moetrain.a": {"moetrain.b"}, "moetrain.b": set()}) == []


def test_graph_reads_module_level_imports_only():
    graph = import_graph()
    # config's sections import the router's choice lists: the router module and the moe package's __init__
    assert {"moetrain.moe", "moetrain.moe.routing_config"} <= graph["moetrain.config.sections"]
    # the cli imports its commands' code inside functions only
    assert not any(module.split(".")[1] not in ("cli",) for module in graph["moetrain.cli.train"])
    assert "moetrain.config.sections" not in graph["moetrain.config.validation"]  # under TYPE_CHECKING


def test_layer_check_sees_an_import_up_or_sideways():
    layers = [["cli"], ["train", "plot"], ["model"]]
    graph = {"moetrain.model": {"moetrain.train.run"}, "moetrain.train.run": {"moetrain.plot", "moetrain.model"},
             "moetrain.cli.train": {"moetrain.train.run"}, "moetrain.train.trainer": {"moetrain.train.run"}}
    assert upward_imports(graph, layers) == [("moetrain.model", "moetrain.train.run"),
                                             ("moetrain.train.run", "moetrain.plot")]


def test_design_md_places_every_package_and_module_in_one_layer():
    placed = [name for row in design_layers() for name in row]
    top_level = {_top(name) for name in module_names() if name != "moetrain"}
    assert sorted(placed) == sorted(top_level), "docs/DESIGN.md's Layers must name each top-level module once"


def test_no_import_runs_up_the_layers():
    """Module-level imports go to a lower layer (or stay in their package); so do imports inside functions but
    for DEFERRED_UPWARD, and those only inside functions."""
    layers = design_layers()
    at_import = upward_imports(import_graph(), layers)
    assert not at_import, f"module-level imports running up docs/DESIGN.md's layers: {at_import}"
    anywhere = [edge for edge in upward_imports(import_graph(everywhere=True), layers) if edge not in DEFERRED_UPWARD]
    assert not anywhere, f"imports running up docs/DESIGN.md's layers (inside functions): {anywhere}"


def test_no_import_cycle_in_moetrain():
    cycles = find_cycles(import_graph())
    assert not cycles, f"module-level import cycles: {cycles}; import inside a function or move code down"


_IMPORT_EACH = """
import importlib, json, os, sys
names, third_party = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for module in third_party:  # loaded once here, shared by every forked child
    try:
        importlib.import_module(module)
    except Exception:
        pass
failures = {}
for name in names:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            message = ""
        except ImportError as error:  # an optional extra that is not installed is not a failure
            missing = (error.name or "").split(".")[0]
            message = "" if missing and missing != "moetrain" else f"{type(error).__name__}: {error}"
        except BaseException as error:
            message = f"{type(error).__name__}: {error}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    if message:
        failures[name] = message
print(json.dumps(failures))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="imports each module in a forked child")
def test_each_module_imports_alone():
    """Each module in a child of a fresh interpreter that holds the third-party libraries but no moetrain
    module, so a module that only works after another was imported fails here."""
    third_party = set()
    for name in module_names():
        for node in _runtime_statements(ast.parse(_module_path(name).read_text()).body):
            if isinstance(node, ast.Import):
                third_party.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                third_party.add(node.module)
    third_party = sorted(module for module in third_party if module.split(".")[0] not in ("moetrain", "__future__"))
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(module_names()), json.dumps(third_party)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, failures
