"""docs/architecture.md names what exists: every file path it gives is in the repository, every
`Class.member` it names is defined on that class, and its layer order is the one
tests/test_import_layers.py enforces."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from test_import_layers import LAYERS

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "batchlm"
DOC = REPO / "docs" / "architecture.md"

# A relative path with at least one folder: `server/protocol.py`, `tests/test_x.py`, `server/ui/`.
_FILE_PATH = re.compile(r"(?<![\w./$#-])((?:[A-Za-z_][\w-]*/)+[\w-]+\.(?:py|c|js|sh|md|toml))\b")
_FOLDER = re.compile(r"`((?:[A-Za-z_][\w-]*/)+)`")
# `Class.member` in prose or code: the class is looked up among batchlm's own.
_MEMBER = re.compile(r"\b([A-Z][A-Za-z0-9]*)\.([a-z_][a-z0-9_]*)\b")
_LAYER_ITEM = re.compile(r"^(\d+)\. ", re.M)


def missing_paths(doc: str, roots: tuple[Path, ...]) -> list[str]:
    """The paths `doc` names that lie under none of `roots` (a path is read from the package's root
    first, as the page writes `engine/client.py`, then from the repository's)."""
    named = {m.group(1) for m in _FILE_PATH.finditer(doc)} | {m.group(1) for m in _FOLDER.finditer(doc)}
    return sorted(path for path in named if not any((root / path).exists() for root in roots))


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def class_members(package: Path) -> dict[str, set[str]]:
    """Class name -> what its body defines (methods, fields, nested classes, `self.x` assignments),
    with what its bases define when they are batchlm's; classes of one name are merged."""
    members: dict[str, set[str]] = defaultdict(set)
    bases: dict[str, set[str]] = defaultdict(set)
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            bases[node.name] |= {b.id for b in node.bases if isinstance(b, ast.Name)}
            for item in ast.walk(node):
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    members[node.name].add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members[node.name].add(item.target.id)
                elif isinstance(item, ast.Assign):
                    members[node.name] |= {t.id for t in item.targets if isinstance(t, ast.Name)}
                elif isinstance(item, ast.Attribute) and _is_self(item.value):
                    members[node.name].add(item.attr)

    def with_bases(name: str, seen: frozenset[str]) -> set[str]:
        found = set(members[name])
        for base in bases[name] - seen:
            if base in members:
                found |= with_bases(base, seen | {base})
        return found

    return {name: with_bases(name, frozenset({name})) for name in members}


def unknown_members(doc: str, classes: dict[str, set[str]]) -> list[str]:
    """`Class.member` references in `doc` whose class is batchlm's but defines no such member."""
    return sorted(
        {
            f"{owner}.{member}"
            for owner, member in _MEMBER.findall(doc)
            if owner in classes and member not in classes[owner]
        }
    )


def documented_layers(doc: str, package: Path) -> list[set[str]]:
    """The numbered "Layer order" list: in each item, the backticked names that are batchlm's top-level
    packages (`core/`) or modules (`cli`); `__init__` stands for the package's own module, ""."""
    section = doc.split("**Layer order**", 1)[1].split("\n\n", 1)[1].split("\n\n", 1)[0]
    items = _LAYER_ITEM.split(section)[1:]
    layers = []
    for text in items[1::2]:
        names = set()
        for token in re.findall(r"`([^`]+)`", text):
            if token == "__init__":
                names.add("")
            elif token.endswith("/") and (package / token).is_dir():
                names.add(token.rstrip("/"))
            elif re.fullmatch(r"\w+", token) and (package / f"{token}.py").is_file():
                names.add(token)
        layers.append(names)
    return layers


def test_every_path_the_page_names_exists() -> None:
    assert missing_paths(DOC.read_text(encoding="utf-8"), (PACKAGE, REPO)) == []


def test_every_class_member_the_page_names_is_defined() -> None:
    assert unknown_members(DOC.read_text(encoding="utf-8"), class_members(PACKAGE)) == []


def test_the_layer_order_is_the_one_the_import_test_enforces() -> None:
    assert documented_layers(DOC.read_text(encoding="utf-8"), PACKAGE) == [set(layer) for layer in LAYERS]


def test_the_checks_report_what_does_not_exist(tmp_path: Path) -> None:
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "step.py").write_text(
        "class Step:\n    size: int\n    def run(self) -> None:\n        self.done = True\n", encoding="utf-8"
    )
    (tmp_path / "cli.py").write_text("", encoding="utf-8")
    doc = (
        "`core/step.py` and core/gone.py, `core/` and `kernels/`; Step.run, Step.done, Step.size and "
        "Step.walk; Other.thing.\n\n**Layer order** (lowest first):\n\n1. `core/`, `cli`\n"
        "2. `kernels/` (missing), `Step`\n\n**Typing.**\n"
    )
    assert missing_paths(doc, (tmp_path,)) == ["core/gone.py", "kernels/"]
    assert unknown_members(doc, class_members(tmp_path)) == ["Step.walk"]
    assert documented_layers(doc, tmp_path) == [{"core", "cli"}, set()]
