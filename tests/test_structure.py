"""The package's shape: no import circle (imports inside functions and under ``if TYPE_CHECKING`` count
too), imports between the packages go one way (each package's ``__init__`` says which), no module over
~500 lines."""

import ast
from pathlib import Path

from launchers import ROOT

PACKAGE = ROOT / "disttrain"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The disttrain modules ``path`` imports anywhere: in functions and under ``if TYPE_CHECKING`` too (a
    module typed against another depends on it as much as one that calls it)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}


def test_no_import_circle():
    graph = _graph()
    # a package's __init__ is imported by its submodules' imports anyway; only module-to-module edges count
    edges = {m: {d for d in deps if not (m.startswith(d + ".") and d in graph)} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(edges[module]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert "disttrain.trainer" in graph and graph["disttrain.trainer"], "the import graph was not read"


#: Package -> what its modules may import of disttrain (each ``__init__.py`` says why).
ALLOWED = {
    "disttrain.input": ("disttrain.input", "disttrain.backends"),
    "disttrain.loop": ("disttrain.loop", "disttrain.input", "disttrain.backends",
                       "disttrain.callbacks", "disttrain.metrics", "disttrain.nonfinite"),
}
#: The leaf modules the loop may import: they import nothing of disttrain but the backends.
LEAVES = ("disttrain.callbacks", "disttrain.metrics", "disttrain.nonfinite")
#: What the backends must not import: the layers above them.
ABOVE_BACKENDS = ("disttrain.input", "disttrain.loop", "disttrain.trainer", "disttrain.checkpoint")


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_packages_import_one_way():
    graph = _graph()
    rules = {**ALLOWED, **{leaf: ("disttrain.backends",) for leaf in LEAVES}}
    wrong = []
    for module, deps in graph.items():
        deps = deps - {"disttrain"}  # the package's __init__ (lazy names): imported by any import anyway
        for package, allowed in rules.items():
            if _within(module, [package]):
                wrong += [f"{module} imports {d} (allowed: {', '.join(allowed)})" for d in deps
                          if not _within(d, allowed)]
        if _within(module, ["disttrain.backends"]):
            wrong += [f"{module} imports {d}, a layer above the backends" for d in deps if _within(d, ABOVE_BACKENDS)]
    assert wrong == [], wrong
    assert graph["disttrain.loop.step_logs"] and graph["disttrain.input.data"], "the import graph was not read"


def test_no_module_over_500_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}, sorted(sizes.items(), key=lambda kv: -kv[1])[:5]


POSITION_FIELDS = {"global_step", "epoch", "epoch_step", "epoch_steps"}


def test_only_the_loop_writes_the_run_position():
    """The trainer's RunPosition (and the trainer's position properties) are assigned in trainer.py only."""
    writers = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "trainer.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in (t for group in targets for t in (group.elts if isinstance(group, ast.Tuple) else [group])):
                if isinstance(target, ast.Attribute) and target.attr in POSITION_FIELDS and \
                        ast.unparse(target.value).split(".")[-1] in ("position", "trainer"):
                    writers.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(target)}")
    assert writers == [], writers
