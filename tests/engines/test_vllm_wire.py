"""What the trainer takes from a vLLM worker, checked against real HTTP servers that
misbehave on purpose (no vLLM needed): the whole request within its deadline, at most
the bytes it can need, JSON, completions that can be, and the worker's token sent.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pebr_lightning.cli import main
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.engines import complete_records
from pebr_lightning.engines.remote import TOKEN_ENV, check_outputs
from pebr_lightning.engines.vllm_engine import VLLMEngine
from pebr_lightning.errors import PebrError
from pebr_lightning.models.policy import LoraConfig, build_policy
from pebr_lightning.models.rollout import SamplingConfig

REPO = Path(__file__).resolve().parents[2]
GREEDY = SamplingConfig(group_size=1, temperature=0.0, max_new_tokens=6)
TOKEN = "s3cret-token-for-tests"


def good(n: int = 3) -> dict:
    return {"token_ids": list(range(1, n + 1)), "logprobs": [-0.5] * n, "finish_reason": "stop"}


def test_sound_outputs_pass_unchanged() -> None:
    answer = {"outputs": [good(3), good(0), {**good(6), "finish_reason": "length"}]}
    assert check_outputs(answer, 3, 6, 100) == answer["outputs"]
    edge = {"token_ids": [0, 99], "logprobs": [0.0, -1e9], "finish_reason": "stop"}
    assert check_outputs({"outputs": [edge]}, 1, 6, 100) == [edge]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"logprobs": [-0.5, math.inf, -0.5]}, "log-prob inf is not a finite number <= 0"),
        ({"logprobs": [-0.5, -math.inf, -0.5]}, "log-prob -inf is not"),
        ({"logprobs": [-0.5, 1000.0, -0.5]}, "log-prob 1000.0 is not"),
        ({"logprobs": [-0.5, math.nan, -0.5]}, "log-prob nan is not"),
        ({"logprobs": [-0.5, "x", -0.5]}, "log-prob 'x' is not"),
        ({"logprobs": [-0.5, -0.5]}, "logprobs is not a list as long as its 3 tokens"),
        ({"logprobs": None}, "logprobs is not a list"),
        ({"token_ids": list(range(7)), "logprobs": [-0.5] * 7}, "7 tokens, 6 were asked"),
        ({"token_ids": [1, -1, 2]}, "token id -1 is outside the vocabulary 0..99"),
        ({"token_ids": [1, 100, 2]}, "token id 100 is outside the vocabulary 0..99"),
        ({"token_ids": [1, "2", 3]}, "token_ids is not a list of integers"),
        ({"token_ids": [1, 2.0, 3]}, "token_ids is not a list of integers"),
        ({"token_ids": [1, True, 3]}, "token_ids is not a list of integers"),
        ({"finish_reason": None}, "finish_reason is not a string"),
    ],
)
def test_impossible_completions_are_refused_naming_the_completion(change, message) -> None:
    answer = {"outputs": [good(3), {**good(3), **change}]}
    with pytest.raises(ValueError, match="completion 1: " + message.replace("(", r"\(")):
        check_outputs(answer, 2, 6, 100)


@pytest.mark.parametrize(
    "answer, message",
    [
        ({"outputs": [good()]}, "asked for 2 completions, got 1"),
        ({"outputs": "no"}, "no `outputs` list"),
        ([good(), good()], "no `outputs` list"),
        ({"outputs": [good(), 7]}, "completion 1 is int, not an object"),
    ],
)
def test_a_malformed_answer_is_refused(answer, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_outputs(answer, 2, 6, 100)


class Worker:
    """A real HTTP server on a free port, answering as `behaviour` says; it records
    each request's route and headers."""

    def __init__(self, behaviour: str, max_model_len: int = 4096) -> None:
        self.behaviour = behaviour
        self.seen: list[tuple[str, dict]] = []
        self.sent = 0
        worker = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_):
                pass

            def do_GET(self):
                worker.seen.append((self.path, dict(self.headers)))
                self.answer(json.dumps({"ok": True, "max_model_len": max_model_len}).encode())

            def do_POST(self):
                worker.seen.append((self.path, dict(self.headers)))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                worker.serve(self, body)

            def answer(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def serve(self, handler, body: dict) -> None:
        n, most = len(body["requests"]), body["sampling"]["max_tokens"]
        if self.behaviour == "trickle":  # a valid answer, one byte every half second
            data = json.dumps({"outputs": [good(2)] * n}).encode()
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            try:
                for byte in data:
                    handler.wfile.write(bytes([byte]))
                    handler.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass  # the trainer hung up at its deadline, as it should
        elif self.behaviour == "huge":  # 1 GiB of padding inside a JSON string
            handler.send_response(200)
            handler.send_header("Content-Length", str(1 << 30))
            handler.end_headers()
            chunk = b" " * (1 << 20)
            try:
                for _ in range(1024):
                    handler.wfile.write(chunk)
                    self.sent += len(chunk)
            except OSError:
                pass  # the trainer hung up
        elif self.behaviour == "html":
            handler.answer(b"<html>502 Bad Gateway</html>")
        elif self.behaviour == "inf":  # impossible log-probs, as H7 planted them
            out = {"token_ids": [5] * 3, "logprobs": [math.inf] * 3, "finish_reason": "stop"}
            handler.answer(json.dumps({"outputs": [out] * n}).encode())
        else:  # "ok"
            handler.answer(json.dumps({"outputs": [good(min(3, most))] * n}).encode())

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def worker_of(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    made: list[Worker] = []

    def make(behaviour: str, **kwargs) -> Worker:
        made.append(Worker(behaviour, **kwargs))
        return made[-1]

    yield make
    for worker in made:
        worker.close()


def generate(engine: VLLMEngine, processor, records) -> list[str]:
    done = complete_records(engine, processor, records, GREEDY, batch_size=4)
    return [t for _, ts in done for t in ts]


def in_thread(work, limit_s: float):
    """Run `work`; (finished within limit_s, its error or None)."""
    box: dict = {}

    def run():
        try:
            work()
        except Exception as err:
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    return not thread.is_alive(), box.get("error")


def test_a_server_trickling_its_answer_is_cut_at_the_request_deadline(
    tiny_path, shapes_data, worker_of
):
    """Before: the timeout bounded each socket read, and a byte every 0.5 s kept the
    trainer waiting until the whole body came (here minutes; a server could go on for
    good)."""
    records = load_manifest(shapes_data["val"]).records[:4]
    built = build_policy(str(tiny_path))
    worker = worker_of("trickle")
    engine = VLLMEngine(built.processor, str(tiny_path), vllm_url=worker.url, request_timeout_s=2)
    start = time.monotonic()
    finished, error = in_thread(lambda: generate(engine, built.processor, records), 30)
    assert finished, "still reading the trickle 30 s later"
    assert time.monotonic() - start < 10
    assert isinstance(error, PebrError)
    assert "vllm engine (step 0): /generate: timed out: no complete answer in 2 s" in str(error)


def test_a_runaway_answer_is_refused_without_reading_it(tiny_path, shapes_data, worker_of):
    """Before: the 1 GiB body was read whole (3 GB RSS). Now reading stops past what
    the request can need (1 MiB + 64 bytes per token asked)."""
    records = load_manifest(shapes_data["val"]).records[:2]
    built = build_policy(str(tiny_path))
    worker = worker_of("huge")
    engine = VLLMEngine(built.processor, str(tiny_path), vllm_url=worker.url)
    with pytest.raises(PebrError, match=r"/generate: answered more than 1,049,344 bytes"):
        generate(engine, built.processor, records)
    time.sleep(0.5)
    assert worker.sent < 64 << 20  # the server could not push the rest


def test_an_answer_that_is_not_json_names_engine_and_step(tiny_path, shapes_data, worker_of):
    records = load_manifest(shapes_data["val"]).records[:2]
    built = build_policy(str(tiny_path))
    worker = worker_of("html")
    engine = VLLMEngine(built.processor, str(tiny_path), vllm_url=worker.url)
    engine.at_step(7)
    with pytest.raises(PebrError, match=r"\(step 7\): /generate: answered something that is not"):
        generate(engine, built.processor, records)


def test_requests_carry_the_token_as_json_and_need_one(tiny_path, shapes_data, worker_of):
    records = load_manifest(shapes_data["val"]).records[:2]
    built = build_policy(str(tiny_path))
    worker = worker_of("ok")
    engine = VLLMEngine(built.processor, str(tiny_path), vllm_url=worker.url)
    assert len(generate(engine, built.processor, records)) == 2
    assert [route for route, _ in worker.seen] == ["/health", "/generate"]
    for _, headers in worker.seen:
        assert headers["Authorization"] == f"Bearer {TOKEN}"
        assert headers["Content-Type"] == "application/json"


def test_a_worker_url_without_a_token_is_refused_naming_the_variable(
    tiny_path, monkeypatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    built = build_policy(str(tiny_path))
    with pytest.raises(PebrError, match=f"set {TOKEN_ENV} to the token the worker was started"):
        VLLMEngine(built.processor, str(tiny_path), vllm_url="http://127.0.0.1:9")


def test_lora_adapter_ids_are_random_not_the_sync_count(tiny_path, worker_of) -> None:
    """Before: ids 1, 2, 3, ...: an adapter loaded at id 1 by someone else answered the
    trainer's first request."""
    built = build_policy(str(tiny_path), lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    worker = worker_of("ok")
    engine = VLLMEngine(built.processor, str(tiny_path), vllm_url=worker.url, max_lora_rank=4)
    try:
        ids = []
        for _ in range(3):
            engine.sync_weights(built.model)
            ids.append(engine.lora["id"])
            assert engine.lora["name"] == f"pebr-{ids[-1]}"
        assert len(set(ids)) == 3
        assert all(1 <= i < 2**31 for i in ids)
        assert not set(ids) & {1, 2, 3}
    finally:
        engine.close()


def test_a_prompt_too_long_for_the_worker_is_refused_naming_the_sample(
    tiny_path, shapes_data, worker_of
):
    """Before: the worker's 4096 was never told to the trainer, and such a prompt failed
    inside vLLM mid-run. The worker's /health says its max_model_len."""
    records = load_manifest(shapes_data["val"]).records[:2]
    built = build_policy(str(tiny_path))
    worker = worker_of("ok", max_model_len=40)
    engine = VLLMEngine(built.processor, str(tiny_path), vllm_url=worker.url)
    assert engine.max_model_len == 40
    with pytest.raises(PebrError, match=rf"sample {records[0]['id']}: its prompt is \d+ tokens"):
        generate(engine, built.processor, records)
    assert [route for route, _ in worker.seen] == ["/health"]  # nothing was sent


def test_grpo_stops_on_impossible_engine_logprobs_instead_of_training_on_nothing(
    tiny_path, shapes_data, tmp_path, worker_of, capsys
):
    """Before: +inf log-probs from the engine made every token_truncate weight 0 (grad
    norm 0), the step was counted neither skipped nor non-finite, and fit exited 0."""
    worker = worker_of("inf")
    rollout = {"name": "vllm", "init_args": {"url": worker.url}}
    spread = {"class_path": "pebr_demo.testing.spread_reward.VowelShareReward"}
    code = main(
        [
            "fit",
            "--config", str(REPO / "configs/demo/reasoning.yaml"),
            "--model.init_args.policy.model", str(tiny_path),
            "--model.init_args.rewards", json.dumps([spread]),
            "--model.init_args.policy.lora", json.dumps({"r": 4, "alpha": 8, "dropout": 0.0}),
            "--model.init_args.rollout", json.dumps(rollout),
            "--model.init_args.loss.engine_correction", "token_truncate",
            "--model.init_args.sampling.group_size", "2",
            "--model.init_args.sampling.max_new_tokens", "8",
            "--data.init_args.train_manifest", str(shapes_data["train"]),
            "--data.init_args.batch_size", "2",
            "--trainer.max_steps", "2",
            "--trainer.default_root_dir", str(tmp_path),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "vllm engine (step 0): completion 0: log-prob inf is not a finite number <= 0" in err
    assert not list(tmp_path.rglob("*.ckpt"))  # no step was trained


def test_folders_of_killed_trainers_are_removed_and_live_ones_kept(tiny_path, worker_of):
    """Before: each engine's folder (a whole model on full-weight runs) and vLLM's
    vllm_dist_* files stayed in /tmp after a kill -9. Now folders carry the trainer's
    pid, the next engine removes those of dead trainers, and a started worker's own
    temporary files go into its engine's folder."""
    import subprocess
    import sys
    import tempfile

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    tmp = Path(tempfile.gettempdir())
    stale = tmp / f"pebr-vllm-{int(gone.stdout)}-test"
    (stale / "weights").mkdir(parents=True)
    (stale / "weights" / "model.safetensors").write_bytes(b"x" * 1024)
    live = tmp / f"pebr-vllm-{os.getpid()}-test"
    live.mkdir()
    try:
        built = build_policy(str(tiny_path))
        engine = VLLMEngine(built.processor, str(tiny_path), vllm_url=worker_of("ok").url)
        assert not stale.exists() and live.exists()
        assert engine.folder.name.startswith(f"pebr-vllm-{os.getpid()}-")
        engine.close()
        assert not engine.folder.exists()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)


def test_a_mistyped_vllm_python_is_one_clear_error(tiny_path, tmp_path) -> None:
    built = build_policy(str(tiny_path))
    missing = tmp_path / "vllm-env" / "bin" / "pyhton"
    with pytest.raises(PebrError, match=rf"rollout \(vllm\) python {missing}: cannot start it"):
        VLLMEngine(built.processor, str(tiny_path), vllm_python=str(missing))
