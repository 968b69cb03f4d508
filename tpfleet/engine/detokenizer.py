"""Incremental detokenization and stop strings.

Byte-level BPE tokens need not end on a character boundary, so text is decoded over a short
window of recent tokens and only released once it no longer ends in a partial character.
Text that might be the start of a stop string is held back until it is known not to be one,
so a stream never shows a client the beginning of a stop string.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: decoded for context only
        self.read_offset = 0  # tokens before this are already in `text`
        self.text = ""  # all decoded text (stop string removed once matched)
        self.emitted = 0  # characters of `text` handed out so far
        self.matched_stop: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        head = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(head) or full.endswith("\ufffd"):
            return  # an incomplete character: wait for the next token
        before = len(self.text)
        self.text += full[len(head):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        for s in self.stop:
            i = self.text.find(s, max(0, before - len(s) + 1))
            if i != -1:
                self.text = self.text[:i]
                self.matched_stop = s
                return

    def take(self, final: bool) -> str:
        """New text safe to show. Unless `final`, hold back any tail that could begin a stop string."""
        end = len(self.text)
        if not final and self.matched_stop is None:
            for s in self.stop:
                for k in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
