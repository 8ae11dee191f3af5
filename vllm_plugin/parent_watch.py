"""EngineCore ends with the process that started it.

vLLM 0.32 starts EngineCore as a ``multiprocessing`` child of the frontend (``CoreEngineProcManager`` in
``vllm/v1/engine/utils.py``) and watches it from the parent (``monitor_engine_liveness``), but nothing
watches the other way: EngineCore notices a dead frontend only through a ZMQ socket that never errors,
and the death pipe of ``vllm/v1/executor/multiproc_executor.py`` runs from the executor to its workers
only (on the CPU with one worker there is no such executor at all). So a frontend killed with SIGKILL
(or by a default SIGTERM, as an ``alignd train`` run was) left EngineCore processes behind, holding
their memory, until someone killed them by pid.

The ``vllm.general_plugins`` entry runs in every vLLM process, EngineCore included
(``EngineCore.__init__`` calls ``load_general_plugins``): there :func:`watch_parent` starts a daemon
thread that sees its parent go (the parent pid changes: the orphan is re-parented to init or a
subreaper) and sends the process SIGTERM, which EngineCore's own handler turns into its orderly
shutdown; if it is still alive after a grace period, it exits hard. Only EngineCore processes are
watched: a frontend (``alignd serve``, ``vllm serve``) is a top-level process whose parent may go
legitimately (a shell that started it with nohup).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
# After SIGTERM, EngineCore shuts its executor down; this long, then os._exit.
GRACE_S = 10.0
WATCHED_PROCESS_PREFIX = "EngineCore"  # vLLM's name for the process: "EngineCore" or "EngineCore_DP<n>"

_started = False


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_INTERVAL_S)
    logger.warning(
        "alignd: the process that started this vLLM %s (pid %d) is gone: shutting down",
        multiprocessing.current_process().name,
        parent_pid,
    )
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os._exit(1)


def watch_parent() -> bool:
    """In an EngineCore process, start the watch (once); elsewhere do nothing. Returns whether it started."""
    global _started
    if _started or multiprocessing.parent_process() is None:
        return False
    if not multiprocessing.current_process().name.startswith(WATCHED_PROCESS_PREFIX):
        return False
    _started = True
    threading.Thread(target=_watch, args=(os.getppid(),), name="alignd-parent-watch", daemon=True).start()
    return True
