"""No import cycles between the library's files; triton_kernels depends only on formats and errors.

The graph is built statically from the source tree: every ``import`` and
``from ... import`` anywhere in a file counts, including those inside functions
(a lazy import hides a cycle from the interpreter, not from the design), and so
does ``importlib.import_module``/``__import__`` of a literal name or of a
module-level string constant. Only ``if TYPE_CHECKING:`` blocks are left out:
they never run. ``triton_kernels/`` is read as ``pyquant.triton_kernels``, the
name it is installed under.

An edge goes to the most specific file an import names: ``from pkg import name``
is an edge to ``pkg/name.py`` when ``name`` is a submodule, otherwise to
``pkg/__init__.py``. Parent packages that Python initialises on the way are not
edges, or every package would form a cycle with its own submodules.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
# (source folder, module name it is imported as)
PACKAGES = (("pyquant", "pyquant"), ("triton_kernels", "pyquant.triton_kernels"))
# What DESIGN.md allows triton_kernels to import from the rest of pyquant.
TRITON_ALLOWED = ("pyquant.formats", "pyquant.errors")


class Edge(NamedTuple):
    source: str  # importing module
    target: str  # imported module
    line: int


def module_files() -> Dict[str, Path]:
    """Module name -> file, for every .py file of the library."""
    modules = {}
    for folder, prefix in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([prefix, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(nodes) -> Iterator[ast.AST]:
    """Every Import/ImportFrom and ``import_module``/``__import__`` call in ``nodes``, at any
    depth, except under ``if TYPE_CHECKING:``."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_nodes(node.orelse)
        else:
            if isinstance(node, ast.Call) and _called_name(node.func) in ("import_module", "__import__") and node.args:
                yield node
            yield from _import_nodes(ast.iter_child_nodes(node))


def _called_name(func: ast.expr) -> str | None:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _string_constants(tree: ast.Module) -> Dict[str, str]:
    """Module-level ``NAME = "text"`` assignments (an ``import_module(NAME)`` names a module through one)."""
    consts = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    consts[target.id] = node.value.value
    return consts


def _internal(name: str, modules: Dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is a library module (``pyquant.ops.x.attr`` -> ``pyquant.ops.x``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: Dict[str, Path]) -> List[Edge]:
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    consts = _string_constants(tree)
    edges = []
    for node in _import_nodes([tree]):
        if isinstance(node, ast.Call):
            arg = node.args[0]
            if isinstance(arg, ast.Name):
                arg = ast.Constant(consts.get(arg.id))
            targets = [arg.value] if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else []
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                # `from .x import` in pkg/mod.py is relative to pkg; in pkg/__init__.py to pkg itself.
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            # A module name (import, import_module) that is no file here, such as the
            # compiled pyquant._C, is no edge; a `from` import falls back to its package.
            if isinstance(node, ast.ImportFrom):
                resolved = _internal(target, modules)
            else:
                resolved = target if target in modules else None
            edge = Edge(module, resolved, node.lineno)
            if resolved is not None and resolved != module and edge not in edges:
                edges.append(edge)
    return edges


def import_graph() -> Dict[str, List[Edge]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def strongly_connected_components(graph: Dict[str, List[Edge]]) -> List[List[str]]:
    """Tarjan's algorithm, iterative (recursion depth should not grow with the library)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    work: List[Tuple[str, Iterator[str]]] = []
    components = []

    def push(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        work.append((node, iter(sorted({e.target for e in graph[node]}))))

    for root in sorted(graph):
        if root in index:
            continue
        push(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    push(succ)
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def _file(module: str, modules: Dict[str, Path]) -> str:
    return str(modules[module].relative_to(ROOT))


def describe_cycle(component: List[str], graph: Dict[str, List[Edge]], modules: Dict[str, Path]) -> str:
    members = set(component)
    lines = [f"{len(component)} files:"]
    for module in component:
        inside = sorted({(e.line, e.target) for e in graph[module] if e.target in members})
        imports = ", ".join(f"{_file(target, modules)} (line {line})" for line, target in inside)
        lines.append(f"  {_file(module, modules)} -> {imports}")
    return "\n".join(lines)


def test_no_import_cycles_between_files():
    graph = import_graph()
    modules = module_files()
    cycles = [c for c in strongly_connected_components(graph) if len(c) > 1]
    report = "\n".join(describe_cycle(c, graph, modules) for c in sorted(cycles, key=len, reverse=True))
    assert not cycles, f"{len(cycles)} import cycle(s) between files:\n{report}"


def test_triton_kernels_import_only_formats_and_errors_from_pyquant():
    graph = import_graph()
    modules = module_files()
    offenders = [
        f"{_file(e.source, modules)}:{e.line} imports {e.target}"
        for name, edges in sorted(graph.items())
        if name == "pyquant.triton_kernels" or name.startswith("pyquant.triton_kernels.")
        for e in edges
        if not (e.target == "pyquant.triton_kernels" or e.target.startswith("pyquant.triton_kernels."))
        and not any(e.target == ok or e.target.startswith(ok + ".") for ok in TRITON_ALLOWED)
    ]
    allowed = " and ".join(TRITON_ALLOWED)
    assert not offenders, f"triton_kernels may import only {allowed} from pyquant:\n" + "\n".join(offenders)


# --- the graph builder itself, on a synthetic tree ------------------------------------------
def test_graph_resolves_relative_lazy_and_submodule_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "pyquant"
    (pkg / "sub").mkdir(parents=True)
    (tmp_path / "triton_kernels").mkdir()
    files = {
        "pyquant/__init__.py": "from . import a\n",
        "pyquant/a.py": "def f():\n    from .sub import b\n",  # lazy, and a submodule by name
        "pyquant/sub/__init__.py": "X = 1\n",
        "pyquant/sub/b.py": (
            "from ..sub import X\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pyquant import a\n"
        ),
        "pyquant/sub/c.py": "import pyquant.a\nfrom .. import sub\nimport pyquant._C\n",
        "pyquant/sub/d.py": (
            "NAME = 'pyquant.triton_kernels'\ndef f():\n    import importlib\n    return importlib.import_module(NAME)\n"
        ),
        "triton_kernels/__init__.py": "from ..a import f\n",
        "triton_kernels/k.py": "from . import configs\nfrom pyquant.sub.b import thing\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph = {m: sorted({e.target for e in edges}) for m, edges in import_graph().items()}
    assert graph == {
        "pyquant": ["pyquant.a"],
        "pyquant.a": ["pyquant.sub.b"],
        "pyquant.sub": [],
        "pyquant.sub.b": ["pyquant.sub"],  # TYPE_CHECKING import left out
        "pyquant.sub.c": ["pyquant.a", "pyquant.sub"],  # pyquant._C is no file of the tree
        "pyquant.sub.d": ["pyquant.triton_kernels"],
        "pyquant.triton_kernels": ["pyquant.a"],
        "pyquant.triton_kernels.k": ["pyquant.sub.b", "pyquant.triton_kernels"],
    }
    # A lazy import closing a loop is a cycle.
    (pkg / "sub" / "b.py").write_text("def g():\n    import pyquant.a\n")
    cycles = [c for c in strongly_connected_components(import_graph()) if len(c) > 1]
    assert cycles == [["pyquant.a", "pyquant.sub.b"]]


# Each package of pyquant may import only from the layers below it (DESIGN.md's
# data flow): the formats know nothing of kernels, the op layer nothing of the
# algorithms that call it, the algorithms nothing of modules, files or models.
LAYERS = (
    ("pyquant.errors", "pyquant.validation", "pyquant._ext", "pyquant._version"),
    ("pyquant.formats",),
    ("pyquant.ops", "pyquant.triton_kernels"),
    ("pyquant.algorithms", "pyquant.methods", "pyquant.quantize", "pyquant.config"),
    ("pyquant.nn",),
    ("pyquant.pipeline", "pyquant.io", "pyquant.evaluation", "pyquant.integrations"),
)


def _layer(module: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return None


def test_layers_import_only_downwards():
    graph = import_graph()
    modules = module_files()
    offenders = []
    for name, edges in sorted(graph.items()):
        src = _layer(name)
        for e in edges:
            dst = _layer(e.target)
            if src is not None and dst is not None and dst > src:
                offenders.append(f"{_file(e.source, modules)}:{e.line} imports {e.target} (a higher layer)")
    assert not offenders, "\n".join(offenders)
