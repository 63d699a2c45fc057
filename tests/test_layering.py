"""Imports point one way (STYLE 1): no cycle between the package's layers, the low layers
(prompts, rewards) never name the worlds built on them, and each layer imports alone."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "flowdppo"
_ENV = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


def _is_module(parts: list[str]) -> bool:
    path = SRC.joinpath(*parts)
    return path.is_dir() or path.with_suffix(".py").is_file()


def _imported_modules(file: Path) -> list[list[str]]:
    """Every flowdppo module ``file`` imports, at module level or inside a function."""
    parts = list(file.relative_to(SRC).with_suffix("").parts)
    package = parts[:-1]
    found = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name.split(".") for a in node.names if a.name.split(".")[0] == "flowdppo"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + (node.module or "").split(".")
                base = [p for p in base if p]
            elif (node.module or "").split(".")[0] == "flowdppo":
                base = node.module.split(".")
            else:
                continue
            found += [[*base, a.name] if _is_module([*base, a.name]) else base for a in node.names]
    return found


def layer_graph() -> dict[str, set[str]]:
    """Layer (``flowdppo.<name>``, or the package top) -> the layers it imports."""
    def layer(parts: list[str]) -> str:
        return parts[1] if len(parts) > 1 else "flowdppo"

    edges: dict[str, set[str]] = defaultdict(set)
    for file in PACKAGE.rglob("*.py"):
        here = layer(list(file.relative_to(SRC).with_suffix("").parts))
        for target in _imported_modules(file):
            if layer(target) != here:
                edges[here].add(layer(target))
    return edges


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_the_layer_graph_has_no_cycle():
    edges = layer_graph()
    assert {"config", "rewards", "worlds", "trainer"} <= set(edges)  # the scan saw the package
    assert _find_cycle(edges) is None, f"import cycle between layers: {_find_cycle(edges)}"
    assert "worlds" in edges["trainer"]  # a real upward edge exists, and is from above
    assert _find_cycle({**edges, "rewards": edges["rewards"] | {"worlds"}}) is not None


def test_low_layers_do_not_name_the_worlds():
    """The issue's acceptance: ``grep -rn worlds src/flowdppo/prompts.py src/flowdppo/rewards/``."""
    files = [PACKAGE / "prompts.py", *sorted((PACKAGE / "rewards").rglob("*.py"))]
    assert len(files) > 5
    hits = [f"{f.relative_to(SRC)}:{n}" for f in files
            for n, line in enumerate(f.read_text().splitlines(), 1) if "worlds" in line]
    assert hits == []
    edges = layer_graph()
    assert edges["prompts"] <= {"registry"}
    assert not edges["rewards"] & {"worlds", "trainer", "config", "models", "prompts"}
    assert edges["algorithms"] <= {"dynamics", "registry"}  # the math stays pure


# Module imported first in a fresh interpreter -> layers that must not be loaded by it.
FRESH_IMPORTS = {
    "flowdppo.prompts": {"worlds", "rewards", "models", "trainer", "config"},
    "flowdppo.rewards": {"worlds", "trainer", "config", "models", "prompts"},
    "flowdppo.algorithms": {"worlds", "trainer", "config", "models", "rewards", "prompts"},
    "flowdppo.models": {"worlds", "trainer", "config", "rewards", "prompts"},
    "flowdppo.worlds.shapes_rewards": {"trainer", "config"},
    "flowdppo.worlds.digits": {"trainer", "config"},
    "flowdppo.config": {"worlds", "trainer"},
    "flowdppo.cli": {"worlds", "config"},
}
_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted({m.split(".")[1] for m in sys.modules if m.startswith("flowdppo.")})))
"""


@pytest.mark.parametrize("module", sorted(FRESH_IMPORTS))
def test_each_layer_imports_alone_in_a_fresh_interpreter(module):
    """A cycle shows up as an ImportError of a partly initialised module when the wrong
    module is imported first; a backward import shows up as a layer loaded too early."""
    result = subprocess.run([sys.executable, "-c", _PROBE, module], capture_output=True,
                            text=True, timeout=120, env=_ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert module.split(".")[1] in loaded
    assert not loaded & FRESH_IMPORTS[module], f"{module} loaded {loaded & FRESH_IMPORTS[module]}"


def test_a_registry_read_loads_the_worlds_from_the_package_top():
    probe = ("import sys; from flowdppo.prompts import PROMPT_SOURCES; "
             "before = 'flowdppo.worlds' in sys.modules; ok = 'shapes' in PROMPT_SOURCES; "
             "print(before, ok, 'flowdppo.builtins' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, env=_ENV)
    assert result.stdout.split() == ["False", "True", "True"], result.stderr[-2000:]


def test_no_test_imports_conftest_as_a_module():
    tests = [t for t in sorted(Path(__file__).parent.glob("*.py")) if t.name != Path(__file__).name]
    assert len(tests) > 20
    offenders = [t.name for t in tests
                 if "from conftest" in t.read_text() or "import conftest" in t.read_text()]
    assert offenders == []
