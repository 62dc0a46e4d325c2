"""The package's shape: layers that import only downward, no import cycle, one loop that imports no
distributed code, no Trainer subclass."""
import ast
import fnmatch
from pathlib import Path

import bpfree

ROOT = Path(bpfree.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each bpfree module -> the bpfree modules it imports anywhere: at module level, inside functions
    and under TYPE_CHECKING alike (a late import is still a dependency)."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        name, package = _module(path), _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("bpfree")}
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                if target and target.startswith("bpfree"):
                    deps.add(target)
                    deps |= {f"{target}.{a.name}" for a in node.names}   # `from pkg import submodule`
        graph[name] = deps
    return {k: {d for d in v if d in graph and d != k} for k, v in graph.items()}


# core (models, rules, the step) -> engine (loop, comm, launch, the Data type, checkpoint files, the
# run's settings) -> session (run set-up, run directories, data loading) -> apps (cli, compare, bench,
# report, transfer, the package root). A module imports only from its own layer or those before it.
LAYERS = {
    "core": ["bpfree.errors", "bpfree.options", "bpfree.registry", "bpfree.precision", "bpfree.optim",
             "bpfree.memory", "bpfree.augment", "bpfree.version", "bpfree.estimators", "bpfree.models*",
             "bpfree.rules*"],
    "engine": ["bpfree.engine*", "bpfree.config", "bpfree.dataset", "bpfree.io"],
    "session": ["bpfree.run", "bpfree.runs", "bpfree.data", "bpfree.images"],
    "apps": ["bpfree", "bpfree.__main__", "bpfree.cli", "bpfree.bench", "bpfree.report", "bpfree.transfer"],
}


def _layer(module: str) -> int:
    found = [i for i, patterns in enumerate(LAYERS.values()) if any(fnmatch.fnmatch(module, p) for p in patterns)]
    assert len(found) == 1, f"{module} belongs to {len(found)} layers; add it to one in LAYERS"
    return found[0]


def test_each_layer_imports_only_from_itself_and_the_layers_below():
    names = list(LAYERS)
    for module, deps in _imports().items():
        for dep in deps:
            assert _layer(dep) <= _layer(module), \
                f"{module} ({names[_layer(module)]}) imports {dep} ({names[_layer(dep)]}), a higher layer"


def test_no_import_cycle():
    graph, state, stack = _imports(), {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "bpfree.engine.loop" in graph and "bpfree.run" in graph


def test_the_loop_imports_no_distributed_code_and_is_not_subclassed():
    loop = (ROOT / "engine" / "loop.py").read_text()
    assert "torch.distributed" not in loop and "import dist" not in loop
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                assert not any(getattr(b, "id", getattr(b, "attr", "")) == "Trainer" for b in node.bases), path
