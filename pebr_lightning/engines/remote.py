"""One JSON request to a rollout worker in another process, and its answer.

What the trainer asks of a worker's HTTP answer, whatever the engine behind it:
- the whole request ends within `deadline_s`, not each socket read (a server that
  sends one byte every few seconds would otherwise hold the trainer for good);
- the answer is at most `max_bytes` long (read no further: a runaway body would
  otherwise be held in memory whole);
- it is JSON;
- the request carries the worker's token (`Authorization: Bearer ...`), so that no
  other local process, and no web page, can drive the worker.

Every failure is a `RemoteError` whose message says what went wrong in a few words;
the engine adds its name and the training step.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import socket
import threading
import urllib.parse
from typing import Any

TOKEN_ENV = "PEBR_VLLM_TOKEN"
"""The environment variable that holds a worker's token, on both sides: the trainer
sets it for a worker it starts (a fresh token each time); a worker started by hand
(`rollout.vllm_url`) reads it, and the trainer sends the same value."""


class RemoteError(Exception):
    """A request to a worker failed; the message says how."""


def new_token() -> str:
    """A token nobody can guess (256 bits)."""
    return secrets.token_urlsafe(32)


def token_from_env() -> str | None:
    value = os.environ.get(TOKEN_ENV, "").strip()
    return value or None


def post_json(
    url: str,
    route: str,
    body: Any,
    *,
    token: str | None,
    deadline_s: float,
    max_bytes: int,
) -> Any:
    """POST `body` as JSON to `url + route`; the decoded JSON answer of a 200."""
    return _request(url, "POST", route, json.dumps(body).encode(), token, deadline_s, max_bytes)


def get_json(url: str, route: str, *, token: str | None, deadline_s: float) -> Any:
    return _request(url, "GET", route, None, token, deadline_s, 1 << 20)


def _request(
    url: str,
    method: str,
    route: str,
    data: bytes | None,
    token: str | None,
    deadline_s: float,
    max_bytes: int,
) -> Any:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise RemoteError(f"not an http://host:port address: {url!r}")
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=deadline_s)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    box: dict[str, Any] = {}

    def exchange() -> None:
        try:
            connection.connect()
            # kept: the response takes the socket over from the connection (HTTP/1.0)
            box["sock"] = connection.sock
            connection.request(method, route, body=data, headers=headers)
            answer = connection.getresponse()
            box["answer"] = (answer.status, answer.read(max_bytes + 1))
        except Exception as err:  # reported below, or moot once the deadline passed
            box["error"] = err

    # The exchange runs in a thread waited on until the deadline: a socket timeout
    # bounds one read, and a server trickling bytes never lets a read time out.
    thread = threading.Thread(target=exchange, name="pebr-remote-request", daemon=True)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive():
        # Shut the socket down so the thread's blocked read returns, and make its next
        # read time out at once (data sent after a shutdown is still received), so the
        # thread ends. Not close(): that waits for the lock the read holds.
        sock = box.get("sock")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(0.001)
                sock.shutdown(socket.SHUT_RDWR)
        raise RemoteError(f"timed out: no complete answer in {deadline_s:g} s")
    connection.close()
    if "error" in box:
        err = box["error"]
        if isinstance(err, TimeoutError | socket.timeout):
            raise RemoteError(f"timed out: no complete answer in {deadline_s:g} s")
        if not isinstance(err, OSError | http.client.HTTPException):
            raise err
        raise RemoteError(f"{type(err).__name__}: {err}")
    status, payload = box["answer"]
    if len(payload) > max_bytes:
        raise RemoteError(f"answered more than {max_bytes:,} bytes; read no further")
    if status != 200:
        detail = payload[:500].decode(errors="replace")
        raise RemoteError(f"HTTP {status}: {detail}")
    try:
        return json.loads(payload)
    except ValueError:
        start = payload[:120].decode(errors="replace")
        raise RemoteError(f"answered something that is not JSON: {start!r}") from None


__all__ = ["TOKEN_ENV", "RemoteError", "get_json", "new_token", "post_json", "token_from_env"]
