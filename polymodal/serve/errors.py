"""OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, and body validation.

Every refusal of the server is an ``ApiError``: routes raise it, the app's exception handler
turns it into the JSON response, and streaming routes send its body as an SSE event.
"""
from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError


class ApiError(Exception):
    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
             415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 501: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def parse_body(schema: type[BaseModel], data: Any):
    """Validates a parsed JSON body; the first problem becomes a 400 naming the parameter."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err.get("loc", ()) if not str(x).startswith("function")) or None
        raise ApiError(400, f"invalid parameter {param}: {err.get('msg')}", param=param,
                       code="invalid_value" if err.get("type") != "missing" else "missing_required_parameter")
