"""Dependencies between modes' subpackages flow one way: data -> engine -> calibration ->
thresholds -> evaluation -> cli. Lazy imports inside functions count: a cycle they hide is still
a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import modes

PACKAGE = Path(modes.__file__).parent
LAYERS = [  # each may import only from the layers before it
    {"errors"},
    {"io", "defaults", "ratios", "adapters", "parallel", "routing"},
    {"checkpoints"},
    {"data", "loading"},
    {"engine"},
    {"policies"},
    {"plan"},
    {"calibration"},
    {"thresholds"},
    {"evaluation"},
    {"bundled", "serving"},
    {"cli"},
]


def imported_parts(tree: ast.AST) -> set[str]:
    """Top-level parts of modes a module imports (``modes.engine.x`` and ``from modes import engine``)."""
    parts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "modes":
                parts.update(alias.name for alias in node.names)
            elif node.module.startswith("modes."):
                parts.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            parts.update(a.name.split(".")[1] for a in node.names if a.name.startswith("modes."))
    return parts


def dependency_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if part in ("__init__", "__main__"):
            continue
        graph.setdefault(part, set()).update(imported_parts(ast.parse(path.read_text())) - {part})
    return graph


def test_every_part_of_the_package_has_a_layer():
    layered = set().union(*LAYERS)
    assert set(dependency_graph()) <= layered, set(dependency_graph()) - layered


def test_dependencies_flow_one_way():
    rank = {part: number for number, layer in enumerate(LAYERS) for part in layer}
    upward = [
        f"{part} -> {target}"
        for part, targets in dependency_graph().items()
        for target in targets
        if rank[target] >= rank[part]
    ]
    assert not upward, f"imports against the layering (or between peers): {upward}"


def test_no_import_cycle_between_subpackages():
    graph = dependency_graph()
    visiting, done = set(), set()

    def visit(part: str, path: list[str]) -> None:
        assert part not in visiting, f"import cycle: {' -> '.join([*path, part])}"
        if part in done:
            return
        visiting.add(part)
        for target in sorted(graph.get(part, ())):
            visit(target, [*path, part])
        visiting.discard(part)
        done.add(part)

    for part in graph:
        visit(part, [])
