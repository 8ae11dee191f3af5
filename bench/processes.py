"""A command run in its own process group, with its output in a log file: the one helper for the servers
that the benchmarks and the tests start (``alignd serve``, ``vllm serve``, Prometheus).

    with ManagedProcess([sys.executable, "-m", "alignd.cli", "serve"], name="alignd serve",
                        log_path=Path("serve.log"), base_url=f"http://127.0.0.1:{port}", env=env) as server:
        server.wait_ready()          # until GET base_url + ready_path answers 200 (or the process exits)
        ...
    # left: SIGTERM to the whole group, SIGKILL after a grace period, then to whatever is left of it

Its own process group (a new session) means that the processes it starts (vLLM's engine core, for
one) are stopped with it. Standard library and httpx only; bench/ is not a package, so the bench
scripts and the tests load this file by its path (as module ``bench_processes``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessExitedError(RuntimeError):
    """The process ended before it was ready (the message has the log's tail)."""


class NotReadyError(TimeoutError):
    """The process did not become ready in time (the message has the log's tail)."""


class ManagedProcess:
    """``cmd`` in its own process group, stdout and stderr to ``log_path`` (overwritten).

    ``base_url`` + ``ready_path`` is what ``wait_ready`` polls. Not started by the constructor:
    ``start()`` (returns self) or ``with`` (starts if needed, stops on leaving)."""

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        log_path: str | Path,
        name: str | None = None,
        base_url: str | None = None,
        ready_path: str = "/health",
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        start_timeout: float = 600.0,
        poll_interval: float = 1.0,
        term_timeout: float = 30.0,
        kill_timeout: float = 10.0,
        tail_lines: int = 40,
    ) -> None:
        self.cmd = [str(c) for c in cmd]
        self.name = name or Path(self.cmd[0]).name
        self.log_path = Path(log_path)
        self.base_url = base_url.rstrip("/") if base_url else None
        self.ready_path = ready_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.poll_interval = poll_interval
        self.term_timeout = term_timeout
        self.kill_timeout = kill_timeout
        self.tail_lines = tail_lines
        self.proc: subprocess.Popen | None = None

    # ------------------------------------------------------------------ state
    @property
    def pid(self) -> int:
        """The leader's pid, which is also the process group's id."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def ready_url(self) -> str | None:
        return None if self.base_url is None else self.base_url + self.ready_path

    def log_tail(self, lines: int | None = None) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-(lines or self.tail_lines) :])

    # ------------------------------------------------------------------ life cycle
    def start(self) -> ManagedProcess:
        if self.proc is not None:
            raise RuntimeError(f"{self.name} was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:  # the child keeps its own copy of the descriptor
            # a new session, so a new process group: stop() reaches the children too
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def wait_ready(
        self,
        timeout: float | None = None,
        *,
        url: str | None = None,
        poll_interval: float | None = None,
        request_timeout: float = 2.0,
    ) -> float:
        """Polls ``url`` (default: base_url + ready_path) until it answers 200; returns the seconds
        waited. ProcessExitedError if the process ends first, NotReadyError after ``timeout``."""
        url = url or self.ready_url
        if url is None:
            raise ValueError(f"{self.name}: no URL to wait for (no base_url)")
        timeout = self.start_timeout if timeout is None else timeout
        interval = self.poll_interval if poll_interval is None else poll_interval
        start = time.monotonic()
        while True:
            if not self.running:
                code = self.returncode if self.proc is not None else "never started"
                raise ProcessExitedError(f"{self.name} exited with {code} before it was ready:\n{self.log_tail()}")
            try:
                if httpx.get(url, timeout=request_timeout).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            if time.monotonic() - start >= timeout:
                raise NotReadyError(f"{self.name} not ready after {timeout:.0f} s ({url}):\n{self.log_tail()}")
            time.sleep(interval)

    def stop(self) -> int | None:
        """SIGTERM to the process group, SIGKILL if the leader is still there after ``term_timeout``,
        then SIGKILL to what is left of the group (children that outlived the leader). Returns the
        leader's exit status (None if it was never started). Safe to call more than once."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(self.term_timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(self.kill_timeout)
        self._signal_group(signal.SIGKILL)
        return self.proc.returncode

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already

    def __enter__(self) -> ManagedProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "not started" if self.proc is None else f"pid {self.proc.pid}, returncode {self.proc.poll()}"
        return f"ManagedProcess({self.name!r}, {state}, log {self.log_path})"
