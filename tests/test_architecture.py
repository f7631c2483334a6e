"""The layering the README promises: the science library never imports Flower, and the two Flower
adapters never import each other (what both need lives in the neutral ``osteofl`` package root)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: str) -> list[tuple[str, str]]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                found += [(path.name, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                found += [(path.name, node.module)]
    return found


@pytest.mark.parametrize("folder, forbidden", [
    ("osteo_model", ("flwr", "osteofl.client", "osteofl.server", "osteofl.simulation", "osteofl.protocol",
                     "osteofl.runtime")),
    ("client", ("osteofl.server",)),
    ("server", ("osteofl.client",)),
    ("osteofl", ("osteofl.client", "osteofl.server")),
])
def test_layering(folder, forbidden):
    bad = [(f, m) for f, m in _imports(folder) if any(m == x or m.startswith(x + ".") for x in forbidden)]
    assert not bad, f"{folder}/ imports {bad}"
