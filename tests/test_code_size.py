"""Modules that each do one job: no source module over 600 lines and no function over 80, outside tests/
(issue 26). Fast: reads the sources with Python's ast, imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the top-level folders of the source (alignd/ holds the CLI and the settings; its other entries are symlinks
# to these folders, so only its own files and folders are read there)
SOURCE_FOLDERS = (
    "clients",
    "decoding",
    "models",
    "probes",
    "protocol",
    "rewards",
    "server",
    "train",
    "vllm_plugin",
    "eval",
    "bench",
)
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def source_files(root: Path = ROOT) -> list[Path]:
    files: list[Path] = []
    for entry in (root / "alignd").iterdir():
        if entry.is_symlink():
            continue
        files += [entry] if entry.suffix == ".py" else entry.rglob("*.py") if entry.is_dir() else []
    for folder in SOURCE_FOLDERS:
        files += (root / folder).rglob("*.py")
    return sorted(files)


def oversized(
    files: list[Path], max_module: int = MAX_MODULE_LINES, max_function: int = MAX_FUNCTION_LINES
) -> list[str]:
    """'path: N lines' for each module over ``max_module`` and 'path:line name: N lines' for each function or
    method over ``max_function`` (from its ``def`` to its last line, decorators excluded)."""
    found = []
    for path in files:
        text = path.read_text()
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        if (lines := len(text.splitlines())) > max_module:
            found.append(f"{name}: {lines} lines (module)")
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > max_function:
                    found.append(f"{name}:{node.lineno} {node.name}: {length} lines (function)")
    return found


def test_no_module_over_600_lines_and_no_function_over_80():
    files = source_files()
    assert len(files) > 100  # the folders were found
    assert oversized(files) == []


def test_the_check_finds_an_oversized_module_and_function(tmp_path):
    """The check can fail: a module of 601 lines holding an 81-line function is reported twice."""
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    module = tmp_path / "big.py"
    module.write_text(f"def long_one():\n{body}\n" + "\n" * (601 - 81))
    assert len(module.read_text().splitlines()) == 601
    found = oversized([module])
    assert len(found) == 2 and "601 lines (module)" in found[0] and "long_one: 81 lines (function)" in found[1]
    module.write_text("def short():\n    return 1\n")
    assert oversized([module]) == []
