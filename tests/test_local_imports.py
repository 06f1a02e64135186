"""Imports sit at the top of a module. A function-local import must say why in a comment (an
optional or slow dependency, the CLI's start-up time, an import cycle being removed): on the
import line or on the comment line(s) right above the run of imports it belongs to."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kdscale"


def uncommented_local_imports(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().split("\n")

        def visit(node, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if in_function and isinstance(child, (ast.Import, ast.ImportFrom)) and not _explained(lines, child):
                    found.append(f"{path.relative_to(root.parent)}:{child.lineno}: {lines[child.lineno - 1].strip()}")
                visit(child, inside)

        visit(ast.parse("\n".join(lines)), False)
    return found


def _explained(lines: list[str], node: ast.stmt) -> bool:
    if any("#" in lines[k - 1] for k in range(node.lineno, node.end_lineno + 1)):
        return True
    k = node.lineno - 1
    while k >= 1:
        text = lines[k - 1].strip()
        if text.startswith("#"):
            return True
        if not (text.startswith(("import ", "from ")) or text == ""):
            return False
        k -= 1
    return False


def test_every_function_local_import_says_why():
    found = uncommented_local_imports(PACKAGE)
    assert not found, "function-local imports without a reason comment:\n" + "\n".join(found)


def test_the_check_finds_an_unexplained_local_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text("import os\n\n\ndef f():\n    x = 1\n    import json\n    return json, x\n\n\n"
                                "def g():\n    # optional dependency\n    import yaml\n    return yaml\n")
    assert uncommented_local_imports(pkg) == ["pkg/mod.py:6: import json"]
