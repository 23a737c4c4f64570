"""Errors as JSON: ``{"error": {"code", "message", "field"?}}`` with the right status."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from pydantic import ValidationError


# What a client learns of a bug: the request id on the answer finds the traceback in the log.
INTERNAL_MESSAGE = "internal error; see the agent's log for the request id"


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, *, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def response(self, *, a1111: bool = False) -> web.Response:
        """The JSON answer; ``a1111``: in AUTOMATIC1111's error shape, for its API's clients."""
        if a1111:
            body = {"error": self.code, "detail": self.message, "body": self.field or "", "errors": self.message}
            return web.json_response(body, status=self.status, headers=self.headers)
        return error_response(self.status, self.code, self.message, field=self.field, headers=self.headers)


def error_body(code: str, message: str, *, field: str | None = None) -> dict[str, Any]:
    """The JSON error shape, for answers and for the ``error`` event of a stream alike."""
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return {"error": body}


def error_response(
    status: int, code: str, message: str, *, field: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(error_body(code, message, field=field)),
        content_type="application/json",
        headers=headers,
    )


def from_validation(exc: ValidationError) -> ApiError:
    """A pydantic ValidationError as a 422 naming the first failing field."""
    from zimage_edge.request import describe_validation_error

    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    return ApiError(422, "invalid_request", describe_validation_error(exc), field=field)
