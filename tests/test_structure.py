"""The library's shape: module dependencies go one way, so each layer can be read and tested on its own."""

import ast
from pathlib import Path

import medcot_lib

PACKAGE = Path(medcot_lib.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """Modules of this package that `path` imports anywhere, function-level imports included."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1] if node.level > 1 else package
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            candidates = [target] + [f"{target}.{alias.name}".lstrip(".") for alias in node.names]
            found.update(c for c in candidates if c in modules)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medcot_lib."):
            target = node.module.removeprefix("medcot_lib.")
            found.update(c for c in [target] + [f"{target}.{a.name}" for a in node.names] if c in modules)
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files) - {"__init__"}
    return {name: _imports(path, name, modules) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"recipe": {"data"}, "data": {"models"}, "models": {"recipe"}}) == ["data", "models", "recipe", "data"]
    assert find_cycle({"data": {"recipe"}, "models": {"recipe"}, "recipe": set()}) is None


def test_the_library_has_no_import_cycle():
    graph = import_graph()
    assert {"recipe", "data", "models", "smoke"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_recipe_schema_sits_at_the_bottom():
    """recipe is schema and validation: it may use errors and fileio, nothing that reads data or loads models."""
    assert import_graph()["recipe"] <= {"errors", "fileio"}


def notebook_modules(notebook: Path) -> set[str]:
    import json
    import re

    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return {name.strip() for group in re.findall(r"from medcot_lib import ([\w, ]+)", source) for name in group.split(",")}


def test_the_readme_maps_each_notebook_to_the_modules_it_calls():
    import re

    readme = Path("README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- notebook-modules:start -->(.+?)<!-- notebook-modules:end -->", readme, re.S).group(1)
    listed = {m.group(1): set(m.group(2).split(", ")) for m in re.finditer(r"^\| `(\w+)` \| ([\w, ]+) \|$", block, re.M)}
    notebooks = sorted(Path("notebooks").glob("*.ipynb"))
    assert set(listed) == {nb.stem for nb in notebooks}
    for notebook in notebooks:
        assert listed[notebook.stem] == notebook_modules(notebook) - {"recipe", "pipeline"}, notebook.name
