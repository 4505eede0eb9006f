"""``ServeError``: an HTTP error in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Every refusal of the server is one of these; ``app.py`` renders them (and Starlette's own 404/405, and anything
unexpected as a 500) as JSON in that shape.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeError", "error_body"]

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "service_unavailable", 504: "timeout_error"}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


class ServeError(Exception):
    """An HTTP status + OpenAI error fields (+ extra headers, e.g. ``Retry-After``)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code, type=self.type)
