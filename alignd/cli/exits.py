"""How `alignd train` and `alignd select` end: their exit statuses, an error or an interruption reported in
one line with where the finished work is kept, and SIGTERM handled as Ctrl-C is."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

# Exit status of `alignd train` on bad input (argparse's own for a bad command line).
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# After SIGTERM, a run has this long to unwind (engines shut down, the partial folder closed) before it exits
# anyway; its engines then notice their parent is gone and exit too (alignd.vllm_plugin.parent_watch).
SIGTERM_GRACE_S = 10.0


@contextlib.contextmanager
def command_errors(parser: argparse.ArgumentParser, out) -> Iterator[None]:
    """How `alignd train` and `alignd select` end on an error: bad input (data, options, output folder, reward
    or model configuration) in one line with exit status 2, a failed run with 1, an interruption with
    130 and where its finished work is kept. No traceback."""
    from alignd.errors import AligndError, ClientError, ConfigurationError, ModelPreparationError

    prog = parser.prog
    try:
        yield
    except (ClientError, ConfigurationError, ModelPreparationError) as exc:
        parser.exit(EXIT_BAD_INPUT, f"{prog}: error: {' '.join(exc.message.split())}\n")
    except AligndError as exc:
        parser.exit(1, f"{prog}: error: {' '.join(exc.message.split())}\n")
    except KeyboardInterrupt:
        partial = Path(out).expanduser().absolute()
        parser.exit(
            EXIT_INTERRUPTED,
            f"\n{prog}: interrupted; finished work is kept in {partial}.partial/ - run the "
            "same command again to resume\n",
        )


def interrupt_on_sigterm(out_hint: str) -> None:
    """SIGTERM (``kill``, ``docker stop``, a scheduler's preemption) ends a training or selection run as
    Ctrl-C does: KeyboardInterrupt unwinds through the engines' shutdown and keeps the finished work.
    Python's default for SIGTERM is to die at once, which left the run's vLLM engines behind (and as PID 1
    in a container, to ignore it). A KeyboardInterrupt that lands where it is swallowed (seen while vLLM
    starts its engine) must not keep the run going: after ``SIGTERM_GRACE_S`` it exits regardless, and a
    second SIGTERM exits at once. ``alignd serve`` needs none of this: uvicorn handles both signals."""
    import os
    import signal
    import threading

    def leave() -> None:
        sys.stderr.write(f"\nalignd: interrupted by SIGTERM; finished work is kept in {out_hint}\n")
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)

    def interrupt(signum, _frame):
        signal.signal(signal.SIGTERM, lambda *_: leave())
        deadline = threading.Timer(SIGTERM_GRACE_S, leave)
        deadline.daemon = True  # a run that unwinds in time exits with its own status
        deadline.start()
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
