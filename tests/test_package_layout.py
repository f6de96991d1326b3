"""The package's shape: module-level imports between tritondet's modules form no cycle."""

import ast
from pathlib import Path

import tritondet

PACKAGE_ROOT = Path(tritondet.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("tritondet", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The tritondet modules that ``path`` (module ``name``) imports when it is first imported."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    imported = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            submodules = {f"{source}.{alias.name}" for alias in node.names} & modules
            # `from . import x` imports the submodule x; `from .x import f` imports x itself.
            imported.update(submodules or {source})
    return (imported & modules) - {name}


def test_no_import_cycles():
    paths = {_module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}
    modules = set(paths)
    graph = {name: _module_level_imports(path, name, modules) for name, path in paths.items()}
    finished: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(name) :], name]))
        if name in finished:
            return
        for target in sorted(graph[name]):
            visit(target, [*trail, name])
        finished.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert "tritondet.ops.pooling" in graph["tritondet.ops"]  # the walk sees package-internal imports
