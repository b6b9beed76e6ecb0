"""The package's layout, checked on its source: imports point down the layers, no import circle, modules stay small.

``ORDER`` is the one place the order is written down. A module may import its own layer and the layers below it,
never one above; and no chain of imports may lead back to where it started, within a layer or across. Every
``import`` and ``from ... import`` of tracked_ckpt counts, the lazy ones inside functions too (they run, only
later), and so do the root's lazy exports (``_LAZY`` in ``tracked_ckpt/__init__.py``); imports under
``if TYPE_CHECKING:`` do not (they never run). ``from . import x`` counts as an import of the module ``x`` when
there is one, else of the package itself. Run ``python tests/test_layers.py`` to print every violation at once.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "tracked_ckpt"
MAX_LINES = 500

# Lowest first, one layer a line: its name, then its modules or subpackages (a subpackage covers its modules),
# relative to tracked_ckpt; "__init__" is tracked_ckpt/__init__.py, the public facade: nothing inside imports it.
ORDER = """
core:           errors _version _faults policies manifest refs runtags progress state safe_load data preemption snapshot
store:          store                         # the storage seam: MLflow is called here only
formats:        formats                       # a checkpoint folder's kinds: torch file, DCP, another library's
records:        catalog evals local outbox models runs resolver    # one run's record, in save_dir and in MLflow
run operations: lifecycle maintenance views   # fork and promote, delete and prune, the tables
pipelines:      recording loading             # write and publish; read and restore
session:        session
distributed:    distributed                   # torchrun: ranks, sharded save and load
manager:        restoring manager             # the facade and its load
api:            api export following follow_cmd
frameworks:     frameworks
facade:         __init__
programs:       demo fsdp_demo                # written as a user would, against the facade
cli:            cli __main__
"""
LAYERS = [
    (name.strip(), names.split("#")[0].split())
    for name, names in (line.split(":", 1) for line in ORDER.strip().splitlines())
]


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module (or package), dotted
    where: str  # path:line
    lazy: bool  # inside a function


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, known: set[str], root: Path = ROOT) -> list[Import]:
    """Every import of a tracked_ckpt module that ``name`` can run."""
    tree = ast.parse(path.read_text(), str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[Import] = []

    def add(target: str, node: ast.stmt, lazy: bool) -> None:
        imp = Import(name, target, f"{path.relative_to(root)}:{node.lineno}", lazy)
        if (target == PACKAGE or target.startswith(PACKAGE + ".")) and imp not in found:
            found.append(imp)

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for stmt in child.orelse:
                    visit_one(stmt, lazy)
                continue
            visit_one(child, lazy)

    def visit_one(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, lazy)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base, node, lazy)
        elif (
            isinstance(node, ast.Assign)
            and name == PACKAGE
            and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)
        ):  # the facade's lazy exports: {"name": ".module"}
            assert isinstance(node.value, ast.Dict)
            for v in node.value.values:
                assert isinstance(v, ast.Constant) and isinstance(v.value, str)
                add(PACKAGE + v.value, node, True)
        visit(node, lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def layer_of(name: str) -> int | None:
    rel = "__init__" if name == PACKAGE else name.removeprefix(PACKAGE + ".")
    for i, (_, names) in enumerate(LAYERS):
        if any(rel == n or rel.startswith(n + ".") for n in names):
            return i
    return None


def graph(root: Path = ROOT) -> list[Import]:
    mods = modules(root)
    return [imp for name, path in mods.items() for imp in imports_of(name, path, set(mods), root)]


def describe(imp: Import) -> str:
    lazy = " (inside a function)" if imp.lazy else ""
    src, dst = layer_of(imp.source), layer_of(imp.target)
    layers = f" [{LAYERS[src][0]} -> {LAYERS[dst][0]}]" if src is not None and dst is not None else ""
    return f"{imp.where}: {imp.source} imports {imp.target}{lazy}{layers}"


def unplaced(root: Path = ROOT) -> list[str]:
    return [f"{p.relative_to(root)}: {n} is in no layer" for n, p in modules(root).items() if layer_of(n) is None]


def upward(root: Path = ROOT) -> list[str]:
    bad = []
    for imp in graph(root):
        src, dst = layer_of(imp.source), layer_of(imp.target)
        if src is not None and dst is not None and dst > src:
            bad.append(describe(imp))
    return bad


def circles(root: Path = ROOT) -> list[str]:
    """Each strongly connected group of modules (an import circle), with the imports that close it."""
    edges: dict[str, list[Import]] = {}
    for imp in graph(root):
        if imp.target != imp.source:
            edges.setdefault(imp.source, []).append(imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm; the package is small enough to recurse
        index[v] = low[v] = len(index)
        stack.append(v)
        for imp in edges.get(v, []):
            w = imp.target
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return [
        f"circle {' -> '.join(shortest_circle(g, edges))} (imports among {', '.join(sorted(g))}):\n      "
        + "\n      ".join(describe(i) for v in sorted(g) for i in edges[v] if i.target in g)
        for g in groups
    ]


def shortest_circle(group: set[str], edges: dict[str, list[Import]]) -> list[str]:
    """One shortest way round the circle, from its first module back to it, to read before the full list."""
    start = min(group)
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted({i.target for i in edges.get(v, []) if i.target in group}):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                todo.append(w)
    raise AssertionError(f"no way round {group}")  # a strongly connected group always has one


def oversized(root: Path = ROOT) -> list[str]:
    sizes = {p: len(p.read_text().splitlines()) for p in modules(root).values()}
    return [f"{p.relative_to(root)}: {n} lines (at most {MAX_LINES})" for p, n in sizes.items() if n > MAX_LINES]


def report(found: list[str], what: str) -> str:
    return f"{len(found)} {what}:\n  " + "\n  ".join(found)


def test_every_module_has_a_layer() -> None:
    found = unplaced()
    assert not found, report(found, "modules in no layer: add each to ORDER in tests/test_layers.py")


def test_every_name_has_one_layer() -> None:
    names = [n for _, layer in LAYERS for n in layer]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_no_import_points_up() -> None:
    found = upward()
    assert not found, report(found, "imports of a higher layer (ORDER in tests/test_layers.py, lowest first)")


def test_no_import_circle() -> None:
    found = circles()
    assert not found, report(found, "import circles")


def test_no_module_is_over_500_lines() -> None:
    found = oversized()
    assert not found, report(found, "modules too long: split them")


def test_the_checks_see_what_they_must() -> None:
    """The parsing itself: a lazy import counts, a TYPE_CHECKING one does not, ``from . import x`` finds x."""
    g = graph()
    pairs = {(i.source, i.target, i.lazy) for i in g}
    assert ("tracked_ckpt.session", "tracked_ckpt.lifecycle", True) in pairs  # inside open()
    assert not any(i.source == "tracked_ckpt.session" and not i.lazy and i.target.endswith("lifecycle") for i in g)
    assert ("tracked_ckpt.cli", "tracked_ckpt.cli.follow", False) in pairs  # from . import follow, ...
    assert ("tracked_ckpt", "tracked_ckpt.manager", True) in pairs  # _LAZY
    assert layer_of("tracked_ckpt.store.lease") == 1 and layer_of("tracked_ckpt") == len(LAYERS) - 3


if __name__ == "__main__":  # print everything at once, for a root given on the command line (default: this checkout)
    where = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    for title, found in [
        ("modules in no layer", unplaced(where)),
        ("upward imports", upward(where)),
        ("import circles", circles(where)),
        ("modules over 500 lines", oversized(where)),
    ]:
        print(report(found, title) if found else f"0 {title}")
    sys.exit(1 if any([unplaced(where), upward(where), circles(where), oversized(where)]) else 0)
