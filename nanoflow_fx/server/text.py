"""The text of a generation as its tokens arrive: incremental detokenization and stop strings.

Pure (a `decode` function in, strings out): no tokenizer class, server or engine is needed to test it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["TextStream"]

# Prompt tokens in the first decoding window: enough for a tokenizer to place the first generated token's leading
# space (or to finish a character split across tokens) as the whole text would.
_PROMPT_CONTEXT = 5
_INCOMPLETE = "\ufffd"  # what a decoder gives for a byte sequence that a later token completes


class TextStream:
    """One request's generated text, grown one token at a time (`push`) and cut at the first stop string.

    Decoding: each token adds what decoding a short window of tokens gains over the same window without the new
    ones (vLLM's incremental detokenization; the first window is the prompt's last tokens). So the text is the
    completion of the prompt's text: a leading space stays, and a character whose bytes span several tokens comes
    out once complete (text ending in U+FFFD is held back until `finish`). Streaming the pieces and decoding all
    tokens at once give the same text, since both go through `push`.

    Stop strings: the text ends before the first occurrence of any of `stop`; text that may begin one is held back
    until it cannot (so no piece handed out is ever taken back). `num_tokens` counts the tokens consumed, up to
    and including the one that completed the stop string; `stopped` says that one was found (later tokens are
    ignored: the caller cancels the request).
    """

    def __init__(self, decode: Callable[[list[int]], str], prompt: Sequence[int], stop: Sequence[str] = ()) -> None:
        """`decode(ids)`: their text (special tokens skipped, as the server sends it); `prompt`: the prompt's ids."""
        if any(not s for s in stop):
            raise ValueError("a stop string is empty; give non-empty strings")
        self._decode, self._stop = decode, tuple(stop)
        self._tokens = list(prompt[-_PROMPT_CONTEXT:])
        self._prefix, self._read = 0, len(self._tokens)  # window: tokens[prefix:], of which [prefix:read] was read
        self.text = ""  # decoded so far (cut at a stop string once found)
        self._sent = 0  # characters of `text` handed out
        self.num_tokens = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Take the next generated token; returns the text that may be sent now (possibly "")."""
        if self.stopped:
            return ""
        self.num_tokens += 1
        self._tokens.append(token)
        self.text += self._decode_new(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended: the text still held back (an incomplete character, a possible stop's start)."""
        if not self.stopped:
            self.text += self._decode_new(final=True)
        return self._release(final=True)

    def _decode_new(self, final: bool) -> str:
        if self._read == len(self._tokens):
            return ""
        before = self._decode(self._tokens[self._prefix : self._read])
        after = self._decode(self._tokens[self._prefix :])
        if len(after) <= len(before) or (after.endswith(_INCOMPLETE) and not final):
            return ""  # nothing new yet (a special token, or a character still incomplete): the window grows
        self._prefix, self._read = self._read, len(self._tokens)
        return after[len(before) :]

    def _release(self, final: bool) -> str:
        """Hand out what cannot change any more: up to a stop string found, else all but a possible stop's start.
        (A stop string starts at or after `_sent`: text that may begin one is never handed out.)"""
        found = [i for i in (self.text.find(s, self._sent) for s in self._stop) if i >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True
            final = True
        end = len(self.text) if final else len(self.text) - self._held()
        piece, self._sent = self.text[self._sent : end], max(self._sent, end)
        return piece

    def _held(self) -> int:
        """Length of the longest end of `text` (not yet sent) that is the start of a stop string."""
        tail = self.text[self._sent :]
        return max((k for s in self._stop for k in range(min(len(s) - 1, len(tail)), 0, -1)
                    if tail.endswith(s[:k])), default=0)
