"""Text of a growing answer: incremental detokenisation and stop strings (a decoding concern: the
engines hand out token ids, and only vLLM's own sampler cuts at stop strings by itself)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextAssembler:
    """The text of a growing answer, released piece by piece: never inside a UTF-8 character, and cut
    before the first stop string (which ends the answer: :attr:`stopped`)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self.text = ""  # what has been released so far
        self.stopped = False

    def advance(self, token_ids: Sequence[int], final: bool = False) -> str | None:
        """The new piece for the tokens so far, or None while an incomplete character is held back."""
        text = self._decode(list(token_ids))
        for stop in self._stop:
            cut = text.find(stop)
            if cut != -1:
                text, self.stopped = text[:cut], True
        if not (final or self.stopped) and text.endswith("\ufffd"):
            return None
        piece = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text
        return piece
