"""OpenAI's error JSON: the one exception every serve module raises for an answer a client gets wrong.

`{"error": {"message", "type", "param", "code"}}`, with the HTTP status (400 is the openai client's
BadRequestError). Every message is short (at most MAX_MESSAGE characters: it never echoes a grammar or a body
back), so a whole error body stays under 1 KB.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

MAX_MESSAGE = 700  # characters of an error message at most (with the rest of the error JSON: under 1 KB)
MAX_PARAM = 100  # characters of an error's `param` at most (a path into the body can hold the client's keys)


class APIError(Exception):
    """An error answered to the client as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> None:
        message = message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."
        param = param if param is None or len(param) <= MAX_PARAM else param[:MAX_PARAM - 3] + "..."
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    """A 400 naming the request field at fault."""
    return APIError(400, message, param=param, code=code)
