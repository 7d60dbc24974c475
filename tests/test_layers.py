"""The package reads as its layers: no import cycles and no import of a higher layer.

Every module under ``embtools/`` is parsed with ``ast``; every import counts, including those
inside functions (a cycle hidden in a function is still a cycle). ``from package import name``
is an edge to the submodule ``package.name`` when there is one, else to the package itself.
The implicit import of a parent package's ``__init__`` is not an edge.

Layers, lowest first (DESIGN.md: files -> source -> kernel -> planner -> result):

0. errors, config, memory: typed errors, hashing, the memory budget
1. kernels/: per-framework scoring and selection
2. backends/: arrays and devices, calling the kernels
3. storage/ (sources of vectors), models and embed (vectors from texts)
4. search/: the request, the planner and the search paths
5. index/
6. store.py: the facade
7. the public package (``embtools/__init__.py``), the command line, demo, corpus, validate, ray
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "embtools"

#: (module name or package prefix, layer); the longest matching prefix wins
LAYERS = {
    "embtools.errors": 0,
    "embtools.config": 0,
    "embtools.memory": 0,
    "embtools.kernels": 1,
    "embtools.backends": 2,
    "embtools.storage": 3,
    "embtools.models": 3,
    "embtools.embed": 3,
    "embtools.search": 4,
    "embtools.index": 5,
    "embtools.store": 6,
    "embtools": 7,
}

#: imports known to close a cycle or cross a layer, each with who removes it. Keep this short:
#: an edge listed here that no longer exists fails the test, so the list only shrinks.
ALLOWED: dict[tuple[str, str], str] = {
}

#: (importer prefix, imported prefix) pairs forbidden whatever the layers say
FORBIDDEN = [
    ("embtools.storage", "embtools.search"),  # sources never know about searches
    ("embtools.storage", "embtools.kernels"),  # kernels are called through the backend
    ("embtools.kernels", "embtools.backends"),
]

#: modules a FORBIDDEN pair still lets through: the quantization code format (pure NumPy, the
#: bytes storage writes into emb_<d>_i8 / emb_<d>_b1), not a compute kernel
FORMAT_MODULES = {("embtools.storage", "embtools.kernels.codes")}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        out[".".join(parts)] = (path, is_pkg)
    return out


def _owner(name: str, modules: dict[str, tuple[Path, bool]]) -> str:
    """The module ``name`` is in (a name imported from a module is not a module)."""
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    """Module -> the embtools modules it imports anywhere in its source."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in modules.items():
        package = name if is_pkg else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(
                    _owner(a.name, modules) for a in node.names if a.name.split(".")[0] == "embtools"
                )
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != "embtools":
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in modules else _owner(source, modules))
        targets.discard(name)
        graph[name] = targets
    return graph


def layer_of(name: str) -> int:
    """The layer of module ``name`` (see the module docstring)."""
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_imports_inside_functions(graph):
    # engine.normalize_rows imports get_backend inside the function; screen imports its kernel so
    assert "embtools.backends" in graph["embtools.search.engine"]
    assert "embtools.kernels.torch_screen" in graph["embtools.search.screen"]


def test_no_import_cycles(graph):
    pruned = {m: {t for t in ts if (m, t) not in ALLOWED} for m, ts in graph.items()}
    assert find_cycle(pruned) is None, " -> ".join(find_cycle(pruned) or [])


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_lower_layers_never_import_higher_ones(graph):
    wrong = sorted(
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, ts in graph.items()
        for t in ts
        if layer_of(t) > layer_of(m) and (m, t) not in ALLOWED
    )
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(("importer", "imported"), FORBIDDEN)
def test_forbidden_imports(graph, importer, imported):
    wrong = sorted(
        f"{m} imports {t}"
        for m, ts in graph.items()
        if _within(m, importer)
        for t in ts
        if _within(t, imported) and (importer, t) not in FORMAT_MODULES
    )
    assert not wrong, "\n".join(wrong)


def test_the_allow_list_only_shrinks(graph):
    stale = sorted(f"{m} -> {t}" for m, t in ALLOWED if t not in graph.get(m, set()))
    assert not stale, f"remove from ALLOWED, these imports are gone: {stale}"


def test_every_module_has_a_layer(graph):
    assert all(isinstance(layer_of(m), int) for m in graph)
    assert layer_of("embtools.kernels.numpy_tiles") < layer_of("embtools.backends.base")
    assert layer_of("embtools.storage.source") < layer_of("embtools.search.engine")
