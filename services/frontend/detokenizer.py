"""Incremental detokenization of one request's output, with stop strings.

``IncrementalDetokenizer.push(token_ids)`` returns the text those tokens add, under two invariants:

- the returned text never ends in a split UTF-8 character: while the newest tokens decode to an incomplete
  character (a byte-level tokenizer emits one byte per token, so an emoji takes four tokens) the text is held back
  until the character is complete (or until ``flush`` at the end of the request);
- the returned text never contains a stop string, nor the start of one that later tokens could complete. When a
  stop string appears, the output is cut just before it (OpenAI semantics: the stop string is not returned),
  ``stopped`` becomes True and later pushes return "".

Decoding works on a sliding window of token ids (the tokens since the last complete character plus the few before
them), so the cost per token does not grow with the output length. Special tokens (EOS, BOS, ...) decode to "".
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text deltas. ``tokenizer`` is a Hugging Face tokenizer."""

    def __init__(self, tokenizer: Any, stop: list[str] | None = None) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in (stop or []) if s]
        self._max_hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        # Window bounds into _ids: [_prefix, _read) is already-returned context, [_read, end) is not yet decoded text.
        self._prefix = 0
        self._read = 0
        self._held = ""  # decoded text withheld because it may be the start of a stop string
        self.stopped = False

    def push(self, token_ids: list[int]) -> str:
        """Add output tokens; return the text that is now safe to emit (possibly "")."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        return self._release(self._decode_window(final=False))

    def flush(self) -> str:
        """The request finished: return everything still held back (an incomplete trailing character decodes to
        U+FFFD; a partial stop string is ordinary text)."""
        if self.stopped:
            return ""
        text = self._held + self._decode_window(final=True)
        self._held = ""
        cut = self._find_stop(text)
        if cut is not None:
            self.stopped = True
            return text[:cut]
        return text

    def _decode_window(self, *, final: bool) -> str:
        """Text of the tokens since ``_read``, or "" while it ends in an incomplete character (unless ``final``)."""
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self._ids[self._prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]

    def _release(self, new_text: str) -> str:
        text = self._held + new_text
        cut = self._find_stop(text)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return text[:cut]
        hold = self._stop_prefix_len(text)
        self._held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def _find_stop(self, text: str) -> int | None:
        """Index of the earliest stop string occurrence in ``text``, or None."""
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        for k in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
