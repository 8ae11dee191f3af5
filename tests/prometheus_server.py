"""A real Prometheus for tests: scrape a target, query it, and read the dashboard's PromQL.

    with PrometheusServer("127.0.0.1:8000") as prom:
        prom.wait_for("alignd_requests_total")
        prom.query('sum(rate(alignd_requests_total[1m]))')  # -> [{"metric": {...}, "value": [t, "0.5"]}]

    for title, expr in dashboard_queries(REPO / "deploy/grafana/dashboards/alignd.json"): ...

The binary is Debian's ``prometheus`` package (``make test`` installs it where it is missing).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from support import ManagedProcess, NotReadyError, ProcessExitedError, free_port

PROMETHEUS_CANDIDATES = ("/usr/bin/prometheus", "/usr/local/bin/prometheus")
START_TIMEOUT_S = 60.0
FIRST_SCRAPE_TIMEOUT_S = 60.0

# What Grafana substitutes for its built-in variables, at values that suit a test scraping every
# second: rate() windows of a minute hold plenty of samples.
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}
# $name, ${name} or ${name:format} for Grafana's built-in (double underscore) variables only, so
# label_replace's "${1}" stays as it is.
_GRAFANA_VARIABLE = re.compile(r"\$\{(__\w+)(?::[^}]*)?\}|\$(__\w+)")


def find_prometheus(name: str = "prometheus") -> str | None:
    """Path of the ``prometheus`` (or ``promtool``) binary, or None where it is not installed."""
    found = shutil.which(name)
    if found:
        return found
    for candidate in PROMETHEUS_CANDIDATES:
        path = Path(candidate).with_name(name)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def scrape_config(
    target: str,
    *,
    job: str = "alignd",
    scrape_interval: str = "1s",
    metrics_path: str = "/metrics",
    credentials_file: str | Path | None = None,
) -> dict:
    """The Prometheus configuration (as a dict, written as JSON: valid YAML) for one target."""
    job_config: dict = {
        "job_name": job,
        "scrape_interval": scrape_interval,
        "scrape_timeout": scrape_interval,
        "metrics_path": metrics_path,
        "static_configs": [{"targets": [target]}],
    }
    if credentials_file is not None:
        job_config["authorization"] = {"type": "Bearer", "credentials_file": str(credentials_file)}
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [job_config],
    }


class PrometheusError(RuntimeError):
    pass


class PrometheusServer:
    """A Prometheus process scraping ``target`` (host:port) every second, on a free local port with
    its own temporary storage; a context manager (started on enter, stopped and removed on exit)."""

    def __init__(
        self,
        target: str,
        *,
        bearer_token: str | None = None,
        job: str = "alignd",
        scrape_interval: str = "1s",
        metrics_path: str = "/metrics",
        binary: str | None = None,
    ) -> None:
        self.target = target
        self.job = job
        self.binary = binary or find_prometheus()
        if self.binary is None:
            raise PrometheusError("no prometheus binary: apt-get install prometheus (make test does it)")
        self.workdir = Path(tempfile.mkdtemp(prefix="alignd-prometheus-"))
        credentials_file = None
        if bearer_token is not None:
            credentials_file = self.workdir / "bearer_token"
            credentials_file.write_text(bearer_token)
            credentials_file.chmod(0o600)
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(
            json.dumps(
                scrape_config(
                    target,
                    job=job,
                    scrape_interval=scrape_interval,
                    metrics_path=metrics_path,
                    credentials_file=credentials_file,
                ),
                indent=2,
            )
        )
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "prometheus.log"
        self.process = ManagedProcess(
            [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            name="prometheus",
            log_path=self.log_path,
            base_url=self.base_url,
            ready_path="/-/ready",
            start_timeout=START_TIMEOUT_S,
            poll_interval=0.2,
            term_timeout=20,
            kill_timeout=10,
            tail_lines=30,
        )
        self._http = httpx.Client(base_url=self.base_url, timeout=10)

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout: float = START_TIMEOUT_S, first_scrape_timeout: float = FIRST_SCRAPE_TIMEOUT_S) -> None:
        self.process.start()
        try:
            try:
                self.process.wait_ready(timeout)
            except (ProcessExitedError, NotReadyError) as exc:
                raise PrometheusError(str(exc)) from exc
            self.wait_up(first_scrape_timeout)
        except BaseException:
            self.stop()
            raise

    def wait_up(self, timeout: float = FIRST_SCRAPE_TIMEOUT_S) -> None:
        """Until the target's last scrape succeeded (``up == 1``); the target's own error otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(float(s["value"][1]) == 1 for s in self.query(f'up{{job="{self.job}"}}')):
                return
            time.sleep(0.2)
        raise PrometheusError(f"target {self.target} not up after {timeout} s: {self.target_errors()}")

    def target_errors(self) -> list[str]:
        """The last scrape error of each active target (empty strings where the scrape worked)."""
        data = self._api("/api/v1/targets")
        return [t.get("lastError", "") for t in data["activeTargets"]]

    def stop(self) -> None:
        self.process.stop()
        self._http.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        return self.process.log_tail(lines)

    # ------------------------------------------------------------------ queries
    def _api(self, path: str, **params) -> dict:
        response = self._http.get(path, params=params)
        body = response.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query (/api/v1/query) at now: the result list, [] where no series matches. A
        scalar or string result comes back as a one-element list of {"value": [t, v]}."""
        data = self._api("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for(self, expr: str, timeout: float = 30.0, *, finite: bool = False) -> list[dict]:
        """Polls ``expr`` until it returns at least one series (with a finite value if asked: a
        histogram_quantile over windows without observations gives NaN); the last result else."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result and (not finite or any(is_finite(s) for s in result)):
                return result
            time.sleep(0.5)
        return result

    def series_names(self) -> set[str]:
        """Every metric name Prometheus has stored from the target."""
        return set(self._api("/api/v1/label/__name__/values"))

    def wait_scrapes(self, count: int = 2, timeout: float = 30.0) -> None:
        """Until ``count`` more scrapes of the target have been stored (so rate() sees new traffic)."""

        def scrapes() -> float:
            result = self.query(f'count_over_time(up{{job="{self.job}"}}[1h])')
            return float(result[0]["value"][1]) if result else 0.0

        target = scrapes() + count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if scrapes() >= target:
                return
            time.sleep(0.2)
        raise PrometheusError(f"fewer than {count} new scrapes of {self.target} in {timeout} s")


def is_finite(sample: dict) -> bool:
    return math.isfinite(float(sample["value"][1]))


# ---------------------------------------------------------------------------- the dashboard
def substitute_grafana_variables(expr: str, values: dict[str, str] | None = None) -> str:
    """The PromQL Grafana would send: its built-in variables replaced; an unknown one is an error."""
    values = {**GRAFANA_VARIABLES, **(values or {})}

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _GRAFANA_VARIABLE.sub(replace, expr)


def iter_panels(panels: list[dict]) -> Iterator[dict]:
    """Every panel, rows' nested panels (collapsed rows keep theirs inside) included."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_queries(path: str | Path) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, Grafana's variables substituted."""
    dashboard = json.loads(Path(path).read_text())
    queries = []
    for panel in iter_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append((panel.get("title", ""), substitute_grafana_variables(target["expr"])))
    return queries
