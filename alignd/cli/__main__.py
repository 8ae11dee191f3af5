"""``python -m alignd.cli``: the ``alignd`` command, as the console script runs it."""

from alignd.cli.dispatch import main

main()
