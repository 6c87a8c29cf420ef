"""The package's shape, as docs/architecture.md draws it: rooms on floors, imports only running
down, no import circle, files and functions small enough to read.

Imports are read from the source (module level and inside functions alike), so a lazy import
that would close a circle counts too.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "megalite")

# Each room may import only rooms on lower floors (and itself).
FLOORS = {
    "config": 0, "parallel_state": 0,
    "tensor_parallel": 1,
    "data": 2, "model": 2, "pipeline_parallel": 2, "distributed": 2,
    "optimizer": 3,
    "checkpointing": 4, "planning": 4,
    "training": 5, "interop": 5,
}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def _modules() -> dict[str, str]:
    out = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
    return out


def _imports(module: str, path: str, modules: dict) -> set[str]:
    """The megalite modules ``module`` imports (the most specific existing module of each name)."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" for a in node.names] or [base]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in modules and name != module:
                found.add(name)
    return found


def _room(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def _graph():
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_room_has_a_floor():
    rooms = {_room(m) for m in _modules()} - {""}
    assert rooms == set(FLOORS), f"rooms without a floor or floors without a room: {rooms ^ set(FLOORS)}"


def test_imports_only_run_down():
    upward = [f"{m} imports {t}" for m, targets in _graph().items() for t in targets
              if _room(m) and _room(t) and _room(m) != _room(t) and FLOORS[_room(t)] >= FLOORS[_room(m)]]
    assert not upward, "imports that run up a floor (or sideways):\n  " + "\n  ".join(sorted(upward))


def test_no_import_circles():
    graph, index, low, stack, on_stack, circles = _graph(), {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                circles.append(sorted(component))
    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_files_and_functions_are_small():
    too_long = []
    for module, path in _modules().items():
        source = open(path).read()
        if source.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{path}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name}: {length} lines")
    assert not too_long, "over the size limits:\n  " + "\n  ".join(too_long)


def test_the_check_sees_a_planted_upward_import(tmp_path):
    """The import reader resolves relative imports, lazy ones included (a planted circle is seen)."""
    modules = {"megalite.model.gpt": "", "megalite.training.loop": "", "megalite.training": ""}
    planted = tmp_path / "gpt.py"
    planted.write_text("def f():\n    from ..training.loop import train\n")
    modules["megalite.model.gpt"] = str(planted)
    assert _imports("megalite.model.gpt", str(planted), modules) == {"megalite.training.loop"}
