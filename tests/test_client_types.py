"""The typed client on its own: it stands apart from the server, spells out its request fields, and
sends what it is given. Fast: no alignd server, only a tiny recording HTTP server on localhost."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignd.clients import Alignd, AsyncAlignd, ChatMessageParam, DecodingParams, GenerateParams
from alignd.protocol import AlignmentSummary, ChatMessage, GenerateResponse, ValueGuidedStep

# Nothing of alignd but its wire models may come with the client.
SERVER_SIDE_PACKAGES = (
    "alignd.server",
    "alignd.decoding",
    "alignd.models",
    "alignd.rewards",
    "alignd.probes",
    "alignd.settings",
    "alignd.errors",
)
NOTHING_LISTENS = "http://127.0.0.1:9"  # the discard port: a request here would fail to connect


# ---------------------------------------------------------------------------- standing alone
def test_importing_the_client_loads_nothing_of_the_server():
    # What is loaded at run time, in a fresh interpreter; the static import graph is the "clients"
    # contract of [tool.importlinter] (tests/test_layering.py).
    code = (
        "import sys, alignd.clients\n"
        f"print('\\n'.join(m for m in sys.modules if m.startswith({SERVER_SIDE_PACKAGES!r})))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []


# ---------------------------------------------------------------------------- the request fields
def test_request_fields_match_the_servers_request_models():
    # The client's fields are written by hand (it must not import the server): here they are held
    # to the server's request models, which the test process may import.
    from alignd.decoding.config import DecodingConfig
    from alignd.server.native.protocol import GenerateRequest

    assert set(GenerateParams.__annotations__) == set(GenerateRequest.model_fields) - {"stream"}
    assert set(DecodingParams.__annotations__) == set(DecodingConfig.model_fields)
    assert set(ChatMessageParam.__annotations__) == set(ChatMessage.model_fields)


def assert_names_the_valid_fields(error: pytest.ExceptionInfo[TypeError]) -> None:
    message = str(error.value)
    assert "'max_token'" in message and "did you mean 'max_tokens'" in message
    assert all(field in message for field in GenerateParams.__annotations__)


def test_a_misspelt_field_is_a_type_error_before_any_request():
    with Alignd(NOTHING_LISTENS) as client:
        with pytest.raises(TypeError) as error:
            client.generate(prompt="hi", max_token=3)
        assert_names_the_valid_fields(error)
        with pytest.raises(TypeError) as error:  # when called, not when first iterated
            client.generate_stream(prompt="hi", max_token=3)
        assert_names_the_valid_fields(error)
        with pytest.raises(TypeError, match="call generate_stream"):
            client.generate(prompt="hi", stream=True)


async def test_a_misspelt_field_is_a_type_error_before_any_request_async():
    async with AsyncAlignd(NOTHING_LISTENS) as client:
        with pytest.raises(TypeError) as error:
            await client.generate(prompt="hi", max_token=3)
        assert_names_the_valid_fields(error)
        with pytest.raises(TypeError) as error:
            client.generate_stream(prompt="hi", max_token=3)
        assert_names_the_valid_fields(error)


# ---------------------------------------------------------------------------- what is sent and returned
ALIGNMENT = {
    "method": "transfer_q",
    "reward_name": "positivity",
    "reward": 0.8,
    "kl": 0.12,
    "cost": {"decisions": 1, "rollouts": 2, "rollout_tokens": 8, "reward_calls": 2},
    "steps": [
        {
            "kind": "value_guided",
            "position": 0,
            "chosen": [5],
            "chosen_text": "Hi",
            "kl": 0.12,
            "cost": {"rollouts": 2, "rollout_tokens": 8, "reward_calls": 2},
            "candidates": [
                {"token_id": 5, "token": "Hi", "sft_logprob": -0.9, "value": 0.8, "logprob": -0.2},
                {"token_id": 7, "token": "Oh", "sft_logprob": -0.5, "value": 0.1, "logprob": -1.7},
            ],
        }
    ],
}
ANSWER = {
    "id": "gen-1",
    "model": "tiny",
    "choices": [{"index": 0, "text": "Hi", "token_ids": [5], "finish_reason": "length", "alignment": ALIGNMENT}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
STREAM_EVENTS = [
    {"id": "gen-1", "index": 0, "text": "Hi", "token_ids": [5]},
    {"id": "gen-1", "index": 0, "finish_reason": "length", "alignment": ALIGNMENT},
    {"id": "gen-1", "usage": ANSWER["usage"]},
]


class RecordingHandler(BaseHTTPRequestHandler):
    """Records each POST /generate body; answers ANSWER, or STREAM_EVENTS as server-sent events."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()  # HTTP/1.0 without a length: the stream ends when the connection closes
            for event in [*map(json.dumps, STREAM_EVENTS), "[DONE]"]:
                self.wfile.write(f"data: {event}\n\n".encode())
        else:
            payload = json.dumps(ANSWER).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    def log_message(self, format, *args):  # keep the test output quiet
        pass


@pytest.fixture
def recording_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingHandler)
    server.bodies = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def base_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


MESSAGES = [
    ChatMessage(role="system", content="Be brief."),
    {"role": "user", "content": "Hi!"},
]
SENT_MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
REQUEST = {
    "messages": MESSAGES,
    "max_tokens": 4,
    "temperature": 0,
    "seed": None,
    "stop": None,
    "decoding": {"method": "transfer_q", "alpha": 0.1, "diagnostics": True},
}
SENT = {
    "messages": SENT_MESSAGES,
    "max_tokens": 4,
    "temperature": 0,
    "decoding": {"method": "transfer_q", "alpha": 0.1, "diagnostics": True},
}


def assert_typed_alignment(alignment) -> None:
    assert isinstance(alignment, AlignmentSummary)
    assert alignment.method == "transfer_q" and alignment.cost.decisions == 1
    assert isinstance(alignment.steps[0], ValueGuidedStep) and alignment.steps[0].candidates[0].token == "Hi"


def test_sends_the_fields_given_and_returns_typed_models(recording_server):
    with Alignd(base_url(recording_server)) as client:
        answer = client.generate(**REQUEST, timeout=5)
        events = list(client.generate_stream(**REQUEST))
    assert recording_server.bodies == [SENT, {**SENT, "stream": True}]
    assert isinstance(answer, GenerateResponse)
    assert answer.choices[0].text == "Hi"
    assert_typed_alignment(answer.choices[0].alignment)
    assert [e.text for e in events] == ["Hi", "", ""]
    assert_typed_alignment(events[1].alignment)
    assert events[-1].usage.total_tokens == 4


async def test_sends_the_fields_given_and_returns_typed_models_async(recording_server):
    async with AsyncAlignd(base_url(recording_server)) as client:
        answer = await client.generate(**REQUEST, timeout=5)
        events = [event async for event in client.generate_stream(**REQUEST)]
    assert recording_server.bodies == [SENT, {**SENT, "stream": True}]
    assert_typed_alignment(answer.choices[0].alignment)
    assert_typed_alignment(events[1].alignment)
    assert events[-1].usage.total_tokens == 4
