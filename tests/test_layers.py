"""The packages' one-way flow (docs/design.md): probes → head scores → profile → decoder.

`registry` imports nothing of ours, `decoder` only `registry`, `headfinder` and `calibration` only
`decoder` and `registry` — function-local imports included, since those hide edges too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAY_IMPORT = {
    "registry": set(),
    "decoder": {"registry"},
    "headfinder": {"decoder", "registry"},
    "calibration": {"decoder", "registry"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a source file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_package_imports_only_the_packages_below_it(package):
    crossings = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, module in imported_packages(path)
        if module.split(".")[0] in MAY_IMPORT and module.split(".")[0] not in MAY_IMPORT[package] | {package}
    ]
    assert not crossings, f"{package} may import only {sorted(MAY_IMPORT[package]) or 'nothing of ours'}: " + "; ".join(crossings)
