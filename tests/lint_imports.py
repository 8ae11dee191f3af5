"""import-linter (``lint-imports``) on alignd's layering contracts ([tool.importlinter] in pyproject.toml),
on the repository as it is or on a scratch copy with one module replaced.

The folders server/, decoding/, models/, ... are installed as ``alignd.server``, ``alignd.decoding``, ... by
a package-dir mapping; ``alignd/`` holds a symbolic link to each of them, so that the source tree is the
package tree import-linter (grimp) walks, and plain ``lint-imports`` in the repository checks every
contract (``make test`` runs it). :func:`build_tree` lays a scratch copy out as links (nothing in the
working tree is written), and :func:`override` replaces one module in it: tests/test_layering.py uses them
to show that a wrong import breaks a contract.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT_PACKAGE = "alignd"
SKIP = {"__pycache__"}
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # older 2.x releases colour their output even into a pipe


def build_tree(dest: Path, repo: Path = REPO) -> Path:
    """A scratch copy of ``repo``'s package under ``dest``: a real ``alignd/`` folder whose entries link
    to the repository's (the subpackages through alignd/'s own links), beside a link to its
    pyproject.toml (the contracts); returns ``dest``, the folder to run lint-imports in."""
    (dest / "pyproject.toml").symlink_to(repo / "pyproject.toml")
    root = dest / ROOT_PACKAGE
    root.mkdir(parents=True)
    for entry in sorted((repo / ROOT_PACKAGE).iterdir()):
        if entry.name not in SKIP:
            (root / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
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


def run_in_tree(
    tree: Path, args: Sequence[str] = (), *, capture: bool = False, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``lint-imports`` in ``tree`` (the repository, or a copy from build_tree) with the contracts of
    its pyproject.toml. With ``capture``, stdout and stderr come back as plain text (no
    colour codes)."""
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), environment.get("PYTHONPATH", "")) if p)
    environment.pop("PYTHONSAFEPATH", None)
    # cwd: the tree, whose alignd/ comes first on the path; lint-imports reads the pyproject.toml of its
    # working folder (a config argument's syntax changed within 2.x)
    cmd = [*lint_imports_command(), "--no-cache", *args]
    result = subprocess.run(cmd, cwd=tree, env=environment, text=True, capture_output=capture)
    if capture:
        result.stdout, result.stderr = ANSI_ESCAPE.sub("", result.stdout), ANSI_ESCAPE.sub("", result.stderr)
    return result


def run(args: Sequence[str] = (), *, repo: Path = REPO, capture: bool = False) -> subprocess.CompletedProcess:
    """``lint-imports`` on the repository's packages as they are now."""
    return run_in_tree(repo, args, capture=capture)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _, rest = parser.parse_known_args(argv)
    return run(rest).returncode


if __name__ == "__main__":
    sys.exit(main())
