"""A small standard-library HTTP client of the job service and the generation endpoint."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
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
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url: {url!r} is not an http(s) URL")
        self._scheme, self._host, self._port, self._base = parts.scheme, parts.hostname, parts.port, parts.path
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"ServeClient({self.url!r})"

    def request(self, method: str, path: str, body: bytes | str | dict | None = None,
                content_type: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """One request; returns ``(status, decoded JSON body or None)`` for any HTTP status."""
        if isinstance(body, dict):
            body, content_type = json.dumps(body), content_type or "application/json"
        data = body.encode() if isinstance(body, str) else body
        headers = dict(headers or {})
        if content_type:
            headers["Content-Type"] = content_type
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        # GET and DELETE (idempotent here) reuse this thread's connection, once retried on a fresh one
        # when the server had closed it; a POST always gets a fresh connection, so it is never sent twice
        reuse = method in ("GET", "DELETE")
        for attempt in (0, 1):
            conn = self._connection(fresh=not reuse or attempt > 0)
            try:
                try:
                    conn.request(method, self._base + path, body=data, headers=headers)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # answered (e.g. 413) before the whole body was read: the answer may be waiting
                resp = conn.getresponse()
                status, raw = resp.status, resp.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self._local.conn = None
                if not reuse or attempt > 0:
                    raise
        if not reuse or resp.getheader("connection", "").lower() == "close":
            conn.close()
            self._local.conn = None
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def _connection(self, fresh: bool) -> http.client.HTTPConnection:
        """This thread's kept-alive connection (a new one when ``fresh`` or none is open)."""
        conn = getattr(self._local, "conn", None)
        if fresh or conn is None:
            if conn is not None:
                conn.close()
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def submit(self, config: dict | str, content_type: str | None = None) -> tuple[int, Any]:
        """``POST /v1/jobs`` with a config mapping (sent as JSON) or YAML text."""
        if isinstance(config, str):
            return self.request("POST", "/v1/jobs", config, content_type or "application/x-yaml")
        return self.request("POST", "/v1/jobs", config)

    def status(self, job_id: str, fresh: bool = False) -> tuple[int, Any]:
        """``GET /v1/jobs/{id}``; ``fresh``: as the registry has it now, not the replica's copy."""
        return self.request("GET", f"/v1/jobs/{job_id}", headers={"Cache-Control": "no-cache"} if fresh else None)

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
