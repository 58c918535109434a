"""The rules ARCHITECTURE.md states, kept by scanning the product modules' source (lazy imports included):

* the packages form layers, and a module imports only from its own layer or the layers below (`LAYERS`);
* Ray is imported under `trainables/` only;
* the configuration is loaded by the command line only (`load_config`);
* no product module is over 450 lines, no function over 80.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = {"platform": "fliqs", "searchers": "fliqs.searchers", "trainables": "fliqs.trainables"}
# Bottom to top; each entry is a package (or a top-level module) of `fliqs`.
LAYERS = ["errors", "choices", "quant", "models", "data", "training", "searchers", "run", "analysis", "export",
          "trainables", "cli"]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 80


def _modules() -> dict[str, Path]:
    """{dotted module name: path} of every product module."""
    out = {}
    for folder, package in PRODUCT.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((package, *parts))] = path
    return out


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    return LAYERS.index(top)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every fliqs and Ray import in the file, wherever it is (module level or inside a function)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "fliqs":  # from fliqs import cli
                found += [(node.lineno, f"fliqs.{alias.name}") for alias in node.names]
    return found


def test_every_product_module_lies_in_a_layer():
    assert all(module.count(".") and module.split(".")[1] in LAYERS for module in _modules()), \
        sorted(m for m in _modules() if m.split(".")[1] not in LAYERS)


def test_a_module_imports_only_from_its_layer_or_below():
    upward = []
    for module, path in _modules().items():
        for line, imported in _imports(path):
            if imported.startswith("fliqs.") and imported.split(".")[1] in LAYERS and \
                    _layer(imported) > _layer(module):
                upward.append(f"{path.relative_to(REPO)}:{line} imports {imported}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_cycle_among_product_modules():
    graph = {m: set() for m in _modules()}
    for module, path in _modules().items():
        for _, imported in _imports(path):
            target = next((m for m in sorted(graph, key=len, reverse=True)
                           if imported == m or imported.startswith(m + ".")), None)
            if target and target != module and not module.startswith(target + "."):  # a package's own __init__
                graph[module].add(target)
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*trail, m, n]
            if n not in state and (cycle := visit(n, [*trail, m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [])):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_ray_is_imported_under_trainables_only():
    outside = [f"{path.relative_to(REPO)}:{line}" for module, path in _modules().items()
               if not module.startswith("fliqs.trainables") for line, name in _imports(path)
               if name == "ray" or name.startswith("ray.")]
    assert not outside, outside


def test_the_configuration_is_loaded_by_the_command_line_only():
    callers = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "load_config":
                callers.append(module)
    assert set(callers) <= {"fliqs.cli"}, sorted(set(callers))


def test_modules_and_functions_stay_small():
    long_modules = {str(p.relative_to(REPO)): n for p in _modules().values()
                    if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    long_functions = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long_modules and not long_functions, (long_modules, long_functions)


def test_the_scan_sees_an_upward_import(tmp_path, monkeypatch):
    """The layer rule can fail: a copy of a low module that imports a high one is reported."""
    low = tmp_path / "platform" / "quant"
    low.mkdir(parents=True)
    (low / "bad.py").write_text("def f():\n    from fliqs.trainables.fit import fit\n")
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    monkeypatch.setattr(f"{__name__}.PRODUCT", {"platform": "fliqs"})
    with pytest.raises(AssertionError, match="bad.py:2 imports fliqs.trainables.fit"):
        test_a_module_imports_only_from_its_layer_or_below()
