"""Remote engines through real alignd servers: the baseline on a remote ``vllm serve`` (ALIGND_BASELINE_URL),
and alignd replicas whose SFT model is remote too (ALIGND_SFT_URL). The module's own processes on
loopback, so the rest of the suite keeps its session server; one remote for the whole module, started,
killed and restarted on the same port as the tests go.

Everything runs on the tiny vLLM model (tests/support.py's ``build_vllm_tiny_llama``): these are fault
tests of the plumbing (a remote down, killed, restarted, frozen), which need no real language model. The
remote serves the SFT model itself (float32, like alignd's engine). TQ* direct transfer from
a baseline that *is* the SFT model computes, at every decision, the same values as token-wise CD (whose
rollouts are the SFT model's own, in process): greedy rollouts of the same prefixes, scored by the same
reward. So greedy TQ* through the remote must give CD's answers, token for token.

The tests run in file order and each leaves the remote as the next expects it: down at first (alignd
starts degraded), then up, then killed in the middle of a streamed answer, then restarted, then frozen
(SIGSTOP) and thawed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import TINY_SERVED_NAME, ServerProcess, free_port, tiny_server_env, vllm_serve_process

pytestmark = pytest.mark.server

REMOTE_NAME = "smollm2-remote"
QUESTIONS = [
    "Tell me about Mondays.",
    "How was your weekend?",
    "Describe a rainy afternoon.",
    "What do you think of homework?",
]
RULE = {"alpha": 1.0, "top_k": 4, "rollout_len": 4, "num_rollouts": 1}
BASELINE_ENGINE = "baseline/default"
MAX_MODEL_LEN = 256


def light_env(model_dir: Path) -> dict[str, str]:
    return {
        **tiny_server_env(model_dir),
        "ALIGND_VALUE_HEAD": "none",
        "ALIGND_DTYPE": "float32",
        "ALIGND_CPU_KVCACHE_SPACE_GIB": "1",
    }


@pytest.fixture(scope="module")
def model_name() -> str:
    """The name the module's servers serve the tiny model under (conftest's is the session server's)."""
    return TINY_SERVED_NAME


class Remote:
    """The module's ``vllm serve`` on a fixed port, so that alignd can be pointed at it before it runs and
    find it again after a restart."""

    def __init__(self, model_dir: Path, log_dir: Path) -> None:
        self.model_dir, self.log_dir = model_dir, log_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.process = vllm_serve_process(
            self.model_dir,
            REMOTE_NAME,
            self.log_dir / f"vllm-serve-{self.starts}.log",
            max_model_len=MAX_MODEL_LEN,
            port=self.port,
        )
        self.process.start()
        self.process.wait_ready(timeout=1200)

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@pytest.fixture(scope="module")
def remote_holder(tiny_vllm_dir, tmp_path_factory):
    holder = Remote(tiny_vllm_dir, tmp_path_factory.mktemp("remote-baseline"))
    yield holder
    holder.stop()


@pytest.fixture(scope="module")
def aligned(remote_holder, tiny_vllm_dir):
    """alignd with the remote as its default baseline, started while the remote is down."""
    env = {
        "ALIGND_BASELINE_URL": remote_holder.base_url,
        "ALIGND_BASELINE_SERVED_MODEL": REMOTE_NAME,
        **light_env(tiny_vllm_dir),
    }
    with ServerProcess(env) as proc:
        proc.wait_ready(timeout=1200)
        yield proc


@pytest.fixture(scope="module")
def remote(aligned, remote_holder):
    """The remote, up (started after alignd)."""
    if remote_holder.process is None:
        remote_holder.start()
    return remote_holder


def chat(model: str, question: str, decoding: dict | None, max_tokens: int = 8, **extra) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }
    return body | ({"decoding": decoding} if decoding else {})


def answer(server, body: dict) -> dict:
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def health(server) -> tuple[int, dict]:
    response = httpx.get(server.base_url + "/health", timeout=60)
    return response.status_code, response.json()


def metrics(server) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(values: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in values.items() if n == name and set(labels.items()) <= set(ls))


def test_alignd_starts_degraded_while_its_remote_baseline_is_down(aligned, remote_holder, model_name):
    assert remote_holder.process is None  # nothing listens at the baseline's URL yet
    status, body = health(aligned)
    assert status == 200 and body["status"] == "degraded"
    assert body["engines"]["sft"]["status"] == "up" and body["engines"]["sft"]["kind"] == "vllm"
    down = body["engines"][BASELINE_ENGINE]
    assert down["status"] == "down" and down["kind"] == "remote" and down["location"] == remote_holder.base_url
    assert "unavailable" in down["detail"]
    tq = httpx.post(
        aligned.base_url + "/v1/chat/completions",
        timeout=120,
        json=chat(model_name, QUESTIONS[0], {"method": "transfer_q", **RULE}),
    )
    assert tq.status_code == 503 and tq.json()["error"]["code"] == "engine_unavailable", tq.text
    assert "engine 'default'" in tq.json()["error"]["message"] and tq.headers["Retry-After"]
    assert (
        httpx.post(
            aligned.base_url + "/v1/chat/completions", timeout=120, json=chat(model_name, QUESTIONS[0], None)
        ).status_code
        == 200
    )
    assert sample(metrics(aligned), "alignd_engine_up", engine=BASELINE_ENGINE) == 0.0


def test_it_comes_up_with_the_remote_and_lists_it(aligned, remote):
    deadline = time.monotonic() + 30
    while (state := health(aligned))[1]["status"] != "ok" and time.monotonic() < deadline:
        time.sleep(1)  # /health itself asks a down remote again (at most once a second)
    assert state[0] == 200 and state[1]["status"] == "ok", state
    assert state[1]["engines"][BASELINE_ENGINE]["status"] == "up"
    cards = {c["name"]: c for c in httpx.get(aligned.base_url + "/v1/baselines", timeout=30).json()["data"]}
    assert cards["default"]["kind"] == "remote"
    assert remote.base_url in cards["default"]["source"] and REMOTE_NAME in cards["default"]["source"]
    assert cards["prompted"]["kind"] == "prompted"


def test_tq_through_a_remote_copy_of_the_sft_model_is_cd(aligned, remote, model_name):
    before = metrics(aligned)
    for question in QUESTIONS:
        tq = answer(aligned, chat(model_name, question, {"method": "transfer_q", "diagnostics": True, **RULE}))
        cd = answer(aligned, chat(model_name, question, {"method": "cd", "cd_mode": "token", **RULE}))
        assert tq["message"]["content"] == cd["message"]["content"], question
        assert tq["alignment"]["baseline"] == "default" and tq["alignment"]["baseline_kind"] == "remote"
        assert tq["alignment"]["cost"]["rollouts"] > 0
    after = metrics(aligned)
    ok = {
        call: sample(after, "alignd_engine_calls_total", engine=BASELINE_ENGINE, call=call, outcome="ok")
        - sample(before, "alignd_engine_calls_total", engine=BASELINE_ENGINE, call=call, outcome="ok")
        for call in ("rollouts", "continuation_logprobs")
    }
    assert ok["rollouts"] > 0, ok  # TQ*'s rollouts ran on the remote, and were counted and timed there
    assert sample(after, "alignd_engine_call_seconds_count", engine=BASELINE_ENGINE, call="rollouts") >= ok["rollouts"]
    assert sample(after, "alignd_engine_up", engine=BASELINE_ENGINE) == 1.0


@pytest.fixture(scope="module")
def replicas(remote, tiny_vllm_dir):
    """Two alignd processes whose SFT model is the remote: stateless controllers over one deployment (they
    read the tokenizer of the local folder only)."""
    env = {"ALIGND_SFT_URL": remote.base_url, "ALIGND_SFT_SERVED_MODEL": REMOTE_NAME, **light_env(tiny_vllm_dir)}
    with ServerProcess(env) as first, ServerProcess(env) as second:
        first.wait_ready(timeout=600)
        second.wait_ready(timeout=600)
        yield first, second


def holds_model_weights(pid: int) -> list[str]:
    """What in the process tree of ``pid`` looks like a model: mapped weight files, vLLM engine processes."""
    found = []
    pids = [pid, *(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    for p in pids:
        cmdline = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        if "VLLM" in cmdline or "EngineCore" in cmdline:
            found.append(f"{p}: {cmdline[:80]}")
        maps = Path(f"/proc/{p}/maps").read_text()
        found += [f"{p}: {line.split()[-1]}" for line in maps.splitlines() if line.endswith((".safetensors", ".gguf"))]
    return found


def test_two_replicas_with_a_remote_sft_model_answer_the_openai_client_and_hold_no_weights(
    replicas, remote, aligned, model_name
):
    import openai

    answers = []
    for replica in replicas:
        status, body = health(replica)
        assert status == 200 and body["status"] == "ok"
        assert body["engines"]["sft"]["kind"] == "remote" and body["engines"]["sft"]["location"] == remote.base_url
        client = openai.OpenAI(base_url=replica.base_url + "/v1", api_key="none", max_retries=0)
        plain = client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=8, temperature=0
        )
        tq = client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": QUESTIONS[1]}],
            max_tokens=8,
            temperature=0,
            extra_body={"decoding": {"method": "transfer_q", "baseline": "prompted", **RULE}},
        )
        answers.append((plain.choices[0].message.content, tq.choices[0].message.content))
        assert holds_model_weights(replica.pid) == []
    # one deployment behind both: the same greedy answers, and the same as an in-process SFT engine's
    assert answers[0] == answers[1]
    assert answers[0][0] == answer(aligned, chat(model_name, QUESTIONS[1], None))["message"]["content"]
    # both replicas sent their work to the remote: it counted their requests
    remote_metrics = httpx.get(remote.base_url + "/metrics", timeout=30).text
    assert (
        sample(
            {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(remote_metrics)
                for s in f.samples
            },
            "vllm:request_success_total",
        )
        >= 2
    )


def test_a_remote_killed_mid_stream_ends_that_stream_with_an_error_event_and_fails_only_what_needs_it(
    aligned, remote, model_name
):
    body = chat(model_name, QUESTIONS[2], {"method": "transfer_q", **RULE}, max_tokens=64, stream=True)
    events, killed = [], False
    with httpx.stream("POST", aligned.base_url + "/v1/chat/completions", json=body, timeout=600) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if (
                not killed
                and line[6:] != "[DONE]"
                and json.loads(line[6:])["choices"]
                and json.loads(line[6:])["choices"][0]["delta"].get("content")
            ):
                remote.kill()  # SIGKILL, in the middle of the answer
                killed = True
    assert killed and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_unavailable" and "engine 'default'" in error["message"]

    started = time.perf_counter()
    response = httpx.post(
        aligned.base_url + "/v1/chat/completions",
        timeout=120,
        json=chat(model_name, QUESTIONS[0], {"method": "transfer_q", **RULE}),
    )
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "engine_unavailable" and response.headers["Retry-After"]
    assert time.perf_counter() - started < 30  # at once, not after a timeout
    plain = httpx.post(
        aligned.base_url + "/v1/chat/completions", timeout=120, json=chat(model_name, QUESTIONS[0], None)
    )
    assert plain.status_code == 200
    assert health(aligned)[1]["status"] == "degraded"


def test_the_remote_restarted_tq_answers_again_without_restarting_alignd_and_nothing_leaked(
    aligned, remote, model_name
):
    expected = answer(aligned, chat(model_name, QUESTIONS[0], {"method": "cd", "cd_mode": "token", **RULE}))
    pid = aligned.pid
    remote.start()  # same port
    time.sleep(1.1)  # past the recheck interval of the last failed call
    tq = answer(aligned, chat(model_name, QUESTIONS[0], {"method": "transfer_q", **RULE}))
    assert tq["message"]["content"] == expected["message"]["content"]
    assert aligned.pid == pid and aligned.running
    status, body = health(aligned)
    assert status == 200 and body["status"] == "ok"
    values = metrics(aligned)
    assert sample(values, "alignd_engine_up", engine=BASELINE_ENGINE) == 1.0
    assert sample(values, "alignd_engine_calls_total", engine=BASELINE_ENGINE, outcome="unavailable") >= 2
    # idle again: no request running, no slot held, no engine request left behind by the cut stream
    assert sample(values, "alignd_running_requests") == 0
    assert sample(values, "alignd_admission_running") == 0 and sample(values, "alignd_admission_queued") == 0
    assert sample(values, "alignd_engine_requests_running") == 0
    assert sample(values, "alignd_engine_calls_running", engine=BASELINE_ENGINE) == 0


def test_a_remote_that_hangs_is_bounded_by_the_request_deadline(aligned, remote, model_name):
    """The remote frozen (SIGSTOP: it accepts connections and never answers): a TQ* request ends at its own
    deadline with a 504, plain requests are served meanwhile, and once it thaws TQ* answers again."""
    os.killpg(remote.process.pid, signal.SIGSTOP)
    try:
        started = time.perf_counter()
        late = httpx.post(
            aligned.base_url + "/v1/chat/completions",
            timeout=120,
            headers={"X-Request-Timeout": "5"},
            json=chat(model_name, QUESTIONS[1], {"method": "transfer_q", **RULE}),
        )
        waited = time.perf_counter() - started
        assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded", late.text
        assert 4.5 <= waited < 30, waited
        assert (
            httpx.post(
                aligned.base_url + "/v1/chat/completions", timeout=120, json=chat(model_name, QUESTIONS[1], None)
            ).status_code
            == 200
        )
    finally:
        os.killpg(remote.process.pid, signal.SIGCONT)
    answer(aligned, chat(model_name, QUESTIONS[1], {"method": "transfer_q", **RULE}))
    values = metrics(aligned)
    assert sample(values, "alignd_engine_calls_running", engine=BASELINE_ENGINE) == 0
    assert sample(values, "alignd_engine_calls_total", engine=BASELINE_ENGINE, outcome="cancelled") >= 1
