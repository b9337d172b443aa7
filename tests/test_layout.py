"""The package layout and its dependency rule (README "Layout", grerank_dist/__init__.py).

Every module's imports of the package are read from its source (top-level and inside functions
alike; a module's ``if __name__ == "__main__":`` entry block is not a dependency of the library
and is left out) and held against the rule below; the module graph must have no cycle.
"""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "grerank_dist"
FOUNDATION = {"config", "atomic", "interface"}
# part -> the parts it may import (besides itself). A part is a subpackage, or a foundation module.
ALLOWED = {
    "config": set(),
    "atomic": set(),
    "interface": set(),
    "method": FOUNDATION,
    "models": FOUNDATION | {"method"},
    "data": FOUNDATION | {"method"},
    "training": FOUNDATION | {"method", "models", "data"},
    "evaluation": FOUNDATION | {"method", "models", "data", "training"},
    "perf": FOUNDATION | {"method", "models", "data", "training", "evaluation"},
    "demos": FOUNDATION | {"method", "models", "data", "training", "evaluation", "perf"},
    "cli": FOUNDATION | {"method", "models", "data", "training", "evaluation", "perf"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    if module in FOUNDATION or module in ("config", "atomic", "cli"):
        return module
    return module.split(".")[0] if module else "__init__"


def _is_main_block(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def package_imports(path: Path) -> set[str]:
    """The package modules (names relative to grerank_dist) that ``path`` imports."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_main_block(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("grerank_dist."))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "grerank_dist":
                base = child.module
                for alias in child.names:
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if (PACKAGE / Path(*candidate.split(".")[1:])).with_suffix(".py").exists()
                              or (PACKAGE / Path(*candidate.split(".")[1:])).is_dir() else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name.removeprefix("grerank_dist").lstrip(".") for name in found} - {""}


def modules() -> dict[str, set[str]]:
    return {module_name(p): package_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import of ``graph`` (module -> imported modules) that the rule forbids."""
    broken = []
    for module, imports in graph.items():
        part = part_of(module)
        for target in sorted(imports):
            other = part_of(target)
            if part == "__init__" or (other != part and other not in ALLOWED.get(part, set())):
                broken.append(f"{module} ({part}) -> {target} ({other})")
    return broken


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (the modules in order), or None."""
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        if state.get(module) == 2:
            return None
        if state.get(module) == 1:
            return [*path[path.index(module):], module]
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            found = visit(target, [*path, module])
            if found:
                return found
        state[module] = 2
        return None

    return next((found for module in graph if (found := visit(module, []))), None)


def test_every_import_follows_the_dependency_rule():
    graph = modules()
    assert all(part_of(m) in ALLOWED or part_of(m) == "__init__" for m in graph), sorted(graph)
    assert not [t for imports in graph.values() for t in imports if t not in graph]
    assert not violations(graph), "imports against the rule:\n" + "\n".join(violations(graph))


def test_the_module_graph_has_no_cycle():
    assert cycle(modules()) is None, " -> ".join(cycle(modules()))


def test_the_checks_see_lazy_imports_upward_imports_and_cycles(tmp_path):
    """What the two checks above would report, on a made-up module and graph."""
    source = tmp_path / "lazy.py"
    source.write_text("import torch\n\ndef f():\n    from grerank_dist.training.train import train\n\n"
                      "if __name__ == '__main__':\n    from grerank_dist.cli import main\n")
    assert package_imports(source) == {"training.train"}
    assert violations({"method.relax": {"training.train"}, "training.train": set()}) == [
        "method.relax (method) -> training.train (training)"]
    assert violations({"evaluation.mine": {"demos.demo"}}) == ["evaluation.mine (evaluation) -> demos.demo (demos)"]
    assert cycle({"perf.bench": {"perf.traffic"}, "perf.traffic": {"perf.bench"}}) == ["perf.bench", "perf.traffic", "perf.bench"]


@pytest.mark.parametrize("old,new", [("grerank_dist.relax", "grerank_dist.method.relax"),
                                     ("grerank_dist.train", "grerank_dist.training.train"),
                                     ("grerank_dist.generator", "grerank_dist.interface"),
                                     ("grerank_dist.bench", "grerank_dist.perf.bench")])
def test_old_module_paths_import_the_moved_module_and_name_its_new_path(old, new):
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        moved = importlib.import_module(old)
    assert moved is importlib.import_module(new)
    assert moved.__spec__.name == new


def test_old_data_names_resolve_with_their_new_module():
    import grerank_dist.data as data
    from grerank_dist.data.collate import Collator
    from grerank_dist.interface import Batch

    with pytest.warns(DeprecationWarning, match="grerank_dist.data.Collator moved to grerank_dist.data.collate.Collator"):
        assert data.Collator is Collator
    with pytest.warns(DeprecationWarning, match="moved to grerank_dist.interface.Batch"):
        assert data.Batch is Batch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no attribute 'nothing'"):
            data.nothing  # noqa: B018


def test_the_objective_vocabulary_of_the_config_is_the_registry():
    from grerank_dist.config import OBJECTIVE_NAMES
    from grerank_dist.method.objectives import OBJECTIVES

    assert set(OBJECTIVES) == set(OBJECTIVE_NAMES)
