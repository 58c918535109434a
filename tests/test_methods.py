"""The method registry (`fliqs.searchers.methods`): one home for every method name.

Each entry must point at code that exists and has the right shape; no product module outside the registry and the
method's own modules may name a method; `fliqs methods` prints the table.
"""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fliqs.errors import BadInput
from fliqs.searchers import methods
from fliqs.trainables.worker import TrainMethod

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("platform", "searchers", "trainables")
# Literals equal to a method name that are not method references: the program's name, and the uniform prior of a
# one-shot controller (`budget.prior=uniform`).
NOT_A_METHOD = {("platform/cli.py", "fliqs"), ("platform/run/config.py", "uniform")}


def _module_file(ref: str) -> str:
    """The repository path of the module named by a "package.module:attr" reference."""
    module = ref.partition(":")[0].split(".")[1:]  # without the leading "fliqs"
    if module[0] in ("searchers", "trainables"):
        return "/".join(module) + ".py"
    return "platform/" + "/".join(module) + ".py"


def _literals() -> list[tuple[str, int, str]]:
    names = set(methods.METHODS) | set(methods.FAMILIES)
    found = []
    for root in PRODUCT:
        for path in sorted((REPO / root).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                    found.append((rel, node.lineno, node.value))
    return found


def test_method_names_are_literals_only_in_the_registry_and_their_own_modules():
    registry = "searchers/methods.py"
    own = {name: {_module_file(r) for r in (m.runner, m.worker, m.searcher) if r}
           for name, m in methods.METHODS.items()}
    stray = [(path, line, value) for path, line, value in _literals()
             if path != registry and (path, value) not in NOT_A_METHOD and path not in own.get(value, ())]
    assert not stray, f"method or family names outside the registry: {stray}"


def test_the_literal_check_can_fail(tmp_path, monkeypatch):
    """The scan sees a method name written in another module (here: a copy of the tree with one added)."""
    for root in PRODUCT:
        (tmp_path / root).mkdir()
        for path in (REPO / root).glob("*.py"):
            (tmp_path / root / path.name).write_text(path.read_text())
    (tmp_path / "trainables" / "plan.py").write_text((REPO / "trainables" / "plan.py").read_text()
                                                      + '\nCHEAT = "edmips"\n')
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert ("trainables/plan.py", "edmips") in {(p, v) for p, _, v in _literals()}


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_entry_points_at_code_of_the_right_shape(name):
    m = methods.METHODS[name]
    assert m.family in methods.FAMILIES and m.summary
    runner = methods.resolve(m.runner)
    assert list(inspect.signature(runner).parameters) == ["run"]  # a RunContext: the plan, where it logs
    if m.runner == methods.TRAIN_ONCE:
        assert m.worker, "a method trained once needs a worker"
    if m.worker:
        assert issubclass(methods.resolve(m.worker), TrainMethod)
    if m.family == methods.MULTI_TRIAL:
        searcher = methods.resolve(m.searcher)
        assert callable(searcher.suggest) and callable(searcher.observe)
    if m.phases:
        assert all(p in methods.METHODS for p in m.phases)
    if m.searches_architecture:
        assert m.supernet


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(BadInput, match="unknown method 'darts'; valid: " + ", ".join(methods.METHODS)):
        methods.get("darts")
    assert methods.DEFAULT in methods.METHODS and set(methods.STUDY_DEFAULT) <= set(methods.METHODS)


def test_cli_lists_the_registry():
    out = subprocess.run([sys.executable, "-m", "fliqs.cli", "methods", "--json"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["name"] for r in rows] == list(methods.METHODS)
    assert {r["name"]: r["family"] for r in rows} == {n: m.family for n, m in methods.METHODS.items()}
