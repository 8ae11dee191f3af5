"""TQ* by the value head through the real server (``decoding.value='head'``): the session server runs the
embedded model on alignd's value-guided model class with a seeded random head (conftest's
``embedded_value_head_dir``), so the expected tokens are computed by hand here: transformers' forward
pass of the same weights in float32, the same head, ``argmax over the top-k of log pi_sft + Q / alpha``.
Then the same folder under stock ``vllm serve`` gives the same answer as alignd for the same request."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator, Sequence

import httpx
import pytest
import torch

from alignd.models.value_head import load_value_head

from support import BENCH, ManagedProcess, free_port, load_bench

pytestmark = pytest.mark.server

ALPHA = 0.1  # the head decides: the test checks that it changes the answer
TOP_K = 5
STEPS = 10
QUESTION = "Tell me about your weekend."
HEAD = {"method": "transfer_q", "value": "head", "alpha": ALPHA, "top_k": TOP_K}
# Both engines compute in float32 here, but batch shapes change the last bits: where the hand rule's best
# two scores are closer than this, either choice is the rule's.
NEAR_TIE = 1e-3


class HandRule:
    def __init__(self, model, head) -> None:
        self.model, self.head = model, head

    @torch.no_grad()
    def scores(self, prefix: Sequence[int]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Candidates, their scores ``log pi_sft + Q / alpha``, and the SFT log-probabilities of the candidates."""
        hidden = self.model.model(input_ids=torch.tensor([list(prefix)])).last_hidden_state[0, -1]  # after the final norm
        logprobs = torch.log_softmax(self.model.lm_head(hidden).float(), dim=-1)
        top = logprobs.topk(TOP_K)
        q = self.head(hidden.unsqueeze(0), self.model.model.embed_tokens.weight[top.indices].unsqueeze(0))[0]
        return top.indices.tolist(), top.values + q / ALPHA, top.values

    def check(self, prompt: Sequence[int], tokens: Sequence[int]) -> int:
        """Every token is the rule's argmax at its prefix (up to a near-tie); returns how many steps the head
        moved away from the SFT model's own greedy choice."""
        moved = 0
        for t, token in enumerate(tokens):
            candidates, scores, sft = self.scores([*prompt, *tokens[:t]])
            best = int(scores.argmax())
            if token != candidates[best]:
                assert token in candidates, (t, token, candidates)
                gap = float(scores[best] - scores[candidates.index(token)])
                assert gap < NEAR_TIE, f"step {t}: served {token}, the rule {candidates[best]} by {gap:.4f}"
            moved += int(candidates[best] != candidates[int(sft.argmax())])
        return moved


@pytest.fixture(scope="module")
def hand_rule(hf_embedded_engine, embedded_value_head_dir) -> HandRule:
    return HandRule(hf_embedded_engine.model, load_value_head(embedded_value_head_dir).head)


def chat(model_name: str, decoding: dict | None, **fields) -> dict:
    body = {"model": model_name, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": STEPS,
            "temperature": 0, **fields}
    return body | ({"decoding": decoding} if decoding else {})


def test_the_value_head_is_listed_with_its_provenance(server, embedded_value_head_dir):
    card = httpx.get(server.base_url + "/v1/value_head", timeout=30).json()
    assert card["available"] and card["reward"] == "positivity" and card["baseline"] == "default"
    assert card["path"] == str(embedded_value_head_dir.resolve())
    assert card["provenance"]["head"]["rank"] == 16 and card["provenance"]["base_model"]["weights_digest"]


def test_greedy_head_decoding_is_the_rule_at_every_step_streamed_or_not(openai_client, model_name, hand_rule,
                                                                         hf_embedded_engine):
    kwargs = chat(model_name, None)
    whole = openai_client.chat.completions.create(**{k: v for k, v in kwargs.items()},
                                                  extra_body={"decoding": HEAD})
    text = whole.choices[0].message.content
    prompt = hf_embedded_engine.render_chat([{"role": "user", "content": QUESTION}])
    tokens = hf_embedded_engine.encode(text)
    assert hand_rule.check(prompt, tokens) > 0  # the head changed the answer somewhere
    plain = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    assert plain != text
    chunks = list(openai_client.chat.completions.create(**kwargs, stream=True, extra_body={"decoding": HEAD}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_head_diagnostics_report_the_sft_candidates_and_no_values(server, model_name, hand_rule, hf_embedded_engine):
    body = chat(model_name, {**HEAD, "diagnostics": True}, max_tokens=4)
    reply = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=300).json()
    alignment = reply["choices"][0]["alignment"]
    assert alignment["method"] == "transfer_q" and alignment["value"] == "head"
    assert alignment["kl"] is None and -1.0 <= alignment["reward"] <= 1.0
    assert alignment["cost"]["rollouts"] == 0 and len(alignment["steps"]) == 4
    prompt = hf_embedded_engine.render_chat([{"role": "user", "content": QUESTION}])
    chosen: list[int] = []
    for step in alignment["steps"]:
        candidates, _, sft = hand_rule.scores([*prompt, *chosen])
        assert [c["token_id"] for c in step["candidates"]] == candidates
        assert [c["sft_logprob"] for c in step["candidates"]] == pytest.approx(sft.tolist(), abs=1e-3)
        assert all(c["value"] is None for c in step["candidates"])
        chosen += step["chosen"]


@pytest.mark.parametrize(
    ("decoding", "param", "says"),
    [
        ({**HEAD, "reward": "char_length"}, "decoding.reward", "trained for reward 'positivity'"),
        ({**HEAD, "baseline": "prompted"}, "decoding.baseline", "distilled from baseline 'default'"),
        ({**HEAD, "transfer": "indirect"}, "decoding", "direct transfer"),
        ({**HEAD, "top_k": 10_000}, "decoding.top_k", "limit"),
        ({**HEAD, "alpha": 0}, "decoding", "alpha"),
    ],
)
def test_requests_the_head_cannot_serve_are_400_saying_why(server, model_name, decoding, param, says):
    response = httpx.post(server.base_url + "/v1/chat/completions", json=chat(model_name, decoding), timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert says in error["message"] and (error["param"] or "").startswith(param.split(".")[0])


def test_plain_requests_beside_head_requests_keep_their_own_answers(server, model_name):
    """Rows of plain requests in the same engine batches as value-guided ones are untouched."""
    url = server.base_url + "/v1/chat/completions"

    async def both() -> list[dict]:
        async with httpx.AsyncClient(timeout=300) as client:
            replies = await asyncio.gather(
                *(client.post(url, json=chat(model_name, HEAD)) for _ in range(3)),
                *(client.post(url, json=chat(model_name, None)) for _ in range(3)),
            )
        return [r.json()["choices"][0]["message"]["content"] for r in replies]

    plain_alone = httpx.post(url, json=chat(model_name, None), timeout=300).json()["choices"][0]["message"]["content"]
    head_alone = httpx.post(url, json=chat(model_name, HEAD), timeout=300).json()["choices"][0]["message"]["content"]
    answers = asyncio.run(both())
    assert answers[:3] == [head_alone] * 3 and answers[3:] == [plain_alone] * 3
    assert head_alone != plain_alone
    metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
    assert 'alignd_decoding_requests_total{method="transfer_q_head"}' in metrics


# ---------------------------------------------------------------------------- the same folder, stock `vllm serve`
@pytest.fixture(scope="module")
def stock_vllm_serve(embedded_model_dir, embedded_value_head_dir, tmp_path_factory) -> Iterator[ManagedProcess]:
    """``vllm serve`` of the folder alignd prepares (same weights, the class and the head named in its
    config.json): no flag beyond vLLM's own, the plugin comes from the installed entry points."""
    from alignd.models.value_head import prepare_value_guided_folder

    served = prepare_value_guided_folder(embedded_model_dir, embedded_value_head_dir.resolve(),
                                         tmp_path_factory.mktemp("stock") / "smollm2-tq")
    port = free_port()
    cmd = [sys.executable, str(BENCH / "vllm_cli.py"), "serve", str(served), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "smollm2-tq", "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
           "--no-enable-chunked-prefill", "--generation-config", "vllm"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = tmp_path_factory.mktemp("stock-log") / "vllm-serve.log"
    with ManagedProcess(cmd, name="vllm serve", log_path=log, base_url=f"http://127.0.0.1:{port}", env=env) as proc:
        proc.wait_ready(timeout=1800)  # a third engine starting beside the session's: minutes on 2 busy cores
        yield proc


def test_stock_vllm_serve_gives_alignd_s_answer_for_the_same_request(stock_vllm_serve, server, model_name,
                                                                     hf_embedded_engine):
    import openai

    prompt = hf_embedded_engine.render_chat([{"role": "user", "content": QUESTION}])
    with openai.OpenAI(base_url=stock_vllm_serve.base_url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:
        reply = client.completions.create(
            model="smollm2-tq", prompt=prompt, max_tokens=STEPS, temperature=0,
            extra_body={"vllm_xargs": {"alignd_alpha": ALPHA, "alignd_top_k": TOP_K}, "return_token_ids": True})
        stock_tokens = list(reply.choices[0].token_ids)
        with pytest.raises(openai.BadRequestError, match="alignd_alpha"):
            client.completions.create(model="smollm2-tq", prompt=prompt, max_tokens=2,
                                      extra_body={"vllm_xargs": {"alignd_alpha": -1}})
    ours = httpx.post(server.base_url + "/v1/completions", timeout=300, json={
        "model": model_name, "prompt": prompt, "max_tokens": STEPS, "temperature": 0, "decoding": HEAD,
    }).json()["choices"][0]["text"]
    assert hf_embedded_engine.decode(stock_tokens) == ours


def test_the_speed_benchmark_runs_plain_and_head_requests_on_the_stock_server(stock_vllm_serve, embedded_value_head_dir,
                                                                          tmp_path):
    """bench/value_head_speed.py --smoke against this module's stock server (its numbers are not judged
    here: speed is the benchmark's business)."""
    bench = load_bench("value_head_speed")
    out = tmp_path / "summary.json"
    summary = bench.main(["--smoke", "--head", str(embedded_value_head_dir), "--vllm-url", stock_vllm_serve.base_url,
                          "--served-model-name", "smollm2-tq", "--alpha", str(ALPHA), "--top-k", str(TOP_K),
                          "--work-dir", str(tmp_path), "--out", str(out)])
    assert out.is_file() and summary["setup"]["vllm_url_given"]
    [row] = summary["concurrency"].values()
    for side in ("plain", "head"):
        assert row[side]["output_throughput"] > 0 and row[side]["mean_output_tokens"] == summary["setup"]["output_len"]
    assert row["ratio"] > 0 and isinstance(row["goal_met"], bool)
    assert row["answers_changed"] is not None and row["answers_changed"] > 0  # the head acted on the head side only
    assert "head / plain (paired)" in bench.markdown(summary["concurrency"])
