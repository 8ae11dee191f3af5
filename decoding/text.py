"""Text of a growing answer: incremental detokenisation and stop strings (a decoding concern: the
engines hand out token ids, and only vLLM's own sampler cuts at stop strings by itself)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Tokens decoded before the newest ones, as context: a tokenizer may decode a token differently at the start
# of a text (SentencePiece drops a leading space, clean-up rules look at neighbours), so the new piece is
# what a decode of the window adds to a decode of its context (as Hugging Face's TGI and vLLM's
# detokenizer do). The engines give alignd a decode function only (their tokenizer may live behind a remote
# engine), which vLLM's incremental detokenizer cannot take (it needs its own tokenizer object).
CONTEXT_TOKENS = 5


class TextAssembler:
    """The text of a growing answer, released piece by piece: never inside a UTF-8 character, and cut
    before the first stop string (which ends the answer: :attr:`stopped`). With stop strings, the last
    ``len(longest stop) - 1`` characters are held back until the answer ends (as vLLM's detokenizer does),
    so no released piece is part of a stop string found later: the released pieces are the answer. Each
    call decodes only the newest tokens and a few before them: an answer of n tokens costs O(n) decoding."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._context_start = 0  # first token of the context window
        self._read = 0  # the tokens decoded into text so far
        self._unsent = ""  # decoded, not yet released (the tail a stop string may still begin in)
        self.text = ""  # what has been released so far
        self.stopped = False

    def advance(self, token_ids: Sequence[int], final: bool = False) -> str | None:
        """The new piece for the tokens so far (all of them, each call), or None while an incomplete
        character is held back."""
        window = list(token_ids[self._context_start :])
        context = self._decode(window[: self._read - self._context_start])
        text = self._decode(window)
        if not final and text.endswith("\ufffd"):
            return None
        new = text[len(context) :]
        if new:  # the window moves on once its newest tokens made text
            self._read = len(token_ids)
            self._context_start = max(0, self._read - CONTEXT_TOKENS)
        return self._release(self._unsent + new, final)

    def flush(self) -> str:
        """Whatever is held back, released: the answer ended."""
        return "" if self.stopped else self._release(self._unsent, final=True)

    def _release(self, unsent: str, final: bool) -> str:
        # a stop string cannot begin in released text: it would have ended within what was held back
        cuts = [at for at in (unsent.find(s) for s in self._stop) if at != -1]
        if cuts:
            self.stopped, piece, self._unsent = True, unsent[: min(cuts)], ""
        elif final or not self._hold:
            piece, self._unsent = unsent, ""
        else:
            keep = max(0, len(unsent) - self._hold)
            piece, self._unsent = unsent[:keep], unsent[keep:]
        self.text += piece
        return piece
