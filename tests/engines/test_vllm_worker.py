"""The vLLM worker as a server: who may talk to it, what it refuses, and how it
recovers; a real worker process in the vLLM environment (`make vllm-env`)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.engines.remote import TOKEN_ENV
from pebr_lightning.engines.vllm_engine import VLLMEngine
from pebr_lightning.errors import PebrError
from pebr_lightning.models.policy import build_policy

from ..conftest import vllm_python
from .test_vllm import stir, texts

pytestmark = pytest.mark.vllm


def raw(url: str, method: str, route: str, headers: dict, body: bytes | None = None):
    """(status, body) of one plain HTTP request, as any local process could send it."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request(method, route, body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, answer.read().decode()
    finally:
        connection.close()


def test_the_worker_answers_only_its_trainer(tiny_path, shapes_data, tmp_path):
    """Before: no authentication, text/plain accepted (a web page can send that without
    a preflight), one idle connection blocked the single-threaded server, and
    `Content-Length: -1` too. Any local process could load weights into it."""
    import socket

    records = load_manifest(shapes_data["val"]).records[:2]
    built = build_policy(str(tiny_path))
    engine = VLLMEngine(built.processor, str(tiny_path), str(vllm_python()), dtype="float32")
    try:
        with open(f"/proc/{engine.process.pid}/cmdline", "rb") as cmdline:
            assert engine.token.encode() not in cmdline.read()  # not on the command line
        with open(f"/proc/{engine.process.pid}/environ", "rb") as environ:
            # vLLM's temporary files (vllm_dist_*) go into the engine's own folder
            assert f"TMPDIR={engine.folder / 'tmp'}".encode() in environ.read().split(b"\0")
        status, text = raw(
            engine.url, "GET", "/health", {"Authorization": f"Bearer {engine.token}"}
        )
        assert status == 200 and str(tiny_path) not in text  # the model path is not told
        body = json.dumps({"path": str(tmp_path)}).encode()
        json_type = {"Content-Type": "application/json"}
        assert raw(engine.url, "GET", "/health", {})[0] == 401
        wrong = {"Authorization": "Bearer " + "x" * len(engine.token)}
        assert raw(engine.url, "POST", "/reload_weights", {**json_type, **wrong}, body)[0] == 401
        right = {"Authorization": f"Bearer {engine.token}"}
        plain = {"Content-Type": "text/plain", **right}
        assert raw(engine.url, "POST", "/reload_weights", plain, body)[0] == 415
        negative = {**json_type, **right, "Content-Length": "-1"}
        status, _ = raw(engine.url, "POST", "/generate", negative, None)
        assert status == 400
        before = texts(engine, built.processor, records)
        idle = socket.create_connection(urllib_host_port(engine.url))  # opened, never used
        try:
            assert texts(engine, built.processor, records) == before  # served all the same
        finally:
            idle.close()
        # a 169-megapixel PNG of a few hundred KB: refused from its header, not decoded
        import base64
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("1", (13000, 13000)).save(buffer, format="PNG")
        request = {
            "prompt": "<|image_pad|>",
            "images": [base64.b64encode(buffer.getvalue()).decode()],
        }
        body = {"requests": [request], "sampling": {"temperature": 0.0, "max_tokens": 2}}
        with pytest.raises(PebrError, match="13000 x 13000 pixels is over --max-image-pixels"):
            engine._post("/generate", body)
        assert texts(engine, built.processor, records) == before
    finally:
        engine.close()


def urllib_host_port(url: str) -> tuple[str, int]:
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    return parts.hostname, parts.port


def test_a_failed_weight_load_leaves_the_worker_serving_the_last_good_weights(
    tiny_path, shapes_data, untied_path, tmp_path
):
    """Before: one failed /reload_weights left the worker answering 500 to every later
    /generate. Now it loads the last good weights again and says the load failed."""
    records = load_manifest(shapes_data["val"]).records[:2]
    built = build_policy(str(untied_path))
    engine = VLLMEngine(built.processor, str(untied_path), str(vllm_python()), dtype="float32")
    try:
        stir(built.model, 0, ("lm_head",))
        engine.sync_weights(built.model)
        synced = texts(engine, built.processor, records)
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "model.safetensors").write_bytes(b"not a safetensors file")
        with pytest.raises(PebrError) as failed:
            engine._post("/reload_weights", {"path": str(broken)})
        assert texts(engine, built.processor, records) == synced
        assert "header too large; the previous weights were loaded again" in str(failed.value)
    finally:
        engine.close()


def test_the_worker_refuses_to_start_without_a_token(tiny_path):
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    from pebr_lightning.engines.vllm_engine import WORKER

    done = subprocess.run(
        [str(vllm_python()), str(WORKER), "--model", str(tiny_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"set {TOKEN_ENV} to a secret token" in done.stderr
