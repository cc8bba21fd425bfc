"""The package's layout, read from the source: part folders, imports that only point down, no cycles.

Parts and what each may import (besides itself and the standard library / third-party packages):
shared helpers (top-level modules) < volumes < method, data < training, evaluation < cli; data and method never
import each other, training and evaluation never import each other, and the MONAI Label app imports method,
volumes and the helpers only.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lib" / "anofpdm"
APP = REPO / "apps" / "anofpdm"
HELPERS = "helpers"  # the top-level modules besides cli
PARTS = ("volumes", "method", "data", "training", "evaluation")
MAY_IMPORT = {
    HELPERS: set(),
    "volumes": {HELPERS},
    "method": {"volumes", HELPERS},
    "data": {"volumes", HELPERS},
    "training": {"data", "method", "volumes", HELPERS},
    "evaluation": {"data", "method", "volumes", HELPERS},
    "cli": {"training", "evaluation", "data", "method", "volumes", HELPERS},
    "app": {"method", "volumes", HELPERS},
}
MAX_HELPER_LINES = 120  # the shared helpers stay small; anything larger belongs to a part


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``anofpdm`` module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found.update(name for name in names if name.split(".")[0] == "anofpdm")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "anofpdm")
    return found


@functools.lru_cache(maxsize=1)
def _package_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module an imported name refers to (``anofpdm.method.model.load_model`` -> its module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return HELPERS  # the package's __init__
    if parts[1] in PARTS:
        return parts[1]
    return "cli" if parts[1] == "cli" else HELPERS


@functools.lru_cache(maxsize=1)
def _graph() -> dict[str, set[str]]:
    modules = _package_modules()
    graph = {}
    for module, path in modules.items():
        targets = {_resolve(name, modules) for name in _imports(path)}
        graph[module] = {target for target in targets if target and target != module}
    return graph


def test_top_level_holds_only_parts_cli_and_small_helpers():
    entries = {path.name for path in PACKAGE.iterdir() if path.name != "__pycache__"}
    folders = {name for name in entries if (PACKAGE / name).is_dir()}
    assert folders == set(PARTS)
    for name in sorted(entries - folders - {"__init__.py", "cli.py"}):
        lines = len((PACKAGE / name).read_text().splitlines())
        assert lines <= MAX_HELPER_LINES, f"top-level helper {name} has {lines} lines: move it into a part"
    for part in PARTS:
        for path in (PACKAGE / part).glob("*.py"):
            stem = path.stem
            assert not stem.startswith(part.rstrip("s")), f"{part}/{path.name} repeats its folder's name"


@pytest.mark.parametrize("module", sorted(_package_modules()))
def test_imports_point_down(module):
    source = _part(module)
    for target in sorted(_graph()[module]):
        target_part = _part(target)
        assert target_part == source or target_part in MAY_IMPORT[source], (
            f"{module} ({source}) imports {target} ({target_part}); {source} may import "
            f"{sorted(MAY_IMPORT[source])} only"
        )


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_app_imports_method_volumes_and_helpers_only():
    modules = _package_modules()
    for path in sorted(APP.rglob("*.py")):
        for name in sorted(_imports(path)):
            target = _resolve(name, modules)
            assert target is not None, f"{path.relative_to(REPO)} imports {name}, which is not in the package"
            assert _part(target) in MAY_IMPORT["app"], f"{path.relative_to(REPO)} imports {target}"


def test_rules_catch_an_upward_import(tmp_path):
    """The checker itself: an import from volumes up to the method is found."""
    module = tmp_path / "bad.py"
    module.write_text("from anofpdm.method.pipeline import segment_volume\n")
    target = _resolve(next(iter(_imports(module))), _package_modules())
    assert target == "anofpdm.method.pipeline"
    assert _part(target) not in MAY_IMPORT["volumes"]
