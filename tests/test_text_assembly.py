"""alignd.decoding.text.TextAssembler: a growing answer's text, released piece by piece, against the
tokenizer's own decode of the whole answer (the tiny model's byte-level BPE, whose toy vocabulary splits
most characters outside its corpus into single bytes: many tokens end inside a UTF-8 character)."""

from __future__ import annotations

import random

import pytest

from alignd.decoding.text import TextAssembler

TEXT = (
    "the cat sat on the mat, café au lait ☕ and naïve crème brûlée 日本語のテキスト 🙂👍 "
    "hello world how are you? numbers one two three. "
)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


class CountingDecode:
    """The tokenizer's decode, counting the tokens it is given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.tokens, self.calls = tokenizer, 0, 0

    def __call__(self, token_ids: list[int]) -> str:
        self.tokens += len(token_ids)
        self.calls += 1
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def stream(assembler: TextAssembler, ids: list[int], chunks: list[int]) -> tuple[str, int]:
    """Feeds ``ids`` in chunks of the given sizes; the released pieces joined, and how many were held back."""
    out, held, at = [], 0, 0
    for i, size in enumerate(chunks):
        at += size
        piece = assembler.advance(ids[:at], final=i == len(chunks) - 1)
        if piece is None:
            held += 1
        else:
            out.append(piece)
        if assembler.stopped:
            break
    return "".join(out), held


def chunk_sizes(n: int, seed: int) -> list[int]:
    rng, sizes = random.Random(seed), []
    while sum(sizes) < n:
        sizes.append(min(rng.choice([1, 1, 1, 2, 3, 7]), n - sum(sizes)))
    return sizes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_pieces_joined_are_the_decode_of_the_whole_answer(tokenizer, seed):
    ids = tokenizer(TEXT * 3, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2 * len(TEXT)  # mostly bytes: this text splits characters across tokens
    text, held = stream(TextAssembler(CountingDecode(tokenizer)), ids, chunk_sizes(len(ids), seed))
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert held > 0, "some pieces end inside a character and must be held back, or this test shows nothing"
    assert "\ufffd" not in text


@pytest.mark.parametrize(("stop", "chunks"), [("crème", 1), ("? num", 3), ("ça", 1)])
def test_the_text_ends_before_the_first_stop_string_even_across_pieces(tokenizer, stop, chunks):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assembler = TextAssembler(CountingDecode(tokenizer), stop=["never there", stop])
    text, _ = stream(assembler, ids, [chunks] * (len(ids) // chunks) + [len(ids) % chunks or chunks])
    expected = full[: full.find(stop)] if stop in full else full
    assert assembler.stopped == (stop in full)
    assert text == expected and assembler.text == expected


def test_text_that_may_begin_a_stop_string_is_held_back_until_it_cannot():
    """ "hel" is not released while "hello" may follow; "lo" makes it the stop string: nothing was sent."""
    texts = {1: "hel", 2: "lo", 3: " world"}
    decode = lambda ids: "".join(texts[i] for i in ids)  # noqa: E731
    stopped = TextAssembler(decode, stop=["hello"])
    assert stopped.advance([1]) == "" and stopped.advance([1, 2]) == "" and stopped.stopped and stopped.text == ""
    ended = TextAssembler(decode, stop=["hello"])
    assert ended.advance([1]) == "" and ended.advance([1, 3]) == "hel w" and not ended.stopped
    assert ended.flush() == "orld" and ended.text == "hel world"


def test_a_2000_token_answer_streamed_token_by_token_costs_linear_decoding(tokenizer):
    """Counted, not timed: the tokens given to decode over a whole answer grow like its length (a full decode
    at every token would be n^2 / 2: 2 million for 2,000 tokens)."""
    ids = (tokenizer(TEXT * 40, add_special_tokens=False)["input_ids"])[:2000]
    assert len(ids) == 2000
    costs = {}
    for n in (1000, 2000):
        decode = CountingDecode(tokenizer)
        text, _ = stream(TextAssembler(decode), ids[:n], [1] * n)
        assert text == tokenizer.decode(ids[:n], skip_special_tokens=True)
        costs[n] = decode.tokens
        assert decode.calls == 2 * n
    print(f"tokens decoded: {costs}")
    assert costs[2000] <= 16 * 2000  # the context window (5) and the held-back bytes, twice a call
    assert costs[2000] / costs[1000] < 2.2  # linear: doubling the answer doubles the work
