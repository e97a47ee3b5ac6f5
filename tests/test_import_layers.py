"""batchlm's modules import one another without cycles, and its packages point down the layer order.

The graph counts every import that runs: at module level and inside functions (the lazy imports that
keep start-up short still tie two modules together). Imports under `if TYPE_CHECKING:` are left out:
only the type checker reads them."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import batchlm

SOURCE_ROOT = Path(batchlm.__file__).resolve().parent.parent

# Top-level packages and modules of batchlm, lowest first. A module may import from its own layer
# or any layer below it, never from one above.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset(
        {
            "sampling_params",
            "sampling_defaults",
            "outputs",
            "request",
            "config",
            "flags",
            "startup_log",
            "logging_setup",
            "gc_tuning",
            "cpu_wait_policy",
            "json_files",
            "unicode_text",
            "json_text",
            "validation_errors",
            "dir_locks",
            "temp_dirs",
            "stop_signals",
        }
    ),
    frozenset({"core"}),
    frozenset({"kernels", "parallel", "tokenizer"}),
    frozenset({"attention", "layers"}),
    frozenset({"models"}),
    frozenset({"structured", "tools", "reasoning"}),
    frozenset({"sampling"}),
    frozenset({"runner"}),
    frozenset({"executor"}),
    frozenset({"engine"}),
    frozenset({"backends"}),
    frozenset(
        {"server", "cli", "__main__", "generate_cli", "run_batch", "batch_client", "batch_file", "bench", ""}
    ),  # "" is the batchlm package's own __init__
)

ImportGraph = dict[str, set[str]]


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages under `root`."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under `node` except those in an `if TYPE_CHECKING:` body."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children: list[ast.AST] = list(node.orelse)
    else:
        children = list(ast.iter_child_nodes(node))
    for child in children:
        yield from runtime_imports(child)


def _targets(statement: ast.Import | ast.ImportFrom, package: str, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that an import statement loads (a name imported from a package counts
    as its submodule when there is one)."""
    if isinstance(statement, ast.Import):
        return {alias.name for alias in statement.names if alias.name in modules}
    base = statement.module or ""
    if statement.level:
        anchor = package.split(".")[: len(package.split(".")) - statement.level + 1]
        base = ".".join([*anchor, *([statement.module] if statement.module else [])])
    found = set()
    for alias in statement.names:
        submodule = f"{base}.{alias.name}"
        if submodule in modules:
            found.add(submodule)
        elif base in modules:
            found.add(base)
    return found


def import_graph(root: Path) -> ImportGraph:
    modules = module_files(root)
    graph: ImportGraph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = set().union(*(_targets(s, package, modules) for s in runtime_imports(tree)))
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: ImportGraph) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph is acyclic."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for following in sorted(graph.get(module, ())):
            cycle = visit(following)
            if cycle is not None:
                return cycle
        path.pop()
        done.add(module)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle is not None:
            return cycle
    return None


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for index, members in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS")


def upward_imports(graph: ImportGraph) -> list[str]:
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(module)
    )


def test_batchlm_has_no_import_cycle() -> None:
    assert find_cycle(import_graph(SOURCE_ROOT)) is None


def test_batchlm_packages_import_only_their_layer_or_below() -> None:
    assert upward_imports(import_graph(SOURCE_ROOT)) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_a_cycle_through_a_lazy_import_is_found(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "batchlm/__init__.py": "",
            "batchlm/core/__init__.py": "",
            "batchlm/core/a.py": "from batchlm.core import b\n",
            "batchlm/core/b.py": "def f():\n    from .c import g\n",
            "batchlm/core/c.py": "import batchlm.core.a\n",
        },
    )
    assert find_cycle(import_graph(tmp_path)) == [
        "batchlm.core.a",
        "batchlm.core.b",
        "batchlm.core.c",
        "batchlm.core.a",
    ]


def test_type_checking_imports_and_outside_modules_are_not_counted(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "batchlm/__init__.py": "",
            "batchlm/a.py": "from typing import TYPE_CHECKING\nimport os\nif TYPE_CHECKING:\n    from batchlm import b\n",
            "batchlm/b.py": "from batchlm.a import x\n",
        },
    )
    graph = import_graph(tmp_path)
    assert graph == {"batchlm": set(), "batchlm.a": set(), "batchlm.b": {"batchlm.a"}}
    assert find_cycle(graph) is None


def test_an_import_from_a_higher_layer_is_reported(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "batchlm/__init__.py": "",
            "batchlm/core/__init__.py": "",
            "batchlm/core/step.py": "from batchlm.engine.client import EngineClient\n",
            "batchlm/engine/__init__.py": "",
            "batchlm/engine/client.py": "from batchlm.core import step\n",
        },
    )
    graph = import_graph(tmp_path)
    assert upward_imports(graph) == ["batchlm.core.step -> batchlm.engine.client"]
    assert find_cycle(graph) is not None
