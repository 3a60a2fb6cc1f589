"""The design figures issue 14 set for the library and the pipelines, kept from drifting back: short
functions, small modules, no reaching into another module's private names, and every workaround for a
Ray internal in the one module pinned to the Ray version it was written against."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("simsiam/**/*.py"), *ROOT.glob("pipelines/**/*.py")])
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450
RAY_COMPAT = "simsiam/ray_compat.py"
# Private attributes of Ray objects (not reachable through a ``ray._x`` chain) we know we rely on.
RAY_PRIVATE_ATTRS = {"_execution_idx", "use_datasource_v2", "get_storage", "_ot_trials", "_completed_trials",
                     "_brackets", "_rungs"}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _ours(module: str) -> bool:
    return module.split(".")[0] in ("simsiam", "pipelines")


def test_functions_are_short():
    long = [(n.end_lineno - n.lineno + 1, f"{_rel(p)}:{n.lineno} {n.name}")
            for p in SOURCES for n in ast.walk(_tree(p))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, sorted(long, reverse=True)


def test_modules_are_small():
    big = [(n, _rel(p)) for p in SOURCES if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not big, sorted(big, reverse=True)


def _private_uses(path: Path) -> list[str]:
    """``from simsiam.x import _y`` and ``alias._y`` where alias names one of our modules."""
    tree, found, aliases = _tree(path), [], {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in n.names if _ours(a.name)})
        elif isinstance(n, ast.ImportFrom) and n.module and _ours(n.module):
            for a in n.names:
                if _is_private(a.name):
                    found.append(f"{_rel(path)}:{n.lineno} from {n.module} import {a.name}")
                else:
                    aliases[a.asname or a.name] = f"{n.module}.{a.name}"
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and _is_private(n.attr) and isinstance(n.value, ast.Name) \
                and n.value.id in aliases:
            found.append(f"{_rel(path)}:{n.lineno} {n.value.id}.{n.attr}")
    return found


def test_no_module_reaches_into_another_modules_private_names():
    found = [f for p in SOURCES for f in _private_uses(p)]
    assert not found, found


def _ray_internals(path: Path) -> list[str]:
    found = []
    for n in ast.walk(_tree(path)):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("ray") \
                and any(_is_private(part) for part in n.module.split(".")):
            found.append(f"{_rel(path)}:{n.lineno} from {n.module}")
        elif isinstance(n, ast.Attribute) and n.attr in RAY_PRIVATE_ATTRS:
            found.append(f"{_rel(path)}:{n.lineno} .{n.attr}")
        elif isinstance(n, ast.Constant) and n.value in RAY_PRIVATE_ATTRS:
            found.append(f"{_rel(path)}:{n.lineno} '{n.value}'")
        elif isinstance(n, ast.Attribute) and _is_private(n.attr):
            root = n.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id == "ray":
                found.append(f"{_rel(path)}:{n.lineno} ray...{n.attr}")
    return found


def test_ray_internals_are_touched_in_one_module_only():
    found = [f for p in SOURCES if _rel(p) != RAY_COMPAT for f in _ray_internals(p)]
    assert not found, found
    # ...and that module still does what it is for (a check that fails if it loses its contents).
    assert _ray_internals(ROOT / RAY_COMPAT)
