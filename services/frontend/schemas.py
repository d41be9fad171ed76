"""Request bodies of the OpenAI-compatible HTTP API, as strict pydantic models.

Strict typing means a JSON value of the wrong type (``"max_tokens": "5"``, ``"stream": 1``) is a 400, never
silently coerced. Unknown fields are kept in ``model_extra`` so ``validation`` can refuse the OpenAI parameters this
server does not implement instead of ignoring them. Range and context-length checks live in ``validation``; the
SLO values of the ``diptych`` extension are checked against the tier table by ``slo``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 256
"""Longest ``user`` and chat ``role`` accepted (both are short names; a longer one is a 400)."""

UNIMPLEMENTED_PARAMETERS = ("logprobs", "top_logprobs", "echo", "suffix", "best_of", "logit_bias", "presence_penalty",
                            "frequency_penalty", "tools", "tool_choice")
"""OpenAI parameters this server does not implement: kept in ``model_extra`` for ``validation`` to refuse a
non-neutral value. Any other unknown field is ignored, with one warning per field name in the log."""

_warned_fields: set[str] = set()


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class DiptychOptions(_Body):
    """The ``"diptych"`` extension object: SLO tier and targets in seconds (see ``services.frontend.slo``), and
    ``timeline`` to get the request's timeline in the response. Every field is optional; unknown ones are a 400."""

    model_config = ConfigDict(strict=True, extra="forbid")

    tier: StrictStr | None = None
    ttft_s: StrictFloat | None = None
    tbt_s: StrictFloat | None = None
    timeline: StrictBool = False


class SamplingFields(_Body):
    """Fields shared by both endpoints. ``top_k``, ``stop_token_ids`` and ``ignore_eos`` are extensions (vLLM's
    names), ``diptych`` and ``stop_after_tokens`` (a benchmark knob: stop after exactly this many output tokens,
    ``proto.SamplingParams``) are this server's; ``user`` is accepted and ignored (identity comes from the API
    key)."""

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    top_k: StrictInt | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    stop_after_tokens: StrictInt | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = Field(None, max_length=MAX_NAME_CHARS)
    diptych: DiptychOptions | None = None
    repetition_penalty: StrictFloat | StrictInt | None = None
    """Accepted only at its neutral value 1 (no penalty)."""
    response_format: dict[str, Any] | None = None
    """Accepted only as ``{"type": "text"}`` (plain text, the default)."""

    @field_validator("repetition_penalty")
    @classmethod
    def _neutral_penalty(cls, value: float | None) -> float | None:
        if value is not None and value != 1:
            raise ValueError("repetition_penalty other than 1 is not supported by this server")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value != {"type": "text"}:
            raise ValueError('only response_format {"type": "text"} is supported by this server')
        return value

    @model_validator(mode="after")
    def _warn_unknown_fields(self) -> SamplingFields:
        for name in (self.model_extra or {}):
            if name not in UNIMPLEMENTED_PARAMETERS and name not in _warned_fields:
                _warned_fields.add(name)
                log.warning("ignoring unknown request field %r (warned once per field name)", name)
        return self


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``. ``prompt`` is text or token ids; lists of several prompts are refused."""

    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: StrictStr = Field(max_length=MAX_NAME_CHARS)
    content: StrictStr | list[TextPart] | None = None


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``. ``max_completion_tokens`` is the newer OpenAI name of ``max_tokens``."""

    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
