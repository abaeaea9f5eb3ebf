"""The layers of dataflowmm import in one direction: no import circle, and the core never
imports the kit.

Every module under dataflowmm/ is parsed with `ast` (nothing is imported): every import
statement counts, at module level, inside functions and classes, and under
`if TYPE_CHECKING:`. Relative imports are resolved; `from dataflowmm.x import y` imports
module `dataflowmm.x.y` when that is a module, else `dataflowmm.x`; a package's
`__init__.py` is the package's module. (A module named only as a string for importlib,
as `dataflowmm.models.tiny.TRAINED_MODELS` names the kit's trained models, is no import.)
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "dataflowmm"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
KIT = f"{PACKAGE}.kit"
# Modules outside the core that may import the kit, each with its reason.
CLI_ONLY = {
    f"{PACKAGE}.cli": "the `dataflowmm` command: `models train` trains and ships the shapes-world models",
    f"{PACKAGE}.scaffold": "writes the scaffolds (gpu_pipelines/), which may use the kit",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """dataflowmm modules that module `name` (file `path`) imports, anywhere in its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # `import dataflowmm.a.b` names module dataflowmm.a.b (the nearest that exists).
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.split(".")[0] == PACKAGE and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """Each strongly connected component of more than one module (Tarjan), sorted, with one
    shortest cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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
    return [(component, _cycle_within(graph, set(component))) for component in components]


def _cycle_within(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module: a -> b -> ... -> a."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for other in sorted(graph[node] & component):
            if other == start:
                return paths[node] + [start]
            if other not in paths:
                paths[other] = paths[node] + [other]
                queue.append(other)
    raise AssertionError("a strongly connected component without a cycle")


def is_core(name: str) -> bool:
    return not (name == KIT or name.startswith(KIT + ".") or name in CLI_ONLY)


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    # function-level: model_source imports models.tiny inside functions
    assert "dataflowmm.models.tiny" in graph["dataflowmm.serving.model_source"]
    # `from package import module` names the module; TYPE_CHECKING blocks count
    assert "dataflowmm.serving.clip" in graph["dataflowmm.serving"]
    # `from dataflowmm.kit import shapes_recipes` names the submodule, not the package
    assert "dataflowmm.kit.shapes_recipes" in graph["dataflowmm.kit.trained_models"]


def test_the_core_never_imports_the_kit():
    graph = import_graph()
    offenders = [f"{name} imports {target}" for name, targets in sorted(graph.items()) if is_core(name)
                 for target in sorted(targets) if target == KIT or target.startswith(KIT + ".")]
    assert not offenders, "the core imports the kit:\n" + "\n".join(offenders)


def test_models_never_import_serving():
    graph = import_graph()
    offenders = [f"{name} imports {target}" for name, targets in sorted(graph.items())
                 if name.startswith("dataflowmm.models")
                 for target in sorted(targets) if target.startswith("dataflowmm.serving")]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(
        f"{' -> '.join(cycle)} (modules importing each other in a circle: {', '.join(component)})"
        for component, cycle in cycles)


def test_cycle_finder_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(graph) == [(["a", "b", "c"], ["a", "b", "c", "a"])]
