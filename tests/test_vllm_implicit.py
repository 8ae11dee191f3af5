"""TQ* with a baseline's implicit Q inside vLLM's decode step (``alignd_value: "implicit"``): the value-guided
model class with a baseline's decoder stack beside the SFT model's (``alignd.models.baseline_stack``), on
the tiny model in float32. The baseline: a random LoRA adapter merged into the tiny model, said to be DPO
with beta 0.2 (conftest: one folder with the head too, one in-process engine and one stock `vllm serve` of
it for the session). Checked against transformers' forward passes of both models, by hand."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from support import TINY_ADAPTER_BETA as BETA
from support import TINY_SERVED_NAME

from alignd.errors import ConfigurationError
from alignd.models.baseline_stack import IMPLICIT, VALUE_KEY, BaselineStack
from alignd.models.value_head import ALPHA_KEY, TOP_K_KEY, prepare_value_guided_folder

pytestmark = pytest.mark.vllm

PROMPT_TEXTS = ["the cat sat on", "hello world how are", "numbers one two", "a happy answer is"]
STEPS = 8


@pytest.fixture(scope="module")
def merged_dir(tiny_merged_baseline_dir):
    return tiny_merged_baseline_dir


@pytest.fixture(scope="module")
def served_dir(tiny_value_guided_dir):
    """The session's tiny value-guided folder: the test head and this baseline's stack (conftest)."""
    return tiny_value_guided_dir


class HandRule:
    """The rule by hand in transformers (float32): the SFT and the merged baseline's forward passes."""

    def __init__(self, sft_dir, baseline_dir) -> None:
        from transformers import LlamaForCausalLM

        self.sft = LlamaForCausalLM.from_pretrained(sft_dir, dtype=torch.float32).eval()
        self.baseline = LlamaForCausalLM.from_pretrained(baseline_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def logprobs(self, prefix: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([list(prefix)])
        return (
            torch.log_softmax(self.sft(ids).logits[0, -1].float(), -1),
            torch.log_softmax(self.baseline(ids).logits[0, -1].float(), -1),
        )

    def choice(self, prefix: Sequence[int], alpha: float, top_k: int) -> int:
        sft, baseline = self.logprobs(prefix)
        candidates = sft.topk(top_k).indices if top_k else torch.arange(sft.shape[0])
        scores = sft[candidates] + BETA * (baseline[candidates] - sft[candidates]) / alpha
        return int(candidates[int(scores.argmax())])

    def greedy(self, model, prompt: Sequence[int], steps: int) -> list[int]:
        tokens: list[int] = []
        with torch.no_grad():
            for _ in range(steps):
                tokens.append(int(model(torch.tensor([[*prompt, *tokens]])).logits[0, -1].argmax()))
        return tokens


@pytest.fixture(scope="module")
def hand(tiny_vllm_dir, merged_dir) -> HandRule:
    return HandRule(tiny_vllm_dir, merged_dir)


@pytest.fixture(scope="module")
def prompts(tiny_vllm_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_vllm_dir)
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in PROMPT_TEXTS]


@pytest.fixture(scope="module")
def llm(tiny_value_guided_llm) -> object:
    """The session's in-process engine on the folder with the head and the baseline stack (conftest)."""
    return tiny_value_guided_llm


def implicit(alpha: float, top_k: int) -> dict:
    return {VALUE_KEY: IMPLICIT, ALPHA_KEY: alpha, TOP_K_KEY: top_k}


def greedy(extra_args: dict | None = None):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, extra_args=extra_args)


def generate(llm, requests) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": list(p)} for p, _ in requests], [s for _, s in requests], use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outs]


class TestInEngine:
    def test_at_alpha_beta_over_the_vocabulary_it_is_the_merged_baseline(self, llm, hand, prompts):
        answers = generate(llm, [(p, greedy(implicit(BETA, 0))) for p in prompts])
        changed = 0
        for prompt, tokens in zip(prompts, answers, strict=False):
            assert tokens == hand.greedy(hand.baseline, prompt, STEPS)
            changed += tokens != hand.greedy(hand.sft, prompt, STEPS)
        assert changed >= 2, "the adapter should change most greedy answers, or this test shows nothing"

    @pytest.mark.parametrize(("alpha", "top_k"), [(0.05, 5), (1.0, 5), (0.1, 0)])
    def test_every_step_is_the_rule_by_hand(self, llm, hand, prompts, alpha, top_k):
        for prompt, tokens in zip(
            prompts, generate(llm, [(p, greedy(implicit(alpha, top_k))) for p in prompts]), strict=False
        ):
            for t, token in enumerate(tokens):
                assert token == hand.choice([*prompt, *tokens[:t]], alpha, top_k), (prompt, t)

    def test_a_mixed_batch_keeps_plain_rows_exact_and_each_request_its_own_alpha(self, llm, hand, prompts):
        alone = [generate(llm, [(prompts[1], greedy(implicit(a, 5)))])[0] for a in (0.05, 1.0)]
        assert alone[0] != alone[1], "the two alphas should decode differently, or this test shows nothing"
        batch = generate(
            llm,
            [
                *[(p, greedy()) for p in prompts],
                (prompts[1], greedy(implicit(0.05, 5))),
                (prompts[1], greedy(implicit(1.0, 5))),
            ],
        )
        assert batch[: len(prompts)] == [hand.greedy(hand.sft, p, STEPS) for p in prompts]
        assert batch[len(prompts) :] == alone

    def test_bad_values_are_refused_naming_the_key(self, llm, prompts):
        from vllm.exceptions import VLLMValidationError

        for extra, key in (
            ({VALUE_KEY: "rollouts", ALPHA_KEY: 1.0}, VALUE_KEY),
            (implicit(0.0, 5), ALPHA_KEY),
            ({VALUE_KEY: IMPLICIT, TOP_K_KEY: 3}, ALPHA_KEY),
            ({ALPHA_KEY: 1.0, TOP_K_KEY: 0}, TOP_K_KEY),
        ):
            with pytest.raises(VLLMValidationError, match=key):
                generate(llm, [(prompts[0], greedy(extra))])
        assert generate(llm, [(prompts[0], greedy(implicit(BETA, 0)))])  # still serving


def test_a_baseline_of_another_shape_is_refused_at_preparation(tiny_vllm_dir, tiny_llama_dir, tmp_path):
    stack = BaselineStack(path=str(tiny_llama_dir), beta=BETA, name="other")  # the 8-wide-head tiny model
    with pytest.raises(ConfigurationError, match="must be a fine-tune of this very model"):
        prepare_value_guided_folder(tiny_vllm_dir, None, tmp_path / "out", baseline=stack)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- through alignd
@pytest.fixture(scope="module")
def implicit_server(tiny_vllm_dir, tiny_dpo_adapter, tmp_path_factory):
    """alignd on the tiny model with a DPO-like adapter as its default baseline (merged on an engine of its
    own), its implicit values computed in the served engine's step (ALIGND_IMPLICIT_IN_ENGINE), float32."""
    from support import ServerProcess, tiny_server_env

    env = {
        **tiny_server_env(tiny_vllm_dir),
        "ALIGND_DTYPE": "float32",
        "ALIGND_BASELINE_ADAPTER": str(tiny_dpo_adapter),
        "ALIGND_ADAPTER_SERVING": "merged",
        "ALIGND_VALUE_HEAD": "none",
        "ALIGND_IMPLICIT_IN_ENGINE": "true",
        "ALIGND_CACHE_DIR": str(tmp_path_factory.mktemp("server-cache")),
    }
    with ServerProcess(env) as server:
        server.wait_ready(timeout=600)
        yield server


def test_alignd_computes_implicit_values_in_its_engine_step_as_it_does_outside(implicit_server, hand, prompts):
    """Without diagnostics the engine's step computes the values (one engine request an answer); with them,
    alignd's own step loop does (every candidate's values and the KL): the same answers, in float32. At
    alpha = beta over the whole vocabulary both are the baseline's own greedy answer; plain requests on the
    same engine stay the SFT model's."""
    import httpx

    def answer(prompt: str, decoding: dict | None) -> list[int]:
        # (the server encodes the text without special tokens, as the prompts fixture does)
        body = {"prompt": prompt, "max_tokens": STEPS, "temperature": 0, **({"decoding": decoding} if decoding else {})}
        r = httpx.post(implicit_server.base_url + "/generate", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    url = implicit_server.base_url
    default = next(c for c in httpx.get(url + "/v1/baselines").json()["data"] if c["name"] == "default")
    assert default["implicit_q"]["beta"] == BETA
    for text, prompt in zip(PROMPT_TEXTS[:3], prompts, strict=False):
        for knobs in ({"alpha": 0.05, "top_k": 5}, {"top_k": 0}):
            decoding = {"method": "transfer_q", "value": "implicit", **knobs}
            in_engine = answer(text, decoding)
            assert in_engine == answer(text, {**decoding, "diagnostics": True}), (text, knobs)
        assert in_engine == answer(text, {"method": "baseline"})  # alpha = beta, whole vocabulary
        # (an answer may end at the end-of-text token before STEPS; the hand rule's runs on)
        assert in_engine == hand.greedy(hand.baseline, prompt, STEPS)[: len(in_engine)] and in_engine
        plain = answer(text, None)
        assert plain == hand.greedy(hand.sft, prompt, STEPS)[: len(plain)] and plain
    metrics = httpx.get(url + "/metrics").text
    assert 'alignd_decoding_requests_total{method="transfer_q_implicit"}' in metrics


def test_stock_vllm_serve_answers_the_openai_client_with_implicit_values(tiny_stock_vllm_serve, hand, prompts):
    """The folder with the baseline stack (and the head) on stock `vllm serve` (alignd's plugin from its entry
    points; the session's tiny server): a request asks with vllm_xargs; the answers are the rule's, plain
    requests the SFT model's."""
    import openai

    server = tiny_stock_vllm_serve
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:

        def complete(prompt: Sequence[int], xargs: dict | None) -> list[int]:
            extra = {"ignore_eos": True, "return_token_ids": True} | ({"vllm_xargs": xargs} if xargs else {})
            reply = client.completions.create(
                model=TINY_SERVED_NAME, prompt=list(prompt), max_tokens=STEPS, temperature=0, extra_body=extra
            )
            return list(reply.choices[0].token_ids)

        for prompt in prompts[:2]:
            assert complete(prompt, implicit(BETA, 0)) == hand.greedy(hand.baseline, prompt, STEPS)
            tokens = complete(prompt, implicit(0.05, 5))
            assert all(token == hand.choice([*prompt, *tokens[:t]], 0.05, 5) for t, token in enumerate(tokens))
            assert complete(prompt, None) == hand.greedy(hand.sft, prompt, STEPS)
        with pytest.raises(openai.BadRequestError, match=ALPHA_KEY):
            complete(prompts[0], implicit(-1.0, 5))
