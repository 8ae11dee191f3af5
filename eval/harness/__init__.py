"""The alignment-quality evaluation behind ``eval/quality.py`` (the script and its façade), one job a module:

- ``paths``: the default prompts, results folder and plot;
- ``metrics``: per-response and per-method metrics, and the prompt-response coherence;
- ``replay``: transformers replays of the KL that vLLM keeps inside its step (value head, implicit Q);
- ``plan``: the methods at their settings, the main table's and the sweep's, and the prompts;
- ``partial_log``: the resumable log of finished responses;
- ``runner``: every prompt through one method, on the server's own stack;
- ``provenance``: the machine, libraries and server settings saved with the results;
- ``evaluation``: the whole evaluation and its summaries;
- ``report``, ``plots``, ``combine``: tables, output files, pictures, and one report from two runs;
- ``cli``: the command line.

eval/ is a folder of scripts, not a package: it is on ``sys.path`` (``quality.py`` puts it there), and this
package is imported as ``harness``.
"""
