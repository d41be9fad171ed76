"""Exceptions raised by the Diptych SDK (``diptych.client``). HTTP-style status codes, as the frontend reports them.

    DiptychError                  base class; ``status`` is None for errors detected by the client itself
    ├── BadRequestError           400  invalid prompt or parameters
    ├── AuthenticationError       401  missing or unknown API key
    ├── NotFoundError             404
    ├── RateLimitError            429  refused by the overload policy; ``retry_after_s`` when the server said
    ├── ServiceUnavailableError   503  no capacity, a worker was lost, or the frontend is shutting down
    ├── ServerError               500  (and any other 5xx)
    └── RequestTimeoutError       no reply within the client's ``timeout_s`` (the request is cancelled), or 504
"""

from __future__ import annotations


class DiptychError(Exception):
    """``request_id`` is empty when the failure is not tied to one request (e.g. a frame the server could not
    decode)."""

    status: int | None = None

    def __init__(self, message: str, *, request_id: str = "", status: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        if status is not None:
            self.status = status
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        prefix = f"[{self.status}] " if self.status is not None else ""
        suffix = f" (request {self.request_id})" if self.request_id else ""
        return f"{prefix}{self.message}{suffix}"


class BadRequestError(DiptychError):
    status = 400


class AuthenticationError(DiptychError):
    status = 401


class NotFoundError(DiptychError):
    status = 404


class RateLimitError(DiptychError):
    status = 429


class ServiceUnavailableError(DiptychError):
    status = 503


class ServerError(DiptychError):
    status = 500


class RequestTimeoutError(DiptychError):
    status = None


_BY_STATUS: dict[int, type[DiptychError]] = {
    400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 429: RateLimitError,
    500: ServerError, 503: ServiceUnavailableError, 504: RequestTimeoutError,
}


def error_for_status(status: int, message: str, *, request_id: str = "",
                     retry_after_s: float | None = None) -> DiptychError:
    """The exception for a server-reported ``status``: an exact match, else ServerError (5xx), BadRequestError
    (other 4xx) or DiptychError."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if 500 <= status < 600 else BadRequestError if 400 <= status < 500 else DiptychError
    return cls(message, request_id=request_id, status=status, retry_after_s=retry_after_s)
