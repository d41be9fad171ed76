"""The ``max_tokens`` a workload's requests ask for, apart from how many tokens they generate.

A ``RequestSpec`` says how many tokens a request generates (``output_len``) and the limit it asks for
(``max_tokens``). A real client does not know its output length in advance: it sends a cap, or nothing (a chat
request without ``max_tokens`` may run to the end of the context). The policy chooses what the scheduler sees:

- ``oracle``: ``max_tokens = output_len`` (the scheduler knows the future; how Diptych's runs before on-demand KV
  allocation were made);
- ``N`` (an integer >= 1, default ``2048``): a fixed cap, ``max_tokens = min(N, context - prompt_len)``; the output is
  clipped to it (``output_len = min(output_len, max_tokens)``), as a real client's cap truncates the reply;
- ``context``: ``max_tokens = context - prompt_len``, what a chat request without ``max_tokens`` gets.

``context`` (tokens) is the served model's context (in the simulator, the cost model's model context, or one
worker's KV pool where that is smaller: the most positions a sequence may reach). The fixed cap needs none
(``None``: the cap alone); ``context`` does.

The output length still follows the workload: load generators send ``stop_after_tokens = output_len`` (a benchmark
knob read only by the engine's stop rule) with the policy's ``max_tokens``; the simulator stops each request at its
``output_len``. Invariant of every spec returned: ``1 <= output_len <= max_tokens``; with a context and a cap or
``context`` policy, ``prompt_len + max_tokens <= context`` (``oracle`` changes nothing else: a request too long for
the context stays so, as before).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from diptych.workloads.spec import RequestSpec

ORACLE = "oracle"
CONTEXT = "context"
DEFAULT_MAX_TOKENS = "2048"
"""The policy when none is given: a fixed cap of 2048 tokens."""

MAX_TOKENS_HELP = (
    "what each request sends as max_tokens (its output length is still the workload's, sent as the "
    "stop_after_tokens benchmark knob): 'oracle' = the true output length (the scheduler knows the future; the "
    "behaviour before on-demand KV), an integer N = a client's fixed cap, min(N, context - prompt), the output "
    "truncated to it, 'context' = context - prompt (a chat request without max_tokens)")


@dataclass(frozen=True)
class MaxTokensPolicy:
    """A parsed policy: ``kind`` is ``oracle``, ``cap`` (with ``cap`` tokens) or ``context``."""

    kind: str
    cap: int | None = None

    def __str__(self) -> str:
        return str(self.cap) if self.kind == "cap" else self.kind


def parse_max_tokens(text: str | int) -> MaxTokensPolicy:
    """``oracle``, ``context`` or a positive integer; ``ValueError`` naming the choices otherwise."""
    value = str(text).strip().lower()
    if value in (ORACLE, CONTEXT):
        return MaxTokensPolicy(value)
    try:
        cap = int(value)
    except ValueError:
        raise ValueError(f"--max-tokens must be 'oracle', 'context' or a positive integer cap, got {text!r}") \
            from None
    if cap < 1:
        raise ValueError(f"--max-tokens cap must be at least 1 token, got {cap}")
    return MaxTokensPolicy("cap", cap)


def apply_max_tokens(specs: list[RequestSpec], policy: MaxTokensPolicy | str,
                     context: int | None = None) -> list[RequestSpec]:
    """``specs`` with ``max_tokens`` (and a capped ``output_len``) set by ``policy`` (module docstring); the input is
    not modified. ``ValueError`` when ``context`` is needed (policy ``context``) but None, or when (cap or
    ``context``) a prompt leaves no room for an output token in ``context``."""
    if isinstance(policy, str):
        policy = parse_max_tokens(policy)
    if policy.kind == CONTEXT and context is None:
        raise ValueError("--max-tokens context needs the served context: give --max-context TOKENS")
    if policy.kind == ORACLE:
        return [replace(spec, max_tokens=spec.output_len) for spec in specs]
    out = []
    for spec in specs:
        room = None if context is None else context - spec.prompt_len
        if room is not None and room < 1:
            raise ValueError(f"request {spec.request_id}: a prompt of {spec.prompt_len} tokens leaves no output "
                             f"token in a context of {context} (clip it with --max-context)")
        if policy.kind == CONTEXT:
            assert room is not None
            limit = room
        else:
            assert policy.cap is not None
            limit = policy.cap if room is None else min(policy.cap, room)
        out.append(replace(spec, output_len=min(spec.output_len, limit), max_tokens=limit))
    return out
