"""The remote code of a `loop_gpt` export: the package's own model source, flattened into the model folder.

transformers loads a trust_remote_code model from one flat folder whose modules import each other with
single-dot relative imports (`from .x import y`). The exporter starts from the two files transformers names
in config.json's auto_map (modeling_loop_gpt.py, the PreTrainedModel adapter, and configuration_loop_gpt.py),
follows every relative import through the package (model/, the tensor-parallel layers, which are plain local
layers at world size 1, config.py), and writes each module it reaches under a flat name with only its
relative import lines rewritten. Nothing else in any file changes, so the exported model is the package's
model, never a second implementation of it.

Flat names: hf/<name>.py keeps <name> (auto_map refers to it); any other module is its dotted path inside the
package with dots as underscores (model/gpt.py -> model_gpt.py, parallel/__init__.py -> parallel.py).
"""
from __future__ import annotations

import ast
import os
import re
from typing import Dict, List, Tuple

PACKAGE = "loop_megatron"
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_MODULES = ("loop_megatron.hf.modeling_loop_gpt", "loop_megatron.hf.configuration_loop_gpt")
_FROM_IMPORT = re.compile(r"from\s+\.+[\w.]*\s+import")


def module_path(module: str) -> str:
    """The source file of a package module ('loop_megatron.model.gpt' -> .../model/gpt.py)."""
    parts = module.split(".")[1:]
    base = os.path.join(PACKAGE_DIR, *parts)
    return os.path.join(base, "__init__.py") if os.path.isdir(base) else base + ".py"


def flat_name(module: str) -> str:
    """The module's name in the export folder (see the module docstring)."""
    parts = module.split(".")[1:]
    if parts[:1] == ["hf"]:
        return parts[-1]
    return "_".join(parts)


def _absolute(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a relative `from ... import` in `importer` names."""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _relative_imports(module: str) -> List[Tuple[int, str]]:
    """(line number, absolute module) of every relative import in `module`; refuses imports the flat folder
    could not resolve (the package by its absolute name, or `from . import submodule`)."""
    path = module_path(module)
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            if not node.module:
                raise RuntimeError(f"{path}:{node.lineno}: 'from . import ...' cannot be exported as remote code; "
                                   f"import the names from their module.")
            found.append((node.lineno, _absolute(module, path.endswith("__init__.py"), node)))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n == PACKAGE or n.startswith(PACKAGE + ".") for n in names):
                raise RuntimeError(f"{path}:{node.lineno}: the remote code imports {PACKAGE} by name; use a "
                                   f"relative import.")
    return found


def _rewritten(module: str, imports: List[Tuple[int, str]]) -> str:
    """The module's source with each relative import line pointing at the flat name of its target."""
    lines = open(module_path(module), encoding="utf-8").read().splitlines(keepends=True)
    for lineno, target in imports:
        line = lines[lineno - 1]
        if not _FROM_IMPORT.search(line):
            raise RuntimeError(f"{module_path(module)}:{lineno}: a relative import must start on its own line.")
        lines[lineno - 1] = _FROM_IMPORT.sub(f"from .{flat_name(target)} import", line, count=1)
    return "".join(lines)


def remote_code_sources() -> Dict[str, str]:
    """{file name in the export folder: its source} for every module the entry files reach."""
    sources: Dict[str, str] = {}
    owners: Dict[str, str] = {}
    pending = list(ENTRY_MODULES)
    while pending:
        module = pending.pop()
        name = flat_name(module) + ".py"
        if owners.get(name) == module:
            continue
        if name in owners:
            raise RuntimeError(f"{module} and {owners[name]} would both be exported as {name}.")
        owners[name] = module
        imports = _relative_imports(module)
        sources[name] = _rewritten(module, imports)
        pending.extend(target for _, target in imports)
    return dict(sorted(sources.items()))


def write_remote_code(folder: str) -> List[str]:
    """Write the remote code into `folder`; returns the file names written."""
    sources = remote_code_sources()
    for name, text in sources.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)
    return list(sources)


__all__ = ["ENTRY_MODULES", "flat_name", "module_path", "remote_code_sources", "write_remote_code"]
