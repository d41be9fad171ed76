"""OpenAI response bodies and server-sent-event chunks, for ``/v1/completions`` and ``/v1/chat/completions``.

Shapes follow OpenAI's API exactly: ``text_completion`` / ``chat.completion`` objects, streamed as
``data: <json>\\n\\n`` events (``text_completion`` / ``chat.completion.chunk``) ending with ``data: [DONE]\\n\\n``.
A streamed chat starts with a chunk carrying ``{"role": "assistant", "content": ""}``; the last choice chunk carries
the ``finish_reason``; with ``stream_options.include_usage`` every chunk has ``"usage": null`` and one more chunk with
empty ``choices`` carries the usage.

Diptych extension: with ``include_timeline`` (the request's ``"diptych": {"timeline": true}``) the non-streamed body,
and the streamed chunk carrying the ``finish_reason``, get a top-level ``"timeline"`` (``services.frontend.timeline``).
"""

from __future__ import annotations

import json
import time
from typing import Any

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class OpenAIFormatter:
    """Builds the bodies of one request. ``chat`` picks the chat shapes; ``include_usage`` is the stream option;
    ``include_timeline`` adds the request's timeline where a finish_reason is reported."""

    def __init__(self, *, chat: bool, request_id: str, model: str, include_usage: bool = False,
                 include_timeline: bool = False) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.include_timeline = include_timeline

    def body(self, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int,
             timeline: dict[str, Any] | None = None) -> dict:
        """The non-streamed response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj: dict[str, Any] = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                               "created": self.created, "model": self.model, "choices": [choice],
                               "usage": usage(prompt_tokens, completion_tokens)}
        if self.include_timeline:
            obj["timeline"] = timeline
        return obj

    def opening_chunks(self) -> list[bytes]:
        return [self._chunk({"role": "assistant", "content": ""}, None)] if self.chat else []

    def text_chunk(self, text: str) -> bytes:
        return self._chunk({"content": text} if self.chat else text, None)

    def finish_chunk(self, finish_reason: str, timeline: dict[str, Any] | None = None) -> bytes:
        return self._chunk({} if self.chat else "", finish_reason, timeline)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return sse_event(self._envelope([], usage(prompt_tokens, completion_tokens)))

    def _chunk(self, content: Any, finish_reason: str | None, timeline: dict[str, Any] | None = None) -> bytes:
        if self.chat:
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish_reason}
        obj = self._envelope([choice], None)
        if self.include_timeline and finish_reason is not None:
            obj["timeline"] = timeline
        return sse_event(obj)

    def _envelope(self, choices: list[dict], usage_block: dict | None) -> dict[str, Any]:
        obj: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                               "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            obj["usage"] = usage_block
        return obj
