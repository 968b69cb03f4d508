"""Incremental detokenization and stop strings.

Byte-level BPE tokens need not end on a character boundary; the tokenizers library's DecodeStream
(Rust, under a microsecond per token here) buffers such bytes until they complete a character.
Decoding a window of recent tokens twice per token cost about 5 us per token, over a millisecond
per step at batch 256.
Text that might be the start of a stop string is held back until it is known not to be one,
so a stream never shows a client the beginning of a stop string. A matched stop string is cut
from the text, or kept with `no_stop_trim`. When the request ends (finished or aborted), whatever is
held back comes out, bytes of an unfinished character as U+FFFD: the text is then the decode of the
output ids, less a trimmed stop string.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str], skip_special_tokens: bool = True, no_stop_trim: bool = False):
        self.tokenizer = tokenizer.backend_tokenizer  # a fast (Rust) tokenizer, as every Qwen3 checkpoint has
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.stop = stop
        self.no_stop_trim = no_stop_trim
        self.skip_special_tokens = skip_special_tokens
        self.text = ""  # all decoded text (stop string removed once matched)
        self.emitted = 0  # characters of `text` handed out so far
        self.matched_stop: str | None = None
        self.held: list[int] = []  # tokens whose bytes the stream holds: no complete character yet

    def add(self, token_id: int, check_stop: bool = True) -> None:
        """`check_stop` False: too early for stop strings (min_new_tokens); one that ends later is still found."""
        chunk = self.stream.step(self.tokenizer, token_id)
        if not chunk:
            self.held.append(token_id)
            return  # an incomplete character (or a skipped special token): wait for the next token
        self.held = []
        before = len(self.text)
        self.text += chunk
        if not check_stop:
            return
        for s in self.stop:
            i = self.text.find(s, max(0, before - len(s) + 1))
            if i != -1:
                self.text = self.text[:i + len(s) if self.no_stop_trim else i]
                self.matched_stop = s
                return

    def take(self, final: bool) -> str:
        """New text safe to show. Unless `final`, hold back any tail that could begin a stop string; when
        `final`, also the bytes of an unfinished character, decoded as they are."""
        if final and self.held and self.matched_stop is None:
            self.text += self.tokenizer.decode(self.held, skip_special_tokens=self.skip_special_tokens)
            self.held = []
        end = len(self.text)
        if not final and self.matched_stop is None:
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.text) - self.emitted), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
