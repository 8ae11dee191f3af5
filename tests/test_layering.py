"""The layering of alignd's packages is a checked contract ([tool.importlinter] in pyproject.toml):
the real tree keeps every contract, and a deliberately wrong import in a scratch copy breaks the
contract it should. Each lint-imports run takes well under a second; nothing in the working tree is
written (the scratch copies are link trees in a temporary folder, see tests/lint_imports.py).
"""

from __future__ import annotations

import tomllib

import lint_imports
import pytest

CONTRACTS = {
    c["id"]: c["name"]
    for c in tomllib.loads((lint_imports.REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
}


def test_the_real_tree_keeps_every_contract():
    result = lint_imports.run(capture=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in CONTRACTS.values():
        assert f"{name} KEPT" in result.stdout


# (module replaced in the scratch copy, the wrong import appended to it, contracts it must break; others
# may break too, through indirect chains: models -> server -> decoding also takes probes to decoding)
WRONG_IMPORTS = {
    "models imports the server": (
        "alignd.models.engine",
        "import alignd.server.app",
        {"layers", "probes-layer", "server-private"},
    ),
    "rewards imports decoding": ("alignd.rewards.base", "import alignd.decoding.rule", {"layers"}),
    "probes import rewards": ("alignd.probes.jobs", "import alignd.rewards.base", {"probes-apart"}),
    "decoding imports probes": ("alignd.decoding.rule", "import alignd.probes.estimators", {"decoding-apart"}),
    "the client imports the settings": ("alignd.clients.client", "import alignd.settings", {"clients"}),
    "protocol imports the errors": ("alignd.protocol.__init__", "import alignd.errors", {"protocol", "clients"}),
}


@pytest.mark.parametrize("case", list(WRONG_IMPORTS), ids=list(WRONG_IMPORTS))
def test_a_wrong_import_breaks_its_contract(case, tmp_path):
    module, wrong, broken = WRONG_IMPORTS[case]
    tree = lint_imports.build_tree(tmp_path)
    original = tree.joinpath(*module.split(".")).with_suffix(".py")
    real_file = original.resolve()
    real_text = real_file.read_text()
    written = lint_imports.override(tree, module, real_text + f"\n{wrong}  # deliberately wrong\n")

    result = lint_imports.run_in_tree(tree, capture=True)

    assert result.returncode != 0, result.stdout + result.stderr
    for contract_id in broken:
        assert f"{CONTRACTS[contract_id]} BROKEN" in result.stdout, (contract_id, result.stdout)
    importer = module.removesuffix(".__init__")
    assert f"{importer} -> {wrong.split()[-1]}" in result.stdout
    # the scratch copy changed, the repository did not
    assert written.is_relative_to(tmp_path) and not written.is_symlink()
    assert real_file.read_text() == real_text and real_file.is_relative_to(lint_imports.REPO)
