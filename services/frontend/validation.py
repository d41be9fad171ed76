"""Turn a client's request (HTTP body or SDK message) into a prompt of token ids and checked SamplingParams.

Every check that can fail raises ``APIError`` (400 bad input, 404 unknown model) before anything is submitted, so
a request that reaches the coordinator is always servable within the context: ``1 <= len(prompt) < max_model_len``,
``max_tokens >= 1``, ``len(prompt) + max_tokens <= max_model_len``, ``stop_after_tokens`` None or in ``[1, 2^20]`` (a
benchmark knob; it may exceed ``max_tokens``, which then stops first), every token id in ``[0, vocab_size)``, every
string encodable as UTF-8 (no lone surrogates: ``check_encodable``) and within the wire limits of
``proto.validation`` (stop strings).

Tokenizing is the one costly step: a text prompt longer than ``max_model_len * MAX_CHARS_PER_TOKEN`` characters is
refused without tokenizing it, and the tokenizer runs in a worker thread (``asyncio.to_thread``) so the event loop
keeps streaming other requests' tokens meanwhile. Hence the generation functions are coroutines.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from diptych.proto import SamplingParams
from diptych.proto.validation import MAX_CONTEXT_TOKENS, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from diptych.services.frontend.api_errors import APIError, bad_request
from diptych.services.frontend.model_info import ModelInfo
from diptych.services.frontend.schemas import (
    UNIMPLEMENTED_PARAMETERS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)

COMPLETION_DEFAULT_MAX_TOKENS = 16


_NEUTRAL: tuple[object, ...] = (None, False, 0, "", [], {})

MAX_CHARS_PER_TOKEN = 64
"""Upper bound of the characters one token stands for (long BPE tokens are runs of spaces or punctuation, far
below this): a text of more than ``max_model_len * MAX_CHARS_PER_TOKEN`` characters cannot fit the context."""


@dataclass
class Generation:
    """A validated request: what to submit."""

    prompt_token_ids: list[int]
    sampling: SamplingParams


def check_model(requested: str | None, info: ModelInfo) -> None:
    if requested is not None and requested != info.name:
        shown = requested if len(requested) <= 256 else requested[:256] + "..."
        raise APIError(404, f"The model `{shown}` does not exist; this server serves `{info.name}`",
                       param="model", code="model_not_found")


async def completion_generation(req: CompletionRequest, info: ModelInfo) -> Generation:
    check_model(req.model, info)
    prompt_ids = await completion_prompt_ids(req.prompt, info)
    max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    return Generation(prompt_ids, _http_sampling(req, max_tokens, prompt_ids, info))


async def chat_generation(req: ChatCompletionRequest, info: ModelInfo) -> Generation:
    check_model(req.model, info)
    if not req.messages:
        raise bad_request("messages must not be empty", "messages")
    messages = [{"role": m.role, "content": _message_text(m.content)} for m in req.messages]
    check_text_length(sum(len(m["role"]) + len(m["content"]) for m in messages), info, "messages")
    prompt_ids = await asyncio.to_thread(info.encode_chat, messages)
    check_prompt(prompt_ids, info)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = info.max_model_len - len(prompt_ids)
    return Generation(prompt_ids, _http_sampling(req, max_tokens, prompt_ids, info))


async def completion_prompt_ids(prompt: Any, info: ModelInfo) -> list[int]:
    """Text or token ids (a one-element list of either is accepted) -> checked token ids. Text is tokenized in a
    worker thread, after ``check_text_length`` and ``check_encodable``."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) > 1:
            raise bad_request("batched prompts not supported: send one prompt per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        check_text_length(len(prompt), info, "prompt")
        check_encodable(prompt, "prompt")
        prompt = await asyncio.to_thread(info.encode, prompt)
    check_prompt(prompt, info)
    return prompt


def check_text_length(chars: int, info: ModelInfo, param: str) -> None:
    """Refuse, before tokenizing, a text too long for the context whatever the tokenizer makes of it."""
    limit = info.max_model_len * MAX_CHARS_PER_TOKEN
    if chars > limit:
        raise bad_request(f"{param} is {chars} characters, more than this model's maximum context length of "
                          f"{info.max_model_len} tokens can hold (at most {limit} characters)", param)


def check_encodable(text: str, param: str) -> None:
    """400 for text that is not valid Unicode (a lone surrogate such as ``"\\ud800"``, which JSON can spell)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{param} is not valid Unicode: a lone surrogate at character {exc.start}", param) from None


def check_json_text(value: Any, param: str | None = None) -> None:
    """``check_encodable`` on every string of a parsed JSON value, keys included (``param``: the top-level field)."""
    if isinstance(value, str):
        check_encodable(value, param or "body")
    elif isinstance(value, list):
        for item in value:
            check_json_text(item, param)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_encodable(key, param or "body")
            check_json_text(item, param or key)


def check_prompt(prompt_ids: list[int], info: ModelInfo) -> None:
    if not prompt_ids:
        raise bad_request("prompt must not be empty", "prompt")
    if len(prompt_ids) >= info.max_model_len:
        raise bad_request(f"prompt is {len(prompt_ids)} tokens but this model's maximum context length is "
                          f"{info.max_model_len} tokens (prompt plus at least one output token)", "prompt")
    _check_token_ids(prompt_ids, info, "prompt")


def check_sampling(sampling: SamplingParams, prompt_len: int, info: ModelInfo) -> SamplingParams:
    """Range checks shared by HTTP and SDK; returns ``sampling`` normalized (empty stop strings removed,
    ``top_k=-1`` as 0)."""
    if sampling.max_tokens <= 0:
        raise bad_request("max_tokens must be at least 1", "max_tokens")
    if sampling.stop_after_tokens is not None and not 1 <= sampling.stop_after_tokens <= MAX_CONTEXT_TOKENS:
        raise bad_request(f"stop_after_tokens must be an integer in [1, {MAX_CONTEXT_TOKENS}] (or absent)",
                          "stop_after_tokens")
    if prompt_len + sampling.max_tokens > info.max_model_len:
        raise bad_request(f"This model's maximum context length is {info.max_model_len} tokens. However, you "
                          f"requested {prompt_len + sampling.max_tokens} tokens ({prompt_len} in the prompt, "
                          f"{sampling.max_tokens} for the completion).", "max_tokens")
    if not math.isfinite(sampling.temperature) or sampling.temperature < 0:
        raise bad_request("temperature must be a finite number >= 0", "temperature")
    if not (0 < sampling.top_p <= 1):
        raise bad_request("top_p must be in (0, 1]", "top_p")
    if sampling.top_k == -1:  # vLLM's spelling of "disabled"
        sampling.top_k = 0
    if sampling.top_k < 0:
        raise bad_request("top_k must be >= 0 (0 or -1 disables it)", "top_k")
    if sampling.seed is not None and not (-(2 ** 63) <= sampling.seed < 2 ** 64):
        raise bad_request("seed must fit in 64 bits", "seed")
    _check_token_ids(sampling.stop_token_ids, info, "stop_token_ids")
    if len(sampling.stop) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings are accepted", "stop")
    for stop in sampling.stop:
        check_encodable(stop, "stop")
        if len(stop) > MAX_STOP_CHARS:
            raise bad_request(f"a stop string may be at most {MAX_STOP_CHARS} characters", "stop")
    if len(sampling.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise bad_request(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are accepted", "stop_token_ids")
    sampling.stop = [s for s in sampling.stop if s]
    return sampling


def _http_sampling(req: SamplingFields, max_tokens: int, prompt_ids: list[int], info: ModelInfo) -> SamplingParams:
    if req.n != 1:
        raise bad_request("only n=1 is supported", "n")
    extra = req.model_extra or {}
    for name in UNIMPLEMENTED_PARAMETERS:
        value = extra.get(name)
        if value not in _NEUTRAL and not (name == "best_of" and value == 1):
            raise bad_request(f"parameter {name!r} is not supported by this server", name)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=0 if req.top_k is None else req.top_k,
        seed=req.seed,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        stop_after_tokens=req.stop_after_tokens,
    )
    return check_sampling(sampling, len(prompt_ids), info)


def _message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def _check_token_ids(ids: list[int], info: ModelInfo, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary [0, {info.vocab_size})", param)
