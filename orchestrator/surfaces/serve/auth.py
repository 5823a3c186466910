"""Bearer-token authentication and JSON error responses shared by the Serve deployments.

The token comes from ``$RAYPRUNE_SERVE_TOKEN`` or from the file named by a ``token_file``
app argument or ``$RAYPRUNE_SERVE_TOKEN_FILE`` (e.g. a mounted Kubernetes secret). It is
never logged; requests are checked with a constant-time comparison.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from orchestrator.errors import UsageError

TOKEN_ENV = "RAYPRUNE_SERVE_TOKEN"
TOKEN_FILE_ENV = "RAYPRUNE_SERVE_TOKEN_FILE"
MIN_TOKEN_CHARS = 16


class ApiError(Exception):
    """An HTTP error answered as ``{"error": message}``.

    Args:
        status: HTTP status code.
        message: one line naming the field and the value at fault.
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def install_error_handlers(app: FastAPI) -> None:
    """Answer :class:`ApiError` as JSON ``{"error": ...}`` with its status and headers."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


def load_token(token_file: str | None = None) -> str:
    """The service token: from ``token_file``, ``$RAYPRUNE_SERVE_TOKEN_FILE`` or ``$RAYPRUNE_SERVE_TOKEN``.

    Args:
        token_file: file holding the token (surrounding whitespace is stripped); wins over the variables.

    Raises:
        UsageError: no token configured, the file is unreadable, or the token is shorter than 16 characters.
    """
    path = token_file or os.environ.get(TOKEN_FILE_ENV)
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise UsageError(f"token_file: cannot read {path!r}: {exc.strerror or exc}") from None
        source = f"token file {path!r}"
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        source = f"${TOKEN_ENV}"
    if not token:
        raise UsageError(
            f"token: no bearer token configured; set ${TOKEN_ENV}, or ${TOKEN_FILE_ENV} / the token_file "
            "argument to a file holding it (the service refuses to run unauthenticated)"
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise UsageError(f"token: the token from {source} is {len(token)} characters; use at least {MIN_TOKEN_CHARS}")
    return token


class BearerAuth:
    """Checks ``Authorization: Bearer <token>`` headers against one secret.

    Args:
        token: the secret (from :func:`load_token`).
    """

    def __init__(self, token: str):
        self._token = token.encode()

    def __repr__(self) -> str:  # never show the secret
        return "BearerAuth(<redacted>)"

    def check(self, request: Request) -> None:
        """Raise a 401 :class:`ApiError` unless the request carries the right bearer token."""
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "authorization: missing bearer token", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), self._token):
            raise ApiError(401, "authorization: invalid bearer token",
                           {"WWW-Authenticate": 'Bearer error="invalid_token"'})
