"""Run import-linter (``lint-imports``) on alignd's layering contracts ([tool.importlinter] in pyproject.toml).

    .venv/bin/python tests/lint_imports.py                     # every contract; lint-imports' exit status
    .venv/bin/python tests/lint_imports.py --contract layers   # any other lint-imports options pass through

Why not plain ``lint-imports``: the folders server/, decoding/, models/, ... are installed as
``alignd.server``, ``alignd.decoding``, ... by a package-dir mapping. import-linter's graph builder (grimp)
finds the root package ``alignd`` through the import system and then walks *its folder* (alignd/), where
only cli.py, settings.py and errors.py are: the mapped subpackages would be invisible, and a contract on
them would check nothing. So this script first lays the mapping out as one ``alignd/`` package of
symbolic links in a temporary folder (read from [tool.setuptools.package-dir], so a new mapping is
picked up), puts that folder first on the path, and runs ``lint-imports`` there with the repository's
pyproject.toml. Nothing in the working tree is written.

``override`` replaces single modules in the link tree by other source (tests/test_layering.py uses it
to show that a wrong import breaks a contract).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT_PACKAGE = "alignd"
SKIP = {"__pycache__"}
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # older 2.x releases colour their output even into a pipe


def package_dirs(repo: Path = REPO) -> dict[str, Path]:
    """[tool.setuptools.package-dir] of ``repo``'s pyproject.toml: package name -> folder."""
    config = tomllib.loads((repo / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {name: (repo / folder).resolve() for name, folder in mapping.items()}


def build_tree(dest: Path, repo: Path = REPO) -> Path:
    """Lays the mapped packages out under ``dest`` as one package tree of symbolic links (the root
    package a real folder linking its files, every mapped subpackage a link to its folder), beside a
    link to ``repo``'s pyproject.toml (the contracts); returns ``dest``, the folder to put on the path
    and to run lint-imports in."""
    mapping = package_dirs(repo)
    if ROOT_PACKAGE not in mapping:
        raise ValueError(f"pyproject.toml maps no folder to the root package {ROOT_PACKAGE!r}")
    (dest / "pyproject.toml").symlink_to(repo / "pyproject.toml")
    root = dest / ROOT_PACKAGE
    root.mkdir(parents=True)
    for entry in sorted(mapping[ROOT_PACKAGE].iterdir()):
        if entry.name not in SKIP:
            (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    for name in sorted(mapping, key=lambda n: n.count(".")):
        if name == ROOT_PACKAGE:
            continue
        if not name.startswith(ROOT_PACKAGE + "."):
            raise ValueError(f"{name!r} is not under the root package {ROOT_PACKAGE!r}")
        link = dest.joinpath(*name.split("."))
        _materialize(link.parent, dest)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(mapping[name], target_is_directory=True)
    return dest


def _materialize(folder: Path, dest: Path) -> None:
    """Makes ``folder`` (inside the tree) and its parents real folders whose entries are links to what
    they linked to before, so that one entry in it can be replaced without touching the repository."""
    if folder == dest:
        return
    _materialize(folder.parent, dest)
    if folder.is_symlink():
        target = folder.resolve()
        folder.unlink()
        folder.mkdir()
        for entry in sorted(target.iterdir()):
            if entry.name not in SKIP:
                (folder / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    elif not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a package folder of the tree")


def override(tree: Path, module: str, source: str) -> Path:
    """Replaces ``module`` (a dotted name, a plain module or a package's __init__ through ``pkg.__init__``)
    in the tree by ``source``; the repository's file is not touched. Returns the file written."""
    path = tree.joinpath(*module.split(".")).with_suffix(".py")
    _materialize(path.parent, tree)
    if path.is_symlink():
        path.unlink()
    path.write_text(source)
    return path


def lint_imports_command() -> list[str]:
    """``lint-imports`` of this interpreter's environment."""
    script = Path(sys.executable).with_name("lint-imports")
    if script.is_file():
        return [str(script)]
    found = shutil.which("lint-imports")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]


def run_in_tree(tree: Path, args: Sequence[str] = (), *, capture: bool = False,
                env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package tree ``tree`` (see build_tree) with the contracts of the
    pyproject.toml linked there. With ``capture``, stdout and stderr come back as plain text (no
    colour codes)."""
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), environment.get("PYTHONPATH", "")) if p)
    environment.pop("PYTHONSAFEPATH", None)
    # cwd: the tree, not the repository (whose own alignd/ folder would shadow the tree's); lint-imports
    # reads the pyproject.toml of its working folder (a config argument's syntax changed within 2.x)
    cmd = [*lint_imports_command(), "--no-cache", *args]
    result = subprocess.run(cmd, cwd=tree, env=environment, text=True, capture_output=capture)
    if capture:
        result.stdout, result.stderr = ANSI_ESCAPE.sub("", result.stdout), ANSI_ESCAPE.sub("", result.stderr)
    return result


def run(args: Sequence[str] = (), *, repo: Path = REPO, capture: bool = False) -> subprocess.CompletedProcess:
    """``lint-imports`` on the repository's packages as they are now (a fresh link tree, removed after)."""
    with tempfile.TemporaryDirectory(prefix="alignd-lint-imports-") as tmp:
        tree = build_tree(Path(tmp), repo)
        return run_in_tree(tree, args, capture=capture)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _, rest = parser.parse_known_args(argv)
    return run(rest).returncode


if __name__ == "__main__":
    sys.exit(main())
