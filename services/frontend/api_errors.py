"""Errors the frontend returns to clients, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

``status`` follows HTTP and is also the ``code`` of the SDK's ``ClientError``, so both APIs report a failure the
same way. 499 marks a request cancelled by its own client; it is never sent to anyone.

The message and param are always valid Unicode (any lone surrogate an echoed client value carried is escaped) and
at most ``MAX_MESSAGE_CHARS`` long, so an error body can always be encoded, as JSON or as a ``ClientError``.
"""

from __future__ import annotations

from typing import Any

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """A request-level failure. ``retry_after_s`` (429, 503) becomes the HTTP ``Retry-After`` header."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        message = _printable(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = None if param is None else _printable(param)
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


MAX_MESSAGE_CHARS = 4096


def _printable(text: str) -> str:
    """``text`` encodable as UTF-8 (lone surrogates escaped) and at most ``MAX_MESSAGE_CHARS`` long."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS - 3] + "..."


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)
