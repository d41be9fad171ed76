"""OpenAI defaults are accepted, non-default values of unimplemented knobs refused, unknown fields warned about once,
and a wrong HTTP method typed as a client error."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from diptych.services.frontend.api_errors import APIError
from diptych.services.frontend.schemas import ChatCompletionRequest

MESSAGES = [{"role": "user", "content": "hi"}]


def test_default_values_of_unimplemented_knobs_are_accepted() -> None:
    req = ChatCompletionRequest.model_validate(
        {"messages": MESSAGES, "response_format": {"type": "text"}, "repetition_penalty": 1.0})
    assert req.repetition_penalty == 1.0


@pytest.mark.parametrize("field", [{"response_format": {"type": "json_object"}}, {"repetition_penalty": 1.2}])
def test_other_values_are_refused(field: dict) -> None:
    with pytest.raises(ValidationError, match="supported by this server"):
        ChatCompletionRequest.model_validate({"messages": MESSAGES, **field})


def test_unknown_field_is_warned_about_once_per_name(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="diptych.services.frontend.schemas"):
        for _ in range(3):
            ChatCompletionRequest.model_validate({"messages": MESSAGES, "newcomer_test_field": 1})
    warnings = [r for r in caplog.records if "newcomer_test_field" in r.getMessage()]
    assert len(warnings) == 1


def test_method_not_allowed_is_a_client_error() -> None:
    assert APIError(405, "Method Not Allowed").body()["error"]["type"] == "invalid_request_error"
