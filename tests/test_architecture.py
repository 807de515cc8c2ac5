"""The package's import structure: no cycle, the documented layers, the harness only as a client.

Every ``import`` is read from the source (module level and inside functions alike), so a cycle
cannot hide behind a function-level import. The layers are those of ``docs/architecture.md``.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_moevement"

# Lower layers never import higher ones. (docs/architecture.md draws the same table.)
LAYERS = [
    ("constants", "logging_utils", "argtypes", "config"),
    ("runtime",),
    ("state", "schedule", "sim"),
    ("snapshot", "upstream"),
    ("replay", "durable"),
    ("policy", "strategy"),
    ("baselines", "recovery"),
    ("launch", "megatron"),
    ("harness", "profiler", "cli", "convert"),
]
APPLICATIONS = ("harness", "profiler", "cli", "convert")
"""Clients of the library: they may import the harness; nothing else may."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """``module -> {imported megatron_moevement modules}`` (every import in the file)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                found = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in found:
                # The longest known module the imported name lives in.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith("megatron_moevement") and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def _relative(module: str) -> str:
    return module[len("megatron_moevement.") :] if "." in module else ""


def _layer(module: str) -> int:
    rel = _relative(module)
    best, where = -1, None
    for index, names in enumerate(LAYERS):
        for prefix in names:
            if (rel == prefix or rel.startswith(prefix + ".")) and len(prefix) > best:
                best, where = len(prefix), index
    return -1 if where is None else where


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    return _imports()


def test_the_package_has_no_import_cycle(graph):
    assert _cycles(graph) == []


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_library_code_never_imports_the_harness(graph):
    offenders = sorted(
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if _relative(target).startswith("harness")
        and not any(
            _relative(module) == app or _relative(module).startswith(app + ".")
            for app in APPLICATIONS
        )
    )
    assert offenders == []


def test_every_module_has_a_layer_and_imports_only_downwards(graph):
    unplaced = sorted(m for m in graph if m != "megatron_moevement" and _layer(m) < 0)
    assert unplaced == [], "add them to LAYERS (and docs/architecture.md)"
    upward = sorted(
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if module != "megatron_moevement" and _layer(target) > _layer(module)
    )
    assert upward == []


def test_the_architecture_page_names_every_layer():
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for names in LAYERS:
        for name in names:
            assert f"`{name}" in page, name


def test_the_public_surface_resolves():
    import megatron_moevement

    assert megatron_moevement.__all__ == sorted(megatron_moevement._EXPORTS)
    for name in megatron_moevement.__all__:
        assert getattr(megatron_moevement, name).__name__ == name
