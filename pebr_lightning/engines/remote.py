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
the engine adds its name and the training step. `check_outputs` checks the
completions a worker answers (our worker protocol), whatever engine sent for them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import secrets
import socket
import threading
import urllib.parse
from typing import Any

TOKEN_ENV = "PEBR_VLLM_TOKEN"
"""The environment variable that holds a worker's token, on both sides: the trainer
sets it for a worker it starts (a fresh token each time); a worker started by hand
(the vllm engine's `url`) reads it, and the trainer sends the same value."""


LOGPROB_SLACK = 1e-3
"""How far above 0 a reported log-prob may be (float rounding) and still be taken."""


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


def check_outputs(answer: Any, asked: int, max_tokens: int, vocab: int) -> list[dict]:
    """The worker's completions, each checked; ValueError names the first bad one.

    A completion is {"token_ids": [int], "logprobs": [float], "finish_reason": str}:
    at most `max_tokens` ids, each in [0, vocab); as many log-probs, each finite and at
    most 0 (a log-probability; +inf or -inf would turn every importance weight of the
    engine correction into 0 or the cap, and train on nothing without a word).
    """
    outputs = answer.get("outputs") if isinstance(answer, dict) else None
    if not isinstance(outputs, list):
        raise ValueError("the answer has no `outputs` list")
    if len(outputs) != asked:
        raise ValueError(f"asked for {asked} completions, got {len(outputs)}")
    for index, out in enumerate(outputs):
        where = f"completion {index}"
        if not isinstance(out, dict):
            raise ValueError(f"{where} is {type(out).__name__}, not an object")
        ids, logprobs = out.get("token_ids"), out.get("logprobs")
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise ValueError(f"{where}: token_ids is not a list of integers")
        if len(ids) > max_tokens:
            raise ValueError(f"{where}: {len(ids)} tokens, {max_tokens} were asked at most")
        if bad := [i for i in ids if not 0 <= i < vocab]:
            raise ValueError(f"{where}: token id {bad[0]} is outside the vocabulary 0..{vocab - 1}")
        if not isinstance(logprobs, list) or len(logprobs) != len(ids):
            raise ValueError(f"{where}: logprobs is not a list as long as its {len(ids)} tokens")
        for value in logprobs:
            number = type(value) in (int, float)
            if not number or not math.isfinite(value) or value > LOGPROB_SLACK:
                raise ValueError(f"{where}: log-prob {value!r} is not a finite number <= 0")
        if not isinstance(out.get("finish_reason"), str):
            raise ValueError(f"{where}: finish_reason is not a string")
    return outputs


__all__ = [
    "TOKEN_ENV",
    "RemoteError",
    "check_outputs",
    "get_json",
    "new_token",
    "post_json",
    "token_from_env",
]
