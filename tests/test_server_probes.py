"""The probe-job endpoints.

Most tests run the router in-process on the tiny random Llama (an app with the probe router, the
server's error handlers and a ProbeServing over the tiny HFEngine), so they are fast. One test,
marked ``server``, submits a job to the real server on the embedded model.
"""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from alignd.server.errors import install_error_handlers
from alignd.server.metrics import ServerMetrics
from alignd.server.probes.router import router as probes_router
from alignd.server.probes.serving import ProbeServing
from alignd.settings import Settings

TOPICS = {
    "weather": ["rain falls", "the sun is warm", "snow on the hills", "a cold wind blows", "clouds are grey"],
    "food": ["fresh bread", "a bowl of soup", "sweet apples", "rice and beans", "hot tea with milk"],
    "animals": ["the cat sleeps", "a dog runs", "birds sing at dawn", "the horse eats hay", "fish swim fast"],
    "numbers": ["one two three", "four and five", "six times seven", "eight minus two", "nine is odd"],
}


def topic_texts(n_per_topic: int = 10) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for topic, phrases in TOPICS.items():
        for i in range(n_per_topic):
            texts.append(f"{phrases[i % len(phrases)]} {'and ' * (i // len(phrases))}number {i} about {topic}")
            labels.append(topic)
    return texts, labels


def settings_with(**overrides) -> Settings:
    return Settings(**{"max_model_len": 2048, "served_model_name": "tiny-llama", **overrides})


def make_app(engine, settings, model_path="") -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(probes_router)
    app.state.probe_serving = ProbeServing(model_path, settings, ServerMetrics(), engine=engine)
    return app


@pytest.fixture
def client(tiny_hf_engine, tiny_llama_dir):
    app = make_app(tiny_hf_engine, settings_with(probe_max_texts=300), str(tiny_llama_dir))
    with TestClient(app) as c:  # keeps the app's loop running between requests, so jobs progress
        yield c


def wait_done(get, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = get(f"/v1/probe/jobs/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job still {job['status']} after {timeout} s"
        time.sleep(0.1)


def assert_error(response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


def test_texts_job_runs_to_done_with_one_result_per_layer_and_a_png(client):
    texts, topics = topic_texts()
    answer = client.post("/v1/probe/jobs", json={"texts": texts, "labels": {"topic": topics}, "name": "plain"})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    assert answer.json()["status"] in ("queued", "running") and answer.json()["request"]["layers"] == [0, 1, 2]
    job = wait_done(client.get, job_id)
    assert job["status"] == "done" and job["progress"] == 1.0 and job["error"] is None, job
    result = job["result"]
    assert result["condition"] == "plain" and result["compare"] is None
    assert [e["layer"] for e in result["layers"]] == [0, 1, 2]
    for entry in result["layers"]:
        assert set(entry["ari"]) == {"topic"} and set(entry["label_overlap"]) == {"topic"}
        assert entry["n_points"] == 40 and entry["neighbourhood_overlap"] is None
        if entry["skipped"] is None:
            assert entry["intrinsic_dimension"] > 0 and entry["num_peaks"] >= 1 and 0 <= entry["core_fraction"] <= 1
    assert result["layers"][2]["skipped"] is None  # distinct last-token states after the blocks
    assert result["timing"]["total_s"] > 0 and result["params"]["k_id"] == 16
    png = client.get(job["plot_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    listed = client.get("/v1/probe/jobs").json()
    assert listed["object"] == "list" and job_id in [j["id"] for j in listed["data"]]
    assert all(j["result"] is None for j in listed["data"])  # the list stays small


def test_compare_two_prompt_formats_gives_neighbourhood_overlap(client):
    texts, topics = topic_texts()
    other = [t.upper() for t in texts]
    answer = client.post(
        "/v1/probe/jobs",
        json={
            "texts": texts,
            "labels": {"topic": topics},
            "compare": {"texts": other, "name": "shouting"},
            "layers": [1, 2],
            "pooling": "mean",
            "site": "normed",
            "params": {"k_id": 8, "k_overlap": 10},
        },
    )
    assert answer.status_code == 202, answer.text
    job = wait_done(client.get, answer.json()["id"])
    assert job["status"] == "done", job
    result = job["result"]
    assert result["conditions"] == ["A", "shouting"] and result["compare"]["condition"] == "shouting"
    for a, b in zip(result["layers"], result["compare"]["layers"], strict=False):
        assert 0 <= a["neighbourhood_overlap"] <= 1 and a["neighbourhood_overlap"] == b["neighbourhood_overlap"]
    assert job["request"]["pooling"] == "mean" and job["request"]["site"] == "normed"


def test_fewshot_dataset_compares_shot_counts_with_dataset_labels(client):
    items = [
        {"question": f"q{s}{i}?", "choices": ["aa", "bb", "cc"], "answer": "ABC"[i % 3], "subject": s}
        for s in ("sky", "sea", "land")
        for i in range(12)
    ]
    answer = client.post(
        "/v1/probe/jobs",
        json={
            "dataset": {"items": items, "shots": [0, 1], "seed": 7},
            "layers": [2],
            "params": {"k_id": 8, "k_overlap": 10},
        },
    )
    assert answer.status_code == 202, answer.text
    info = answer.json()["request"]
    assert [c["name"] for c in info["conditions"]] == ["0-shot", "1-shot"] and info["labels"] == ["subject", "answer"]
    assert info["conditions"][1]["tokens"] > info["conditions"][0]["tokens"]
    job = wait_done(client.get, answer.json()["id"])
    assert job["status"] == "done", job
    layer = job["result"]["layers"][0]
    assert set(layer["ari"]) == {"subject", "answer"} and layer["neighbourhood_overlap"] is not None


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"texts": ["a b", "c d"]}, ["2 texts are too few", "at least 33"]),
        (
            {"texts": [f"t {i}" for i in range(40)], "labels": {"x": [1, 2]}},
            ["labels 'x' has 2 entries but there are 40"],
        ),
        ({"texts": [f"t {i}" for i in range(40)], "layers": [1, 7]}, ["[7] out of range", "0..2"]),
        ({"texts": [f"t {i}" for i in range(40)], "layers": [-1]}, ["layers must be >= 0"]),
        ({"texts": [f"t {i}" for i in range(301)]}, ["301 texts is above this server's limit of 300"]),
        ({"texts": [f"t {i}" for i in range(39)] + ["word " * 200]}, ["text 39", "above the model's context of 256"]),
        ({"texts": [f"t {i}" for i in range(40)], "compare": {"texts": ["x"]}}, ["compare.texts has 1 entries"]),
        ({"texts": [f"t {i}" for i in range(40)], "compare": {"model": "base"}}, ["unknown probe model 'base'"]),
        (
            {
                "texts": [f"t {i}" for i in range(40)],
                "dataset": {"items": [{"question": "q", "choices": ["a", "b"], "answer": 0}]},
            },
            ["exactly one of 'texts'"],
        ),
        ({"texts": [f"t {i}" for i in range(40)], "params": {"maxk": 8}}, ["maxk must be >= max(4, k_density=16)"]),
        ({"texts": [f"t {i}" for i in range(39)] + [" "]}, ["texts[39] is empty"]),
        ({"texts": [f"t {i}" for i in range(40)], "colour": "red"}, ["unknown field 'colour'"]),
        (
            {"dataset": {"items": [{"question": "q", "choices": ["a", "b"], "answer": "A"}] * 40, "shots": [0, 9]}},
            ["shots must be between 0 and 5"],
        ),
    ],
)
def test_bad_requests_are_clear_400s(client, body, fragments):
    assert_error(client.post("/v1/probe/jobs", json=body), 400, *fragments)


def test_unknown_job_is_404_and_the_server_still_works_after_bad_input(client):
    assert_error(client.get("/v1/probe/jobs/probe-nope"), 404, "no job 'probe-nope'")
    assert_error(client.delete("/v1/probe/jobs/probe-nope"), 404)
    texts, _ = topic_texts()
    answer = client.post("/v1/probe/jobs", json={"texts": texts, "layers": [2]})
    assert wait_done(client.get, answer.json()["id"])["status"] == "done"


def test_queue_bound_cancel_and_plot_of_an_unfinished_job(tiny_hf_engine, tiny_llama_dir):
    """Holding the engine's lock keeps the first job running, so the states are deterministic."""
    settings = settings_with(probe_max_queued_jobs=1, probe_max_running_jobs=1)
    app = make_app(tiny_hf_engine, settings, str(tiny_llama_dir))
    texts, _ = topic_texts()
    with TestClient(app) as client:
        tiny_hf_engine._lock.acquire()
        try:
            running = client.post("/v1/probe/jobs", json={"texts": texts}).json()["id"]
            deadline = time.monotonic() + 30
            while client.get(f"/v1/probe/jobs/{running}").json()["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            queued = client.post("/v1/probe/jobs", json={"texts": texts}).json()["id"]
            assert client.get(f"/v1/probe/jobs/{queued}").json()["status"] == "queued"
            full = client.post("/v1/probe/jobs", json={"texts": texts})
            error = assert_error(full, 429, "already queued", "limit is 1")
            assert error["code"] == "job_queue_full" and full.headers["retry-after"] == "1"
            assert_error(client.get(f"/v1/probe/jobs/{running}/plot.png"), 409, "is running")
            cancelled = client.delete(f"/v1/probe/jobs/{running}", params={"reason": "wrong layers"})
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
            assert cancelled.json()["error"] == {"message": "wrong layers", "code": "cancelled"}
            assert_error(client.delete(f"/v1/probe/jobs/{running}"), 409, "already finished (cancelled)")
            assert_error(client.get(f"/v1/probe/jobs/{running}/plot.png"), 409, "cancelled: wrong layers")
        finally:
            tiny_hf_engine._lock.release()
        job = wait_done(client.get, queued)  # the queued job runs once the slot and the lock are free
        assert job["status"] == "done", job
        metrics = app.state.probe_serving.metrics
        finished = metrics.probe_jobs_finished
        assert finished.labels("cancelled")._value.get() == 1 and finished.labels("done")._value.get() == 1
        assert metrics.probe_job_seconds._sum.get() > 0  # the done job's run time (the cancelled one ran too)
        scraped = metrics.render(include_default=False)[0].decode()
        assert 'alignd_probe_jobs{state="done"} 1.0' in scraped and 'alignd_probe_jobs{state="queued"} 0.0' in scraped
        assert 'alignd_probe_jobs_finished_total{state="cancelled"} 1.0' in scraped
        assert "alignd_probe_job_seconds_count 2.0" in scraped


def test_a_failed_job_keeps_its_error(tiny_hf_engine, tiny_llama_dir, monkeypatch):
    import alignd.server.probes.serving as serving_module

    def broken(*args, **kwargs):
        raise ValueError("the analysis broke on purpose")

    monkeypatch.setattr(serving_module, "analyse_conditions", broken)
    app = make_app(tiny_hf_engine, settings_with(), str(tiny_llama_dir))
    texts, _ = topic_texts()
    with TestClient(app) as client:
        job = wait_done(client.get, client.post("/v1/probe/jobs", json={"texts": texts, "layers": [1]}).json()["id"])
        assert job["status"] == "failed" and job["error"] == {
            "message": "the analysis broke on purpose",
            "code": "failed",
        }
        assert job["result"] is None and job["plot_url"] is None


def test_for_engine_reuses_the_served_engine_only_when_it_gives_hidden_states(tiny_hf_engine):
    from alignd.server.probes.serving import SERVED

    reused = ProbeServing.for_engine(tiny_hf_engine, settings_with())
    assert reused._engines == {SERVED: tiny_hf_engine}

    class NoHiddenStates:  # as the vLLM engine: probes load a reference engine of its folder instead
        supports_hidden_states = False
        info = tiny_hf_engine.info

    assert ProbeServing.for_engine(NoHiddenStates(), settings_with())._engines == {}


def test_lazy_engine_from_the_model_path_with_real_settings(tiny_llama_dir):
    """Without an engine, the service loads one from the served model's folder on the first job
    (models.factory.build_reference_engine)."""
    app = make_app(None, Settings(), str(tiny_llama_dir))
    texts, topics = topic_texts()
    with TestClient(app) as client:
        answer = client.post("/v1/probe/jobs", json={"texts": texts, "labels": {"topic": topics}, "layers": [0, 2]})
        assert answer.status_code == 202, answer.text
        job = wait_done(client.get, answer.json()["id"])
        assert job["status"] == "done", job
        assert job["result"]["timing"]["load_s"] > 0 and len(job["result"]["layers"]) == 2


# ------------------------------------------------------------------------------------ real server
@pytest.mark.server
def test_probe_job_through_the_real_server(server):
    """40 texts, 3 layers of the embedded SmolLM2 (30 blocks): one result per layer and a PNG."""
    texts, topics = topic_texts()
    base = server.base_url
    bad = httpx.post(base + "/v1/probe/jobs", json={"texts": texts, "layers": [31]}, timeout=60)
    assert_error(bad, 400, "out of range", "0..30")
    answer = httpx.post(
        base + "/v1/probe/jobs", json={"texts": texts, "labels": {"topic": topics}, "layers": [1, 15, 30]}, timeout=120
    )
    assert answer.status_code == 202, answer.text

    def get(path):
        return httpx.get(base + path, timeout=60)

    job = wait_done(get, answer.json()["id"], timeout=600)
    assert job["status"] == "done", job
    layers = job["result"]["layers"]
    assert [e["layer"] for e in layers] == [1, 15, 30]
    assert all(e["skipped"] is None and e["intrinsic_dimension"] > 0 and e["num_peaks"] >= 1 for e in layers)
    assert all(set(e["ari"]) == {"topic"} for e in layers)
    png = get(job["plot_url"])
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert "alignd_probe_jobs" in get("/metrics").text
