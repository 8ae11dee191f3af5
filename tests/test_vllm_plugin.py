"""alignd's vLLM plugin (vllm_plugin/): Transfer Q* with a value head inside vLLM's own decode step.

The model: a tiny random Llama with the BPE tokenizer of conftest's ``tiny_llama_dir`` and 32-wide
attention heads, the smallest vLLM's CPU attention runs (conftest's own tiny Llama has 8-wide heads,
which run in transformers only). The head: a random ``ValueHead`` with a fixed seed, so Q is known: the expected
tokens are computed by hand here, with transformers on the same weights in float32 (the engine runs
float32 too) and the same head, as ``argmax over the top-k of log pi_sft + Q / alpha``.

One in-process ``vllm.LLM`` serves the prepared folder for the tests of ``TestInEngine`` (class-scoped:
it is shut down before ``vllm serve`` starts, so one engine runs at a time); then one stock
``vllm serve`` of the same folder answers the official ``openai`` client. Both find alignd's model
class and logits processor through the installed entry points only (no flag, no argument).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lint_imports
import pytest
import torch
from scipy.stats import chi2
from support import (
    TINY_HEAD_BASE_NAME,
    TINY_HEAD_REWARD,
    TINY_SERVED_NAME,
    ManagedProcess,
    random_value_head,
    save_tiny_head,
)

from alignd.decoding.rule import reweight, transfer_q_logits
from alignd.errors import ConfigurationError
from alignd.models.value_head import (
    ALPHA_KEY,
    CONFIG_HEAD_KEY,
    MAX_TOP_K,
    TOP_K_KEY,
    VALUE_GUIDED_ARCHITECTURE,
    VALUE_GUIDED_MARKER,
    ValueHead,
    load_value_head,
    prepare_value_guided_folder,
    save_value_head,
)

pytestmark = pytest.mark.vllm

BASE_NAME = TINY_HEAD_BASE_NAME
PROMPT_TEXTS = ["the cat sat on", "hello world how are", "numbers one two", "a happy answer is"]
STEPS = 8  # greedy tokens checked per request
SMALL_ALPHA = 0.05  # the head decides (the test checks that it changes the answer)
LARGE_ALPHA = 1e4  # the model decides (the answer is plain greedy)


# ---------------------------------------------------------------------------- models and the head
random_head = random_value_head
save_head = save_tiny_head


@pytest.fixture(scope="module")
def base_dir(tiny_vllm_dir) -> Path:
    return tiny_vllm_dir


@pytest.fixture(scope="module")
def head_dir(tiny_head_dir) -> Path:
    return tiny_head_dir


@pytest.fixture(scope="module")
def served_dir(tiny_value_guided_dir) -> Path:
    return tiny_value_guided_dir


@dataclass
class HandRule:
    """TQ* written out by hand: transformers' forward pass of the base model and the same head."""

    model: object  # transformers LlamaForCausalLM, float32
    head: ValueHead

    @torch.no_grad()
    def step(self, prefix: Sequence[int], alpha: float, top_k: int) -> tuple[list[int], list[float], torch.Tensor]:
        """Candidates (most likely first), their scores ``log pi_sft + Q / alpha``, and the SFT log-probs."""
        hidden = self.model.model(input_ids=torch.tensor([list(prefix)])).last_hidden_state[0, -1]  # final norm applied
        logprobs = torch.log_softmax(self.model.lm_head(hidden).float(), dim=-1)
        top = logprobs.topk(top_k)
        embeddings = self.model.model.embed_tokens.weight[top.indices]
        q = self.head(hidden.unsqueeze(0), embeddings.unsqueeze(0))[0]
        return top.indices.tolist(), (top.values + q / alpha).tolist(), logprobs

    def greedy_choice(self, prefix: Sequence[int], alpha: float, top_k: int) -> int:
        candidates, scores, _ = self.step(prefix, alpha, top_k)
        return candidates[max(range(len(scores)), key=scores.__getitem__)]

    def plain_greedy(self, prompt: Sequence[int], steps: int) -> list[int]:
        tokens: list[int] = []
        for _ in range(steps):
            _, _, logprobs = self.step([*prompt, *tokens], 1.0, 1)
            tokens.append(int(logprobs.argmax()))
        return tokens

    def check_greedy_path(self, prompt: Sequence[int], tokens: Sequence[int], alpha: float, top_k: int) -> None:
        """Every token of an engine answer is the hand rule's argmax at the engine's own prefix."""
        for t, token in enumerate(tokens):
            expected = self.greedy_choice([*prompt, *tokens[:t]], alpha, top_k)
            assert token == expected, f"step {t}: engine chose {token}, the rule {expected} (alpha {alpha}, k {top_k})"


@pytest.fixture(scope="module")
def hand_rule(base_dir, head_dir) -> HandRule:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return HandRule(model, load_value_head(head_dir).head)


@pytest.fixture(scope="module")
def prompts(base_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in PROMPT_TEXTS]


def tq(alpha: float, top_k: int | None = None) -> dict:
    return {ALPHA_KEY: alpha} | ({} if top_k is None else {TOP_K_KEY: top_k})


# ---------------------------------------------------------------------------- the rule, batched
def test_transfer_q_logits_is_reweight_batched():
    torch.manual_seed(0)
    logits = torch.randn(3, 20) * 3
    logits[1, 4] = -math.inf  # a token masked before the rule (e.g. min_tokens) stays impossible
    candidate_ids = logits.topk(5, dim=-1).indices
    values = torch.randn(3, 5)
    values[2, 3:] = -math.inf  # row 2 asks for k = 3: its last two candidates are padding
    alpha = torch.tensor([0.5, 1.0, 3.0])
    before = logits.clone(), values.clone()

    new = transfer_q_logits(logits, candidate_ids, values, alpha)

    assert torch.equal(logits, before[0]) and torch.equal(values, before[1])  # inputs untouched
    sft = torch.log_softmax(logits, dim=-1)
    for row, k in enumerate((5, 5, 3)):
        ids = candidate_ids[row, :k].tolist()
        rule = reweight(ids, sft[row, ids].tolist(), values[row, :k].tolist(), float(alpha[row]))
        assert torch.softmax(new[row], dim=-1)[ids].tolist() == pytest.approx(
            [math.exp(lp) for lp in rule.logprobs], abs=1e-6
        )
        outside = torch.ones(20, dtype=torch.bool)
        outside[ids] = False
        assert torch.isneginf(new[row, outside]).all()
        assert int(new[row].argmax()) == ids[rule.greedy_index()]
    # an infinite alpha is the SFT model restricted to its top-k
    sft_like = transfer_q_logits(logits, candidate_ids, values, torch.full((3,), math.inf))
    assert torch.allclose(sft_like[0, candidate_ids[0]], sft[0, candidate_ids[0]], atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        transfer_q_logits(logits, candidate_ids, values, alpha[:2])


# ---------------------------------------------------------------------------- request keys
def test_request_keys_are_checked_with_messages_that_say_what_to_send():
    from alignd.vllm_plugin.logits_processor import DEFAULT_TOP_K, TransferQRequest, transfer_q_request

    assert transfer_q_request(None) is None and transfer_q_request({"other": 1}) is None
    assert transfer_q_request(tq(0.5)) == TransferQRequest(0.5, DEFAULT_TOP_K)
    assert transfer_q_request(tq(2, MAX_TOP_K)) == TransferQRequest(2.0, MAX_TOP_K)
    for bad in (0, -1.0, math.nan, math.inf, "0.5", True, None, [1.0]):
        with pytest.raises(ValueError, match=f"{ALPHA_KEY} must be a finite number > 0"):
            transfer_q_request(tq(bad))
    for bad in (0, MAX_TOP_K + 1, 2.5, "3", True):
        with pytest.raises(ValueError, match=f"{TOP_K_KEY} must be an integer from 1 to {MAX_TOP_K}"):
            transfer_q_request(tq(1.0, bad))
    with pytest.raises(ValueError, match=f"send {ALPHA_KEY}"):
        transfer_q_request({TOP_K_KEY: 4})


# ---------------------------------------------------------------------------- the prepared folder
def test_prepared_folder_links_the_base_and_names_the_class_and_the_head(
    base_dir, head_dir, served_dir, tiny_baseline_stack
):
    config = json.loads((served_dir / "config.json").read_text())
    assert config["architectures"] == [VALUE_GUIDED_ARCHITECTURE]
    assert config[CONFIG_HEAD_KEY] == str(head_dir.resolve())
    assert json.loads((base_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]  # untouched
    weights = served_dir / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (base_dir / "model.safetensors").resolve()
    assert (served_dir / "tokenizer.json").is_symlink()
    # idempotent: the same folder, not rewritten
    marker = served_dir / VALUE_GUIDED_MARKER
    stamp = marker.stat().st_mtime_ns
    assert prepare_value_guided_folder(base_dir, head_dir, served_dir, baseline=tiny_baseline_stack) == served_dir
    assert marker.stat().st_mtime_ns == stamp
    assert not [p for p in served_dir.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_prepared_folder_is_replaced_whole_and_never_overwrites_a_foreign_folder(base_dir, head_dir, tmp_path):
    out = prepare_value_guided_folder(base_dir, head_dir, tmp_path / "tq")
    other_head = save_head(
        random_head(64, json.loads((base_dir / "config.json").read_text())["vocab_size"], seed=2), tmp_path / "head-2"
    )
    again = prepare_value_guided_folder(base_dir, other_head, tmp_path / "tq")  # another head: re-made
    assert again == out and json.loads((out / "config.json").read_text())[CONFIG_HEAD_KEY] == str(other_head.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head-2", "tq"]
    foreign = tmp_path / "someone-elses"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigurationError, match="not a value-guided folder"):
        prepare_value_guided_folder(base_dir, head_dir, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_a_head_for_another_model_is_refused_naming_both(base_dir, tmp_path):
    vocab = json.loads((base_dir / "config.json").read_text())["vocab_size"]
    for name, head in (("vocabulary", random_head(64, vocab + 1)), ("hidden size", random_head(32, vocab))):
        folder = save_head(head, tmp_path / name.replace(" ", "-"))
        with pytest.raises(ConfigurationError, match=name) as refused:
            prepare_value_guided_folder(base_dir, folder, tmp_path / "out")
        assert BASE_NAME in refused.value.message and str(base_dir.resolve()) in refused.value.message
        assert not (tmp_path / "out").exists()
    other_weights = save_value_head(
        random_head(64, vocab),
        tmp_path / "other-weights",
        {"base_model": {"name": BASE_NAME, "weights_digest": "f" * 64}},
    )
    with pytest.raises(ConfigurationError, match="weights ffffffffffff") as refused:
        prepare_value_guided_folder(base_dir, other_weights, tmp_path / "out", base_weights_digest="0" * 64)
    assert "000000000000" in refused.value.message


# ---------------------------------------------------------------------------- the layering contract bites
WRONG_IMPORTS = {
    "the plugin imports the settings": ("alignd.vllm_plugin.model", "import alignd.settings", "vllm-plugin"),
    "the plugin imports another models module": (
        "alignd.vllm_plugin.scoring",
        "import alignd.models.weights",
        "vllm-plugin",
    ),
    "value_head imports another models module": (
        "alignd.models.value_head",
        "import alignd.models.weights",
        "vllm-plugin-closure",
    ),
    "rule imports the rewards": ("alignd.decoding.rule", "import alignd.rewards.base", "vllm-plugin-closure"),
    "alignd imports the plugin": ("alignd.models.engine", "import alignd.vllm_plugin", "vllm-plugin-private"),
}


@pytest.mark.parametrize("case", list(WRONG_IMPORTS), ids=list(WRONG_IMPORTS))
def test_a_wrong_import_breaks_the_plugin_contracts(case, tmp_path):
    import tomllib

    names = {
        c["id"]: c["name"]
        for c in tomllib.loads((lint_imports.REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    }
    module, wrong, contract = WRONG_IMPORTS[case]
    tree = lint_imports.build_tree(tmp_path)
    real = tree.joinpath(*module.split(".")).with_suffix(".py").resolve().read_text()
    lint_imports.override(tree, module, real + f"\n{wrong}  # deliberately wrong\n")
    result = lint_imports.run_in_tree(tree, capture=True)
    assert f"{names[contract]} BROKEN" in result.stdout, result.stdout


# ---------------------------------------------------------------------------- the frontend, without an engine
def engine_config(model_dir: Path):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(
        model=str(model_dir), dtype="float32", max_model_len=256, enforce_eager=True
    ).create_engine_config()


def test_a_model_without_a_head_refuses_the_keys_at_admission(base_dir):
    """vLLM's own admission path (InputProcessor) on a plain model of the same environment: the keys
    are refused, not decoded plainly; plain requests pass."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    processor = InputProcessor(engine_config(base_dir))

    def admit(params: SamplingParams):
        return processor.process_inputs("r", {"prompt_token_ids": [1, 5, 7]}, params, supported_tasks=("generate",))

    admit(SamplingParams(max_tokens=2))
    admit(SamplingParams(max_tokens=2, extra_args={"someone_else": 1}))
    with pytest.raises(VLLMValidationError, match="without a value head") as refused:
        admit(SamplingParams(max_tokens=2, extra_args=tq(0.5)))
    assert "LlamaForCausalLM" in str(refused.value)
    with pytest.raises(VLLMValidationError, match=f"{ALPHA_KEY} must be"):  # bad values: named first
        admit(SamplingParams(max_tokens=2, extra_args=tq(-1)))


def test_the_model_class_refuses_a_foreign_head_and_model_runner_v2_at_start(
    base_dir, served_dir, tmp_path, monkeypatch
):
    """What the value-guided class checks when vLLM builds it, before loading any weight (a folder edited by
    hand past prepare_value_guided_folder's own check)."""
    from alignd.vllm_plugin.model import load_head_for, refuse_unsupported_engines

    vocab = json.loads((base_dir / "config.json").read_text())["vocab_size"]
    wrong_head = save_head(random_head(64, vocab + 1), tmp_path / "wrong-head")
    for name, edit in (("wrong", {CONFIG_HEAD_KEY: str(wrong_head)}), ("headless", {CONFIG_HEAD_KEY: None})):
        folder = tmp_path / name
        folder.mkdir()
        for entry in served_dir.iterdir():
            if entry.name != "config.json":
                (folder / entry.name).symlink_to(entry.resolve())
        config = json.loads((served_dir / "config.json").read_text()) | edit
        (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
        with pytest.raises(ConfigurationError) as refused:
            load_head_for(engine_config(folder))
        if name == "wrong":
            assert "vocabulary" in refused.value.message
            assert BASE_NAME in refused.value.message and str(folder) in refused.value.message
        else:
            assert "no value head" in refused.value.message
    config = engine_config(served_dir)
    assert load_head_for(config).reward == TINY_HEAD_REWARD
    refuse_unsupported_engines(config)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ConfigurationError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        refuse_unsupported_engines(config)


def test_model_runner_v2_loads_the_processor_and_refuses_only_the_value_guided_model(base_dir, served_dir):
    """Installed, the entry point is loaded by V2 engines too (the default of recent GPU builds), which
    refuse V1-only classes for every model: this one passes V2's check, is a no-op for other models and
    refuses the value-guided model at start, saying what to set."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator

    from alignd.vllm_plugin.logits_processor import ValueGuidedLogitsProcessor

    validate = build_custom_logits_processors_params_validator(None)  # loads every installed entry point
    validate(SamplingParams(max_tokens=1))
    with pytest.raises(VLLMValidationError, match=TOP_K_KEY):
        validate(SamplingParams(max_tokens=1, extra_args=tq(1.0, 0)))

    request_states = object()  # V2's second argument; unused by this processor
    plain = ValueGuidedLogitsProcessor(engine_config(base_dir), request_states)
    assert plain.add_request(0, SamplingParams(extra_args=tq(0.5))) is False
    logits = torch.randn(2, 10)
    before = logits.clone()
    assert plain.apply(logits, None) is logits and torch.equal(logits, before)
    with pytest.raises(ConfigurationError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        ValueGuidedLogitsProcessor(engine_config(served_dir), request_states)


# ---------------------------------------------------------------------------- in the engine
@pytest.fixture(scope="module")
def llm(tiny_value_guided_llm) -> object:
    """The session's in-process engine on the prepared folder (conftest), float32 like the hand rule."""
    return tiny_value_guided_llm


def generate(llm, requests: Sequence[tuple[Sequence[int], object]]) -> list:
    """All requests in one call: vLLM schedules them into the same batches."""
    return llm.generate([{"prompt_token_ids": list(p)} for p, _ in requests], [s for _, s in requests], use_tqdm=False)


def greedy(extra_args: dict | None = None, **fields):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, extra_args=extra_args, **fields)


class TestInEngine:
    def test_greedy_decoding_is_the_rule_at_every_step(self, llm, hand_rule, prompts):
        outs = generate(llm, [(p, greedy(tq(SMALL_ALPHA, 5), logprobs=1)) for p in prompts])
        changed = 0
        for prompt, out in zip(prompts, outs, strict=False):
            tokens = list(out.outputs[0].token_ids)
            assert len(tokens) == STEPS
            hand_rule.check_greedy_path(prompt, tokens, SMALL_ALPHA, 5)
            changed += tokens != hand_rule.plain_greedy(prompt, STEPS)
            # the logprobs vLLM returns are the model's own, taken before any logits processor
            for t, (token, position) in enumerate(zip(tokens, out.outputs[0].logprobs, strict=False)):
                _, _, sft_logprobs = hand_rule.step([*prompt, *tokens[:t]], 1.0, 1)
                assert position[token].logprob == pytest.approx(float(sft_logprobs[token]), abs=1e-4)
        assert changed, "precondition: the head changes some answers at this alpha"
        # a large alpha gives the model's own answer back, where a small one changed it
        [large] = generate(llm, [(prompts[1], greedy(tq(LARGE_ALPHA, 5)))])
        assert list(large.outputs[0].token_ids) == hand_rule.plain_greedy(prompts[1], STEPS)
        assert list(outs[1].outputs[0].token_ids) != hand_rule.plain_greedy(prompts[1], STEPS)

    def test_a_mixed_batch_keeps_plain_rows_exact_and_each_request_its_own_alpha_and_k(self, llm, hand_rule, prompts):
        from vllm import SamplingParams

        long_prompt = [t for p in prompts for t in p]
        plain_only = generate(llm, [(p, greedy(logprobs=3)) for p in prompts])
        batch = [
            *[(p, greedy(logprobs=3)) for p in prompts],  # 0-3 plain
            (prompts[1], greedy(tq(SMALL_ALPHA, 5))),  # 4
            (prompts[1], greedy(tq(1.0, 5))),  # 5 another alpha
            (prompts[2], greedy(tq(SMALL_ALPHA, 2))),  # 6 another k
            (prompts[3], greedy(tq(SMALL_ALPHA, MAX_TOP_K), prompt_logprobs=1)),  # 7 with prompt logprobs
            (long_prompt, SamplingParams(max_tokens=1, prompt_logprobs=2)),  # 8 prompt logprobs only
            (prompts[0], greedy(tq(SMALL_ALPHA, 5))),  # 9
        ]
        outs = generate(llm, batch)

        for row in range(4):
            tokens = list(outs[row].outputs[0].token_ids)
            assert tokens == list(plain_only[row].outputs[0].token_ids) == hand_rule.plain_greedy(prompts[row], STEPS)
            for mixed, alone in zip(outs[row].outputs[0].logprobs, plain_only[row].outputs[0].logprobs, strict=False):
                assert {t: lp.logprob for t, lp in mixed.items()} == pytest.approx(
                    {t: lp.logprob for t, lp in alone.items()}, abs=1e-5
                )
        for row, (alpha, k) in {
            4: (SMALL_ALPHA, 5),
            5: (1.0, 5),
            6: (SMALL_ALPHA, 2),
            7: (SMALL_ALPHA, MAX_TOP_K),
            9: (SMALL_ALPHA, 5),
        }.items():
            hand_rule.check_greedy_path(batch[row][0], list(outs[row].outputs[0].token_ids), alpha, k)
        assert outs[4].outputs[0].token_ids != outs[5].outputs[0].token_ids, "precondition: the alphas disagree"
        # prompt log-probabilities are the plain model's, undisturbed by the rows scored beside them
        for row, prompt in ((7, batch[7][0]), (8, long_prompt)):
            for position, entry in enumerate(outs[row].prompt_logprobs[1:], start=1):
                _, _, logprobs = hand_rule.step(prompt[:position], 1.0, 1)
                assert entry[prompt[position]].logprob == pytest.approx(float(logprobs[prompt[position]]), abs=1e-4)

    def test_sampling_frequencies_match_the_rule(self, llm, hand_rule, prompts):
        """First-token frequencies over seeded draws at temperature 1 against softmax(log pi_sft + Q/alpha)
        over the top-k. Chi-square at the 0.999 quantile: a correct sampler fails about 1 run in 1000."""
        from vllm import SamplingParams

        alpha, k, draws = 1.0, 4, 2000
        prompt = prompts[0]
        candidates, scores, _ = hand_rule.step(prompt, alpha, k)
        probabilities = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0)
        expected = (probabilities * draws).tolist()
        assert min(expected) >= 5, f"precondition: every candidate is drawn often enough ({expected})"
        outs = generate(
            llm,
            [
                (prompt, SamplingParams(temperature=1.0, max_tokens=1, seed=seed, extra_args=tq(alpha, k)))
                for seed in range(draws)
            ],
        )
        counts = Counter(out.outputs[0].token_ids[0] for out in outs)
        assert set(counts) <= set(candidates)
        observed = [counts[z] for z in candidates]
        stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=False))
        assert stat < chi2.ppf(0.999, df=k - 1), (observed, expected)

    def test_bad_values_are_refused_and_the_engine_keeps_serving(self, llm, hand_rule, prompts):
        from vllm.exceptions import VLLMValidationError

        for bad, key in (
            (0, ALPHA_KEY),
            (-0.5, ALPHA_KEY),
            (math.nan, ALPHA_KEY),
            ("1", ALPHA_KEY),
            (tq(1.0, 0), TOP_K_KEY),
            (tq(1.0, MAX_TOP_K + 1), TOP_K_KEY),
            (tq(1.0, 1.5), TOP_K_KEY),
        ):
            extra_args = bad if isinstance(bad, dict) else tq(bad)
            with pytest.raises(VLLMValidationError, match=key):
                generate(llm, [(prompts[0], greedy(extra_args))])
        [out] = generate(llm, [(prompts[1], greedy(tq(SMALL_ALPHA, 5)))])
        hand_rule.check_greedy_path(prompts[1], list(out.outputs[0].token_ids), SMALL_ALPHA, 5)


# ---------------------------------------------------------------------------- stock `vllm serve`
@pytest.fixture(scope="module")
def vllm_serve(tiny_stock_vllm_serve) -> ManagedProcess:
    return tiny_stock_vllm_serve


def test_stock_vllm_serve_answers_the_openai_client_value_guided(vllm_serve, hand_rule, prompts):
    import openai

    with openai.OpenAI(base_url=vllm_serve.base_url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:

        def complete(prompt: Sequence[int], xargs: dict | None) -> list[int]:
            extra = {"ignore_eos": True, "return_token_ids": True} | ({"vllm_xargs": xargs} if xargs else {})
            reply = client.completions.create(
                model=TINY_SERVED_NAME, prompt=list(prompt), max_tokens=STEPS, temperature=0, extra_body=extra
            )
            return list(reply.choices[0].token_ids)

        for prompt in prompts[:2]:
            tokens = complete(prompt, tq(SMALL_ALPHA, 5))
            hand_rule.check_greedy_path(prompt, tokens, SMALL_ALPHA, 5)
        assert complete(prompts[0], None) == hand_rule.plain_greedy(prompts[0], STEPS)
        for xargs, key in ((tq(0), ALPHA_KEY), (tq(1.0, MAX_TOP_K + 1), TOP_K_KEY), ({TOP_K_KEY: 3}, ALPHA_KEY)):
            with pytest.raises(openai.BadRequestError, match=key) as refused:
                complete(prompts[0], xargs)
            assert refused.value.status_code == 400
        assert complete(prompts[0], tq(SMALL_ALPHA, 5)) == complete(prompts[0], tq(SMALL_ALPHA, 5))  # still serving
