"""The code keeps the shape the README promises: every module is in the README's module map,
functions in the library stay under 60 lines, and model/ imports only torch."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ("model", "train", "launch", "tools")


def _modules():
    for pkg in LIBRARY:
        for p in sorted((REPO / pkg).rglob("*.py")):
            if p.name not in ("__init__.py", "__main__.py"):
                yield p


def test_every_module_is_in_the_readme_module_map():
    text = (REPO / "README.md").read_text()
    block = text[text.index("\nmodel/ "):]
    block = block[:block.index("```")]
    named = set(re.findall(r"[A-Za-z_]+", block))
    missing = [str(p.relative_to(REPO)) for p in _modules() if p.stem not in named]
    assert not missing, f"modules the README's module map does not name: {missing}"


def test_no_function_in_the_library_is_over_60_lines():
    long = []
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_model_imports_only_torch_and_the_standard_library():
    import sys

    allowed = {"torch", "model", "__future__"} | set(sys.stdlib_module_names)
    bad = []
    for p in sorted((REPO / "model").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{p.name}: {n}" for n in names if n.split(".")[0] not in allowed]
    assert not bad, bad
