"""The package's import structure: layers, one direction, no cycle.

Read from the source with ``ast`` (nothing is imported), counting imports made
inside functions too: a function-level import is a dependency all the same,
only a later one.  The layers are the ones README's Architecture section lists.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from daskray.backend import Backend
from daskray.runtime.local_session import LocalSession
from daskray.runtime.session import Session

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "daskray"

#: bottom first; a module may import its own layer and those below, never above.
#: A name ending in ".*" covers a package's modules; an exact name wins over it.
LAYERS = [
    ("base", ["daskray.errors", "daskray.backend", "daskray.refs"]),
    ("scheduler core", ["daskray.scheduler", "daskray.scheduler.*"]),
    ("runtime", ["daskray.runtime", "daskray.runtime.*", "daskray.dashboard",
                 "daskray.dashboard.*"]),
    ("calls and sessions", ["daskray.remote_function", "daskray.runtime.session",
                            "daskray.runtime.local_session", "daskray.runtime.start_worker"]),
    ("public API", ["daskray", "daskray.api", "daskray.actors", "daskray.actors.*",
                    "daskray.dask_graph", "daskray.dask_scheduler", "daskray.dask_callbacks",
                    "daskray.distributed_backend", "daskray.distributed_backend.*",
                    "daskray.progress"]),
    ("ml, util and cli", ["daskray.ml", "daskray.ml.*", "daskray.util", "daskray.util.*",
                          "daskray.cli", "daskray.__main__", "daskray.demo"]),
]

#: (importer, imported) -> why this import is allowed to break the rules above
EXCEPTIONS = {
    ("daskray.refs", "daskray"):
        "ObjectRef.__dask_scheduler__ hands a graph to daskray.get, dask's entry point in "
        "the public API, through the package's lazy loader (a worker must not import dask "
        "at start)",
    ("daskray.runtime.start_worker", "daskray.api"):
        "a worker loads the public API the first time it waits for work in vain, "
        "so that its first task calling daskray.get or .remote() does not pay the import",
    ("daskray.api", "daskray.distributed_backend.joining"):
        "init loads the dask.distributed backend on first use: a program on daskray's own "
        "runtime never imports distributed",
    ("daskray.ml", "daskray.ml.torch_model"):
        "TorchModel is loaded on first use: importing it imports torch, an optional extra",
    ("daskray.ml.models", "daskray.ml.torch_model"):
        "TorchModel is loaded on first use: importing it imports torch, an optional extra",
}

#: daskray/ml and daskray/util build on the public API only: these and their own modules
ML = "daskray.ml"
UTIL = "daskray.util"
ML_MAY_IMPORT = {"daskray", "daskray.errors"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path, known: set[str]) -> list[tuple[str, bool]]:
    """(daskray module imported, whether inside a function) for each import in ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([child.module] if child.module else []))
                for alias in child.names:  # "from . import x": x may be a module
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in known else base, in_function))
            visit(child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return [(m, f) for m, f in found if m == "daskray" or m.startswith("daskray.")]


def import_graph() -> dict[str, list[tuple[str, bool]]]:
    """module -> its imports of daskray modules, the allowed exceptions left out."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(paths)
    return {name: [(m, f) for m, f in imports_of(path, known) if (name, m) not in EXCEPTIONS]
            for name, path in paths.items()}


def layer_of(module: str) -> int:
    for index, (_, names) in enumerate(LAYERS):
        if module in names:
            return index
    best = max(((len(n), i) for i, (_, names) in enumerate(LAYERS) for n in names
                if n.endswith(".*") and module.startswith(n[:-1])), default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best[1]


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def in_ml(module: str) -> bool:
    return in_package(module, ML)


def test_no_import_cycle() -> None:
    assert cycles({v: [w for w, _ in edges] for v, edges in import_graph().items()}) == []


def test_ml_uses_only_the_public_api() -> None:
    reach = [f"{v} imports {w}" for v, edges in import_graph().items() if in_ml(v)
             for w, _ in edges if not in_ml(w) and w not in ML_MAY_IMPORT]
    assert reach == []


def test_util_uses_only_the_public_api() -> None:
    reach = [f"{v} imports {w}" for v, edges in import_graph().items() if in_package(v, UTIL)
             for w, _ in edges if not in_package(w, UTIL) and w not in ML_MAY_IMPORT]
    assert reach == []


def test_no_import_goes_up_a_layer() -> None:
    up = [f"{v} ({LAYERS[layer_of(v)][0]}) imports {w} ({LAYERS[layer_of(w)][0]})"
          for v, edges in import_graph().items() for w, _ in edges
          if layer_of(w) > layer_of(v)]
    assert up == []


def test_daskray_modules_are_imported_at_the_top_of_a_module() -> None:
    """A function-level import hides a dependency (and so a cycle) until it runs
    (optional dependencies such as torch are not daskray modules: they may)."""
    late = [f"{v} imports {w} inside a function" for v, edges in import_graph().items()
            for w, in_function in edges if in_function]
    assert late == []


def test_the_checks_see_a_cycle_and_an_upward_import() -> None:
    """The checks themselves: a made-up cycle is found, a made-up upward import too."""
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert layer_of("daskray.api") > layer_of("daskray.runtime.worker") > layer_of("daskray.refs")
    assert layer_of("daskray.scheduler.anything_new") == 1
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("daskray_other.thing")


def test_every_session_offers_the_backend_protocol() -> None:
    """The seam's protocol is what the sessions behind it offer, call for call."""
    calls = [n for n, v in vars(Backend).items() if callable(v) and not n.startswith("_")]
    assert "submit_call" in calls and "get" in calls
    for session in (Session, LocalSession):
        missing = [n for n in calls if not callable(getattr(session, n, None))]
        assert missing == [], f"{session.__name__} lacks {missing}"
