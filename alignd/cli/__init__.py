"""The ``alignd`` command line (the console script ``alignd.cli:main``).

    alignd serve [--host H] [--port P] [--model M] [...]   serve the model over HTTP
    alignd prepare-model [--model M]                       convert / locate the model, then exit
    alignd train dpo --out DIR [--reward R] [...]          a baseline aligned to a reward (LoRA adapter)
    alignd train irft --out DIR [--rounds T] [...]         a reward learned from demonstrations (LoRA adapter)
    alignd train value-head --out DIR [--states N] [...]   a value head: Q of the baseline's rollouts, distilled
    alignd select s2l --data FILE --budget B --out DIR     S2L data selection (loss trajectories of a proxy)
    alignd select random --data FILE --budget B --out DIR  a uniform random subset of the same size

Every setting is a flag (``--max-model-len 4096``) and an environment variable
(``ALIGND_MAX_MODEL_LEN=4096``); flags win. JSON-valued settings take JSON on the command line too
(``--rewards '{"mine": {"type": "callable", "path": "pkg.mod:fn"}}'``). ``alignd train`` is described in
docs/TRAINING.md.

One module a part: dispatch (the top-level parser), serve (serve, prepare-model), train_parsers and
value_head_parser (the parsers of `alignd train`), train_command (its runs), select_command (`alignd select`),
train_options (option groups both share), settings_flags (the settings as flags), exits (exit statuses,
errors, interruptions).
"""

from alignd.cli.dispatch import main
from alignd.cli.exits import EXIT_BAD_INPUT, EXIT_INTERRUPTED, SIGTERM_GRACE_S
from alignd.cli.settings_flags import load_settings

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "SIGTERM_GRACE_S", "load_settings", "main"]
