"""The package's import graph: no import cycle, and every arrow follows the dependency rule.

Every module under loop_megatron/ is parsed (nothing is imported) and every import statement counts:
module-level and inside functions (a function-level import hides a cycle from Python, not from this
test), relative and absolute, `if TYPE_CHECKING:` ones included. Importing `pkg.sub.mod` from outside
`pkg.sub` also runs `pkg/sub/__init__.py`, so that arrow is added too.

The rule is LAYERS below, one entry per top-level module or subpackage of loop_megatron/: a module may
import its own subpackage and anything on a strictly lower layer, nothing on its own layer in another
subpackage or above. tools/, bench/ and studies/ (when it exists) import the package and, of the other
project folders (tests, tools, bench, studies), only what FRONT_FOLDERS allows; the package imports none
of them. config.py (copied into Hugging Face export folders beside errors.py) and errors.py import only
the standard library at module level (config.py reads YAML with a function-level `import yaml`).
"""
from __future__ import annotations

import ast
import os
import sys
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "loop_megatron"

# The dependency rule. Arrows point from a higher number to a lower one; same number, different
# entries: no arrow either way. A new top-level module or subpackage needs an entry here.
LAYERS: Dict[str, int] = {
    "__init__": 0,     # loop_megatron/__init__.py (the package docstring and __version__)
    "errors": 0,       # the error base
    "config": 1,       # stdlib only (+ errors)
    "utils": 1,
    "parallel": 2,
    "data": 2,
    "model": 3,        # parallel, config
    "checkpoint": 4,   # model, data (the tokenizer a checkpoint records), config, utils
    "training": 5,
    "inference": 5,
    "hf": 5,
    "launch": 6,
    "experiments": 6,  # records, tables, plots (also of inference results)
    "train": 7,        # python -m loop_megatron.train
    "demo": 7,         # python -m loop_megatron.demo
}
# Top-level folders holding code that is not the package: none may be imported by the package.
PROJECT_FOLDERS = ("tests", "tools", "bench", "studies")
# Folders of code in front of the package -> the other project folders each may import (besides the
# package and its own files). bench/zero3_gather_bench.py spawns its ranks with tests/dist_utils.py.
FRONT_FOLDERS: Dict[str, Set[str]] = {"tools": set(), "bench": {"tests"}, "studies": set()}
# Modules that must import nothing outside the standard library and, of the package, only these.
STDLIB_ONLY = {"config": {"errors"}, "errors": set()}


class Arrow(NamedTuple):
    source: str  # importing module (dotted)
    target: str  # imported module (dotted)
    path: str    # file of the import, relative to the root
    line: int
    implicit: bool = False  # a package __init__ run by importing one of its submodules

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def module_files(root: str, package: str) -> Dict[str, str]:
    """Dotted module name -> file path, for every .py file under root/package."""
    out = {}
    for folder, dirs, files in os.walk(os.path.join(root, package)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, root)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
    return out


def _imports(tree: ast.AST) -> Iterator[ast.stmt]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def _known(name: str, modules: Dict[str, str]) -> Optional[str]:
    """The longest prefix of `name` that is a module of the package (None outside it)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _from_base(module: str, is_package: bool, node: ast.ImportFrom, path: str) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 > len(parts) - 1:
        raise AssertionError(f"{path}:{node.lineno}: relative import beyond the top-level package")
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def import_graph(root: str, package: str = PACKAGE) -> Tuple[Dict[str, str], List[Arrow]]:
    """(modules, arrows): every import between modules of `package` under `root`."""
    modules = module_files(root, package)
    arrows: List[Arrow] = []
    for module, path in modules.items():
        rel = os.path.relpath(path, root)
        is_package = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in _imports(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [_known(alias.name, modules) for alias in node.names]
            else:
                base = _from_base(module, is_package, node, rel)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else _known(base, modules))
            for target in dict.fromkeys(t for t in targets if t and t != module):
                arrows.append(Arrow(module, target, rel, node.lineno))
                # The package __init__s that importing `target` runs, unless `module` is inside them.
                parts = target.split(".")
                for i in range(1, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent in modules and not (module == parent or module.startswith(parent + ".")):
                        arrows.append(Arrow(module, parent, rel, node.lineno, implicit=True))
    return modules, arrows


def find_cycles(modules: Sequence[str], arrows: Sequence[Arrow]) -> List[List[Arrow]]:
    """One cycle (as its arrows, in order) per strongly connected group of modules."""
    out_edges: Dict[str, Dict[str, Arrow]] = {m: {} for m in modules}
    for a in arrows:
        out_edges.setdefault(a.source, {}).setdefault(a.target, a)
        out_edges.setdefault(a.target, {})
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    groups: List[List[str]] = []

    def visit(v: str) -> None:  # Tarjan, iterative (deep packages must not hit the recursion limit)
        work = [(v, iter(sorted(out_edges[v])))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(out_edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    group.append(w)
                    if w == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))

    for m in sorted(out_edges):
        if m not in index:
            visit(m)
    cycles = []
    for group in groups:
        members, start = set(group), group[0]
        # Shortest way back to `start` inside the group (breadth first).
        previous: Dict[str, Arrow] = {}
        frontier = [start]
        while frontier and start not in previous:
            nxt = []
            for node in frontier:
                for target, arrow in sorted(out_edges[node].items()):
                    if target in members and target not in previous:
                        previous[target] = arrow
                        nxt.append(target)
            frontier = nxt
        path, node = [], start
        while True:
            arrow = previous[node]
            path.append(arrow)
            node = arrow.source
            if node == start:
                break
        cycles.append(path[::-1])
    return cycles


def layer_of(module: str, package: str = PACKAGE) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def rule_violations(arrows: Sequence[Arrow], layers: Dict[str, int], package: str = PACKAGE) -> List[str]:
    problems = []
    for a in arrows:
        if a.implicit:
            continue  # the explicit arrow of the same import is judged
        src, dst = layer_of(a.source, package), layer_of(a.target, package)
        if src == dst:
            continue
        missing = [name for name in (src, dst) if name not in layers]
        if missing:
            problems.append(f"{a.where()}: {a.source} imports {a.target}, but {', '.join(missing)} has no entry "
                            "in LAYERS (tests/test_architecture.py); give it a layer.")
        elif layers[dst] >= layers[src]:
            problems.append(f"{a.where()}: {a.source} (layer {src}={layers[src]}) imports {a.target} "
                            f"(layer {dst}={layers[dst]}); imports must point to a lower layer.")
    return problems


def format_cycle(cycle: Sequence[Arrow]) -> str:
    text = cycle[0].source
    for a in cycle:
        text += f" -> {a.target} ({a.where()}{', runs its __init__' if a.implicit else ''})"
    return text


def _module_level_imports(tree: ast.AST) -> Iterator[ast.stmt]:
    """Imports that run when the module is imported (not inside a function)."""
    todo = list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def external_imports(path: str, rel: str, module_level: bool = False) -> Iterator[Tuple[str, int]]:
    """(top-level name, line) of every absolute import in one file (or only those run at import time)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in (_module_level_imports(tree) if module_level else _imports(tree)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif not node.level and node.module:
            yield node.module.split(".")[0], node.lineno


def python_files(folder: str) -> Iterator[str]:
    for base, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(base, name)


def folder_violations(root: str, package: str = PACKAGE,
                      front: Optional[Dict[str, Set[str]]] = None) -> List[str]:
    problems = []
    for path in python_files(os.path.join(root, package)):
        rel = os.path.relpath(path, root)
        for name, line in external_imports(path, rel):
            if name in PROJECT_FOLDERS:
                problems.append(f"{rel}:{line}: the package imports {name}/, which is outside it.")
    for folder, allowed in (FRONT_FOLDERS if front is None else front).items():
        for path in python_files(os.path.join(root, folder)):
            rel = os.path.relpath(path, root)
            for name, line in external_imports(path, rel):
                if name in PROJECT_FOLDERS and name != folder and name not in allowed:
                    also = "".join(f", {a}/" for a in sorted(allowed))
                    problems.append(f"{rel}:{line}: {folder}/ imports {name}/; it may import only {package}"
                                    f"{also} and its own files (FRONT_FOLDERS in tests/test_architecture.py).")
    return problems


def stdlib_violations(modules: Dict[str, str], arrows: Sequence[Arrow], root: str, package: str = PACKAGE) -> List[str]:
    problems = []
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for name, allowed in STDLIB_ONLY.items():
        module = f"{package}.{name}"
        rel = os.path.relpath(modules[module], root)
        for a in arrows:
            if a.source == module and layer_of(a.target, package) not in allowed:
                problems.append(f"{a.where()}: {module} imports {a.target}; it may import only "
                                f"{sorted(allowed) or 'nothing'} of the package.")
        for top, line in sorted(external_imports(modules[module], rel, module_level=True), key=lambda t: t[1]):
            if top != package and top not in stdlib:
                problems.append(f"{rel}:{line}: {module} imports {top}, which is not in the standard library.")
    return problems


# --------------------------------------------------------------------------------------------- the repo

@pytest.fixture(scope="module")
def graph():
    return import_graph(REPO)


def test_no_import_cycle(graph):
    modules, arrows = graph
    cycles = find_cycles(list(modules), arrows)
    assert not cycles, "import cycles (move what both sides need into one of them or a third module):\n" + \
        "\n".join(format_cycle(c) for c in cycles)


def test_imports_follow_the_dependency_rule(graph):
    modules, arrows = graph
    unknown = sorted({layer_of(m) for m in modules} - set(LAYERS))
    assert not unknown, f"top-level modules/subpackages without an entry in LAYERS: {unknown}"
    problems = rule_violations(arrows, LAYERS)
    assert not problems, "imports against the dependency rule:\n" + "\n".join(problems)


def test_front_folders_import_only_the_package():
    problems = folder_violations(REPO)
    assert not problems, "\n".join(problems)


def test_config_and_errors_need_only_the_standard_library(graph):
    modules, arrows = graph
    problems = stdlib_violations(modules, arrows, REPO)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------- the checker can fail

def _write(root, files: Dict[str, str]) -> str:
    for rel, text in files.items():
        path = os.path.join(str(root), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return str(root)


FAKE_LAYERS = {"__init__": 0, "low": 1, "high": 2}


def test_checker_reports_a_function_level_cycle(tmp_path):
    root = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "from .a import f\n",
        "pkg/low/a.py": "def f():\n    from .b import g\n    return g()\n",
        "pkg/low/b.py": "import os\n\nfrom pkg.low.a import f as _f\n\ndef g():\n    return 1\n",
    })
    modules, arrows = import_graph(root, "pkg")
    cycles = find_cycles(list(modules), arrows)
    assert len(cycles) == 1
    text = format_cycle(cycles[0])
    assert "pkg.low.a -> pkg.low.b (pkg/low/a.py:2) -> pkg.low.a (pkg/low/b.py:3)" in text
    assert rule_violations(arrows, FAKE_LAYERS) == []


def test_checker_reports_a_cycle_through_a_package_init(tmp_path):
    root = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "from .m import x\n",
        "pkg/low/m.py": "x = 1\n",
        "pkg/low/n.py": "def f():\n    from .. import high\n",  # against the rule, no cycle
        "pkg/high/__init__.py": "",
        "pkg/high/y.py": "from pkg.low.n import f\n",
    })
    modules, arrows = import_graph(root, "pkg")
    assert find_cycles(list(modules), arrows) == []
    # pkg.low.m now imports high.y, which imports pkg.low.n and so runs pkg/low/__init__.py, which imports m.
    _write(tmp_path, {"pkg/low/m.py": "from pkg.high import y\nx = 1\n"})
    modules, arrows = import_graph(root, "pkg")
    cycles = [format_cycle(c) for c in find_cycles(list(modules), arrows)]
    assert len(cycles) == 1 and "runs its __init__" in cycles[0] and "pkg/low/m.py:1" in cycles[0], cycles
    problems = rule_violations(arrows, FAKE_LAYERS)
    assert any(p.startswith("pkg/low/n.py:2: pkg.low.n (layer low=1) imports pkg.high") for p in problems), problems
    assert any(p.startswith("pkg/low/m.py:1: pkg.low.m (layer low=1) imports pkg.high") for p in problems), problems


def test_checker_accepts_downward_arrows_and_names_unknown_layers(tmp_path):
    root = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "from . import a\nfrom .a import VALUE\n",
        "pkg/low/a.py": "VALUE = 1\n",
        "pkg/high/__init__.py": "",
        "pkg/high/b.py": "from .. import low\nfrom ..low import VALUE\nimport pkg.low.a\n",
        "pkg/extra.py": "from .high import b\n",
    })
    modules, arrows = import_graph(root, "pkg")
    assert find_cycles(list(modules), arrows) == []
    problems = rule_violations(arrows, FAKE_LAYERS)
    assert problems == ["pkg/extra.py:1: pkg.extra imports pkg.high.b, but extra has no entry in LAYERS "
                        "(tests/test_architecture.py); give it a layer."]
    assert rule_violations(arrows, {**FAKE_LAYERS, "extra": 3}) == []


def test_checker_reports_imports_of_project_folders(tmp_path):
    root = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from tests.helpers import x\n",
        "tools/t.py": "import _bootstrap\nfrom pkg import a\nfrom bench.b import run\n",
        "bench/b.py": "import pkg.a\nfrom tests import helpers\nimport tools.t\n",
    })
    assert folder_violations(root, "pkg", {"tools": set(), "bench": {"tests"}}) == [
        "pkg/a.py:2: the package imports tests/, which is outside it.",
        "tools/t.py:3: tools/ imports bench/; it may import only pkg and its own files "
        "(FRONT_FOLDERS in tests/test_architecture.py).",
        "bench/b.py:3: bench/ imports tools/; it may import only pkg, tests/ and its own files "
        "(FRONT_FOLDERS in tests/test_architecture.py).",
    ]
