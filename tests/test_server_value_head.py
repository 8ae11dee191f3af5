"""TQ* by the value head through the real server (``decoding.value='head'``): the session server runs the
embedded model on alignd's value-guided model class with a seeded random head (conftest's
``embedded_value_head_dir``), so the expected tokens are computed by hand here: transformers' forward
pass of the same weights in float32, the same head, ``argmax over the top-k of log pi_sft + Q / alpha``.
Then the same folder under stock ``vllm serve`` (conftest's ``stock_vllm_serve``, the session's dtype) gives
the same answer as alignd for the same request."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import pytest
import torch
from support import load_bench

from alignd.models.value_head import load_value_head

pytestmark = pytest.mark.server

ALPHA = 0.1  # the head decides: the test checks that it changes the answer
TOP_K = 5
STEPS = 10
QUESTION = "Tell me about your weekend."
HEAD = {"method": "transfer_q", "value": "head", "alpha": ALPHA, "top_k": TOP_K}
# In float32 both engines agree to about 1e-5, but batch shapes change the last bits: where the hand rule's
# best two scores are closer than this, either choice is the rule's. In bfloat16 the bound grows by the
# measured errors (HandRule.check, tests/precision.py).
NEAR_TIE = 1e-3


@dataclass(frozen=True)
class Tolerance:
    """How far the served engine's numbers may be from the float32 hand rule's: its log-probabilities
    (measured on the session server) and the head's values (measured here: the head on a bfloat16 forward
    pass's hidden states against the float32 one's). Zero in float32."""

    logprob: float = 0.0
    value: float = 0.0

    def score_gap(self) -> float:
        """Largest error of a difference of two candidates' scores ``log pi + Q / alpha``."""
        return NEAR_TIE + 2 * self.logprob + 2 * self.value / ALPHA


EXACT = Tolerance()  # float32 against float32


class HandRule:
    def __init__(self, model, head, low_precision_model=None) -> None:
        self.model, self.head, self.low_precision_model = model, head, low_precision_model

    @torch.no_grad()
    def step(self, model, prefix: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The final (normalised) hidden state at ``prefix`` and the next token's log-probabilities."""
        hidden = model.model(input_ids=torch.tensor([list(prefix)])).last_hidden_state[0, -1]
        return hidden, torch.log_softmax(model.lm_head(hidden).float(), dim=-1)

    @torch.no_grad()
    def values(self, hidden: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.model.embed_tokens.weight[candidates].unsqueeze(0)
        return self.head(hidden.float().unsqueeze(0), embeddings)[0]

    def candidate_sets(self, logprobs: torch.Tensor, tol: Tolerance) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens the engine's top-k may hold (within the log-probability error of the k-th) and tokens it
        must hold (above the (k+1)-th by more than that error)."""
        ranked = logprobs.topk(TOP_K + 1).values
        possible = (logprobs >= ranked[TOP_K - 1] - 2 * tol.logprob).nonzero().flatten()
        sure = (logprobs > ranked[TOP_K] + 2 * tol.logprob).nonzero().flatten()
        return possible, sure

    def value_error(self, prompt: Sequence[int], tokens: Sequence[int]) -> float:
        """The largest change of the head's values over the candidates of each step when the hidden state
        comes from a bfloat16 forward pass instead of the float32 one (0 without a low-precision model)."""
        if self.low_precision_model is None:
            return 0.0
        worst = 0.0
        for t in range(len(tokens)):
            prefix = [*prompt, *tokens[:t]]
            hidden, logprobs = self.step(self.model, prefix)
            low, _ = self.step(self.low_precision_model, prefix)
            candidates = logprobs.topk(TOP_K + 3).indices
            worst = max(worst, float((self.values(low, candidates) - self.values(hidden, candidates)).abs().max()))
        return worst

    def check(self, prompt: Sequence[int], tokens: Sequence[int], tol: Tolerance = EXACT) -> int:
        """Every token is the rule's argmax at its prefix, up to the tolerance: a token the engine's top-k
        may hold, whose score is within ``tol.score_gap()`` of the best candidate the top-k must hold.
        Returns how many steps the rule moved away from the SFT model's own greedy choice."""
        moved = 0
        for t, token in enumerate(tokens):
            hidden, logprobs = self.step(self.model, [*prompt, *tokens[:t]])
            possible, sure = self.candidate_sets(logprobs, tol)
            scores = logprobs[possible] + self.values(hidden, possible) / ALPHA
            by_token = dict(zip(possible.tolist(), scores.tolist(), strict=False))
            assert token in by_token, (t, token, possible.tolist())
            best = max(sure.tolist(), key=by_token.__getitem__)
            gap = by_token[best] - by_token[token]
            assert gap < tol.score_gap(), f"step {t}: served {token}, the rule {best} by {gap:.4f} ({tol})"
            top = logprobs.topk(TOP_K).indices
            pick = int((logprobs[top] + self.values(hidden, top) / ALPHA).argmax())
            moved += pick != 0  # the rule moved away from SFT greedy
            rule = int(top[pick])
            if rule != token:  # the evidence of what the tolerance admitted (printed with -s)
                rank = int((logprobs > logprobs[rule]).sum()) + 1
                print(
                    f"step {t}: served {token}, the float32 rule over its top-{TOP_K} {rule} (SFT rank {rank}, "
                    f"{'surely' if rule in sure.tolist() else 'perhaps not'} in the engine's top-{TOP_K}), "
                    f"{by_token[rule] - by_token[token]:.3f} nats apart"
                )
        return moved


@pytest.fixture(scope="module")
def hand_rule(hf_embedded_engine, embedded_value_head_dir) -> HandRule:
    import copy

    from precision import is_exact

    low = None if is_exact() else copy.deepcopy(hf_embedded_engine.model).to(torch.bfloat16)
    return HandRule(hf_embedded_engine.model, load_value_head(embedded_value_head_dir).head, low)


def tolerance(hand_rule: HandRule, served_precision, prompt, tokens) -> Tolerance:
    if served_precision.dtype == "float32":
        return Tolerance()
    tol = Tolerance(logprob=served_precision.max, value=hand_rule.value_error(prompt, tokens))
    print(
        f"\n{served_precision}; head values from bfloat16 hidden states: error up to {tol.value:.4f}; "
        f"score gaps within {tol.score_gap():.3f} nats at alpha {ALPHA}"
    )
    return tol


def chat(model_name: str, decoding: dict | None, **fields) -> dict:
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": STEPS,
        "temperature": 0,
        **fields,
    }
    return body | ({"decoding": decoding} if decoding else {})


def test_the_value_head_is_listed_with_its_provenance(server, embedded_value_head_dir):
    card = httpx.get(server.base_url + "/v1/value_head", timeout=30).json()
    assert card["available"] and card["reward"] == "positivity" and card["baseline"] == "default"
    assert card["path"] == str(embedded_value_head_dir.resolve())
    assert card["provenance"]["head"]["rank"] == 16 and card["provenance"]["base_model"]["weights_digest"]


def test_greedy_head_decoding_is_the_rule_at_every_step_streamed_or_not(
    openai_client, model_name, hand_rule, hf_embedded_engine, served_precision
):
    kwargs = chat(model_name, None)
    whole = openai_client.chat.completions.create(**{k: v for k, v in kwargs.items()}, extra_body={"decoding": HEAD})
    text = whole.choices[0].message.content
    prompt = hf_embedded_engine.render_chat([{"role": "user", "content": QUESTION}])
    tokens = hf_embedded_engine.encode(text)
    assert hand_rule.check(prompt, tokens, tolerance(hand_rule, served_precision, prompt, tokens)) > 0  # the head acted
    plain = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    assert plain != text
    chunks = list(openai_client.chat.completions.create(**kwargs, stream=True, extra_body={"decoding": HEAD}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_head_diagnostics_report_the_sft_candidates_and_no_values(
    server, model_name, hand_rule, hf_embedded_engine, served_precision
):
    body = chat(model_name, {**HEAD, "diagnostics": True}, max_tokens=4)
    reply = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=300).json()
    alignment = reply["choices"][0]["alignment"]
    assert alignment["method"] == "transfer_q" and alignment["value"] == "head"
    assert alignment["kl"] is None and -1.0 <= alignment["reward"] <= 1.0
    assert alignment["cost"]["rollouts"] == 0 and len(alignment["steps"]) == 4
    prompt = hf_embedded_engine.render_chat([{"role": "user", "content": QUESTION}])
    chosen: list[int] = []
    # float32: the hand rule's candidates in its order, log-probabilities to 1e-3; bfloat16: candidates the
    # engine's top-k may and must hold, each log-probability within the session server's measured error
    tol = Tolerance(logprob=0.0 if served_precision.dtype == "float32" else served_precision.max)
    for step in alignment["steps"]:
        served = {c["token_id"]: c["sft_logprob"] for c in step["candidates"]}
        _, logprobs = hand_rule.step(hand_rule.model, [*prompt, *chosen])
        if tol.logprob == 0:
            assert list(served) == logprobs.topk(TOP_K).indices.tolist()
        possible, sure = hand_rule.candidate_sets(logprobs, tol)
        assert len(served) == TOP_K and set(served) <= set(possible.tolist()) and set(sure.tolist()) <= set(served)
        assert list(served.values()) == pytest.approx([float(logprobs[t]) for t in served], abs=max(1e-3, tol.logprob))
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
# (conftest's session-scoped `stock_vllm_serve`: the folder alignd prepares, in the session's dtype, under the
# session server's model name)


def test_stock_vllm_serve_gives_alignd_s_answer_for_the_same_request(
    stock_vllm_serve, server, model_name, hf_embedded_engine
):
    import openai

    prompt = hf_embedded_engine.render_chat([{"role": "user", "content": QUESTION}])
    with openai.OpenAI(
        base_url=stock_vllm_serve.base_url + "/v1", api_key="unused", max_retries=0, timeout=300
    ) as client:
        reply = client.completions.create(
            model=model_name,
            prompt=prompt,
            max_tokens=STEPS,
            temperature=0,
            extra_body={"vllm_xargs": {"alignd_alpha": ALPHA, "alignd_top_k": TOP_K}, "return_token_ids": True},
        )
        stock_tokens = list(reply.choices[0].token_ids)
        with pytest.raises(openai.BadRequestError, match="alignd_alpha"):
            client.completions.create(
                model=model_name, prompt=prompt, max_tokens=2, extra_body={"vllm_xargs": {"alignd_alpha": -1}}
            )
    ours = httpx.post(
        server.base_url + "/v1/completions",
        timeout=300,
        json={
            "model": model_name,
            "prompt": prompt,
            "max_tokens": STEPS,
            "temperature": 0,
            "decoding": HEAD,
        },
    ).json()["choices"][0]["text"]
    assert hf_embedded_engine.decode(stock_tokens) == ours


def test_the_speed_benchmark_runs_plain_and_head_requests_on_the_stock_server(
    stock_vllm_serve, embedded_value_head_dir, model_name, tmp_path
):
    """bench/value_head_speed.py --smoke against this module's stock server (its numbers are not judged
    here: speed is the benchmark's business)."""
    bench = load_bench("value_head_speed")
    out = tmp_path / "summary.json"
    summary = bench.main(
        [
            "--smoke",
            "--head",
            str(embedded_value_head_dir),
            "--vllm-url",
            stock_vllm_serve.base_url,
            "--served-model-name",
            model_name,
            "--alpha",
            str(ALPHA),
            "--top-k",
            str(TOP_K),
            "--work-dir",
            str(tmp_path),
            "--out",
            str(out),
        ]
    )
    assert out.is_file() and summary["setup"]["vllm_url_given"]
    [rows] = summary["concurrency"].values()
    assert list(rows) == ["head"]  # no --implicit: no implicit side
    row = rows["head"]
    for side in ("plain", "head"):
        assert row[side]["output_throughput"] > 0 and row[side]["mean_output_tokens"] == summary["setup"]["output_len"]
    assert row["ratio"] > 0 and isinstance(row["goal_met"], bool) and row["goal"] == bench.GOALS["head"]
    assert row["answers_changed"] is not None and row["answers_changed"] > 0  # the head acted on the head side only
    assert "side / plain (paired)" in bench.markdown(summary["concurrency"])
    assert [bench.round_order(("plain", "head", "implicit"), r)[0] for r in (1, 2, 3, 4)] == [
        "plain",
        "head",
        "implicit",
        "plain",
    ]
