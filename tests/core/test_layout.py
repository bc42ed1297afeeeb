"""The shape of standby-core, checked from its source: layers, no import circles, sizes.

Every import counts (module level, inside functions, under TYPE_CHECKING). The layers, low
to high, are in docs/architecture.md; a module imports only from its own layer or below.
"""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core" / "src" / "standby" / "core"

LAYERS: list[tuple[str, ...]] = [
    ("errors", "model", "config", "extents", "locks", "tlspin"),
    ("interfaces", "plugins", "testing", "imagefiles"),
    ("state",),
    ("engine",),
    ("lifecycle", "plans", "vault"),
    ("cli", "entry", "__main__"),
]
"""Top-level parts of standby.core, low to high."""
APART = {("lifecycle", "plans"), ("plans", "lifecycle")}
"""Parts of one layer that must not import each other."""
MAX_CLASS, MAX_FUNCTION = 300, 60
LONG_MARK = "# long:"
"""A comment on a def/class line (or the line above) that says why it may be longer."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in CORE.rglob("*.py"):
        rel = path.relative_to(CORE).with_suffix("")
        if "migrations" in rel.parts:
            continue
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["standby.core", *parts]).rstrip(".")] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """standby.core modules that `name` imports (resolved to the longest known module)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            subs = [f"{base}.{a.name}" for a in node.names]
            # `from pkg import submodule` imports the submodule; the package is its parent
            targets = subs if any(t in known for t in subs) else [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("standby.core"):
                found.add(t)
    return found


def _part(module: str) -> str:
    rest = module.removeprefix("standby.core").lstrip(".")
    return rest.split(".")[0] if rest else ""


def _rank(part: str) -> int:
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise AssertionError(f"standby.core.{part} is in no layer of tests/core/test_layout.py")


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: {i for i in _imports(m, p, known) if i != "standby.core"} for m, p in mods.items()}


def test_lower_layers_never_import_higher_ones() -> None:
    wrong = []
    for mod, deps in _graph().items():
        if mod == "standby.core":
            continue
        mine = _part(mod)
        for dep in deps:
            theirs = _part(dep)
            if theirs == mine:
                continue
            if _rank(theirs) > _rank(mine) or (mine, theirs) in APART:
                wrong.append(f"{mod} imports {dep}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == 1:
                circles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "\n".join(circles)


def test_engine_is_not_built_on_the_lifecycle_plans_or_cli() -> None:
    for mod, deps in _graph().items():
        if _part(mod) == "engine":
            assert not {_part(d) for d in deps} & {"lifecycle", "plans", "cli"}, mod


def _marked(lines: list[str], lineno: int) -> bool:
    here = lines[lineno - 1]
    above = lines[lineno - 2] if lineno >= 2 else ""
    return LONG_MARK in here or LONG_MARK in above


def test_classes_and_functions_stay_small() -> None:
    """No class over ~300 lines, no function over ~60, unless a `# long:` reason is beside it."""
    big = []
    for mod, path in _modules().items():
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                limit = MAX_CLASS
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit = MAX_FUNCTION
            else:
                continue
            assert node.end_lineno is not None
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            size = node.end_lineno - first + 1
            if size > limit and not _marked(lines, node.lineno):
                big.append(f"{mod}.{node.name}: {size} lines (limit {limit})")
    assert not big, "\n".join(big)


def test_plugin_contract_stays_where_authors_find_it() -> None:
    for name in ("interfaces", "testing", "errors", "model", "config", "extents"):
        assert (CORE / f"{name}.py").is_file(), name
