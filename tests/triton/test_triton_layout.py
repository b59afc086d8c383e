"""``triton_kernels`` is a leaf of pyquant: of pyquant it imports only the formats
and the errors (ops and algorithms call into it, never the reverse), and its own
modules import each other without a cycle. Read from the source (no import)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "triton_kernels"
PACKAGE = "pyquant.triton_kernels"
ALLOWED = ("pyquant.formats", "pyquant.errors")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path):
    """Every module ``name`` imports, at module level or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            # ``from pkg import mod`` imports the submodule when there is one
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            yield from subs or [base]


GRAPH = {name: sorted(set(_imports(name, path))) for name, path in MODULES.items()}


def test_every_folder_of_the_layout_is_there():
    for sub in ("decode", "matmul", "matmul.launch", "solvers.hqq", "solvers.gptq", "tuning.autotune",
                "tuning.cache", "tuning.configs", "tools.sass", "tools.bench"):
        assert f"{PACKAGE}.{sub}" in MODULES, sub


def test_only_formats_and_errors_of_pyquant():
    bad = {
        name: [m for m in deps if m.split(".")[0] == "pyquant" and not m.startswith(PACKAGE)
               and not m.startswith(ALLOWED)]
        for name, deps in GRAPH.items()
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"triton_kernels imports pyquant beyond {ALLOWED}: {bad}"


def test_no_import_cycle():
    inner = {n: [d for d in deps if d in MODULES and d != n] for n, deps in GRAPH.items()}
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for d in inner[n]:
            if state.get(d) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(d):] + [n, d])}")
            if d not in state:
                visit(d, stack + [n])
        state[n] = "done"

    for n in inner:
        if n not in state:
            visit(n, [])


def test_tuning_never_imports_the_kernels():
    """autotune takes a launch callable: the launcher imports tuning, not the reverse."""
    for name, deps in GRAPH.items():
        if name.startswith(f"{PACKAGE}.tuning"):
            assert not [d for d in deps if d.startswith(f"{PACKAGE}.") and not d.startswith(f"{PACKAGE}.tuning")], name
