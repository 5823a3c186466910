"""A small standard-library HTTP client of the job service and the generation endpoint."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from orchestrator.surfaces.serve.jobs import TERMINAL


class ServeClient:
    """Calls a rayprune Serve app over HTTP with a bearer token.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8000``.
        token: the bearer token, or None to send no ``Authorization`` header.
        timeout: seconds per request.
    """

    def __init__(self, url: str, token: str | None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"ServeClient({self.url!r})"

    def request(self, method: str, path: str, body: bytes | str | dict | None = None,
                content_type: str | None = None) -> tuple[int, Any]:
        """One request; returns ``(status, decoded JSON body or None)`` for any HTTP status."""
        if isinstance(body, dict):
            body, content_type = json.dumps(body), content_type or "application/json"
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        if self.token is not None:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def submit(self, config: dict | str, content_type: str | None = None) -> tuple[int, Any]:
        """``POST /v1/jobs`` with a config mapping (sent as JSON) or YAML text."""
        if isinstance(config, str):
            return self.request("POST", "/v1/jobs", config, content_type or "application/x-yaml")
        return self.request("POST", "/v1/jobs", config)

    def status(self, job_id: str) -> tuple[int, Any]:
        """``GET /v1/jobs/{id}``."""
        return self.request("GET", f"/v1/jobs/{job_id}")

    def wait(self, job_id: str, timeout: float = 600.0, poll: float = 0.5) -> dict:
        """Poll until the job is finished; returns its last status.

        Raises:
            TimeoutError: still not finished after ``timeout`` seconds.
            RuntimeError: a status request failed.
        """
        deadline = time.monotonic() + timeout
        while True:
            code, job = self.status(job_id)
            if code != 200:
                raise RuntimeError(f"GET /v1/jobs/{job_id}: HTTP {code}: {job}")
            if job["state"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout:.0f} s")
            time.sleep(poll)
