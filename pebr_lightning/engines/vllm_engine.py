"""VLLMEngine: rollouts from vLLM, in its own process and Python environment.

vLLM pins its own torch, so it runs from another interpreter (`vllm_python`, made by
`make vllm-env`; on a GPU machine a CUDA vLLM environment) as a small HTTP server
(engines/vllm_worker.py, standard library + vllm only), started here, or reached at
`vllm_url` when it runs elsewhere: TRL's "server mode".

Prompts go as text with one `<|image_pad|>` per image (vLLM expands it, exactly as
our processor did) and the images as PNG; each completion is its own request with its
own seed, derived from the rollout key (seed, step, sample id, member), so a resumed
run draws the same completions. Weight sync after each update: a LoRA policy writes
its adapter to a folder and the next requests name it (a new LoRARequest id); full
weights are written as safetensors and loaded by `reload_weights`.

Several processes (FSDP2, `distributed=True`): one worker, started and spoken to by
rank 0 alone. A weight sync gathers the sharded weights on rank 0 (a collective),
which writes and pushes them; each rollout gathers every rank's requests on rank 0,
which sends them as one batch and hands each rank its own completions. A failure on
rank 0 reaches every rank as the same error, so none waits for an answer forever.

Faults: a worker that dies, hangs (`request_timeout_s`) or answers the wrong number
of completions is a PebrError naming the engine and the training step (`step`, set
by the trainer); nothing is written half-way (weight folders are written beside and
renamed).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pebr_lightning.data.images import load_image
from pebr_lightning.errors import PebrError
from pebr_lightning.models.policy import unwrap
from pebr_lightning.models.rollout import Rollout, SamplingConfig, eos_token_ids, vision_token_ids
from pebr_lightning.parallel.sharding import full_state_dict, is_sharded

WORKER = Path(__file__).with_name("vllm_worker.py")
READY = "PEBR_VLLM_READY"


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        processor: Any,
        model: str,
        vllm_python: str | None = None,
        vllm_url: str | None = None,
        max_lora_rank: int = 0,
        dtype: str = "auto",
        startup_timeout_s: float = 600.0,
        request_timeout_s: float = 600.0,
        distributed: bool = False,
    ) -> None:
        """
        Args:
            processor: the policy's processor (prompt text, EOS and padding ids).
            model: the model folder the worker loads first (the policy's start weights).
            vllm_python: interpreter of a vLLM environment; the worker is started with it.
            vllm_url: a worker already running (http://host:port); instead of starting one.
            max_lora_rank: LoRA rank the worker accepts (0: full weights only).
            dtype: the worker's weight dtype (`auto`: vLLM's choice, bfloat16 for float32
                checkpoints; `float32` to match a float32 trainer exactly).
            startup_timeout_s: how long the worker may take to load the model.
            request_timeout_s: how long one request may take before the run stops.
            distributed: every process of the default process group builds this engine
                and makes the same calls; rank 0 alone runs and talks to the worker.
        """
        if (vllm_python is None) == (vllm_url is None):
            raise PebrError("rollout: give exactly one of vllm_python and vllm_url")
        self.distributed = distributed and dist.is_available() and dist.is_initialized()
        self.leader = not self.distributed or dist.get_rank() == 0
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.eos = eos_token_ids(self.tokenizer)
        self.pad = self.tokenizer.pad_token_id
        self.image_pad = "<|image_pad|>"
        self.request_timeout_s = request_timeout_s
        self.step = 0
        """The training step, for errors; a trainer sets it before each call."""
        self.syncs = 0
        self.lora: dict[str, Any] | None = None
        self.sync_seconds: float | None = None
        self.banned: list[int] = []
        self.process: subprocess.Popen | None = None
        self.folder: Path | None = None
        self.url: str | None = None

        def start() -> None:
            self.folder = Path(tempfile.mkdtemp(prefix="pebr-vllm-"))
            if vllm_url is not None:
                self.url = vllm_url.rstrip("/")
            else:
                self.url = self._start(vllm_python, model, max_lora_rank, dtype, startup_timeout_s)

        self._on_leader(start)

    # -- the RolloutEngine protocol -------------------------------------------------------

    def sync_weights(self, policy: nn.Module) -> None:
        start = time.perf_counter()
        base = unwrap(policy)
        self.banned = vision_token_ids(base.config)
        lora = hasattr(policy, "peft_config")
        # sharded: every process gathers (a collective) and rank 0 holds the full weights
        state = full_state_dict(policy, trainable_only=lora) if is_sharded(policy) else None
        self.syncs += 1

        def push() -> dict[str, Any] | None:
            if lora:
                save = partial(policy.save_pretrained, state_dict=state)
                target = self._write(lambda folder: save(str(folder)), f"adapter-{self.syncs}")
                if self.lora is not None:  # requests name the new one from now on
                    shutil.rmtree(self.lora["path"], ignore_errors=True)
                return {"name": f"pebr-{self.syncs}", "id": self.syncs, "path": str(target)}

            def write(folder: Path) -> None:
                base.save_pretrained(str(folder), state_dict=state)
                # vLLM reads the processor from the folder it last loaded weights from
                self.processor.save_pretrained(str(folder))

            self._post("/reload_weights", {"path": str(self._write(write, "weights"))})
            return None

        self.lora = self._on_leader(push)
        self.sync_seconds = time.perf_counter() - start

    def generate(
        self,
        prompt: dict[str, Tensor],
        sampling: SamplingConfig,
        *,
        keys: Tensor | None = None,
        generator: torch.Generator | None = None,
        records: Sequence[dict[str, Any]] | None = None,
    ) -> Rollout:
        if records is None:
            raise PebrError("vllm engine: generate needs the prompts' records (their images)")
        start = time.perf_counter()
        g = sampling.group_size
        ids, mask = prompt["input_ids"], prompt["attention_mask"]  # [B, P]
        texts = [self.prompt_text(row[m.bool()]) for row, m in zip(ids, mask, strict=True)]
        if keys is not None:
            seeds = [int(k) for k in keys.tolist()]  # [B*G], 32-bit values
        else:
            draw = torch.randint(2**31 - 1, (len(texts) * g,), generator=generator)
            seeds = draw.tolist()
        pngs = [png(load_image(record["image"])) for record in records]
        requests = [
            {"prompt": texts[i // g], "images": [pngs[i // g]], "seed": seeds[i]}
            for i in range(len(texts) * g)
        ]
        greedy = sampling.temperature == 0
        body = {
            "requests": requests,
            "sampling": {
                "temperature": 0.0 if greedy else sampling.temperature,
                "top_p": 1.0 if greedy else sampling.top_p,
                "top_k": 0 if greedy else sampling.top_k,
                "max_tokens": sampling.max_new_tokens,
                "min_tokens": sampling.min_new_tokens,
            },
            "stop_token_ids": self.eos,
            "banned_token_ids": self.banned,
            "lora": self.lora,
        }
        return self._rollout(prompt, self._complete(body), g, time.perf_counter() - start)

    # -- helpers --------------------------------------------------------------------------

    def _complete(self, body: dict) -> list[dict]:
        """The worker's completions of body["requests"]; distributed, every rank's
        requests go to the worker in one batch from rank 0, and each rank gets its own."""

        def post(requests: list[dict]) -> list[dict]:
            outputs = self._post("/generate", {**body, "requests": requests})["outputs"]
            if len(outputs) != len(requests):
                raise PebrError(
                    f"vllm engine (step {self.step}): asked for {len(requests)} completions, "
                    f"got {len(outputs)}"
                )
            return outputs

        if not self.distributed:
            return post(body["requests"])
        parts: list[Any] | None = [None] * dist.get_world_size() if self.leader else None
        dist.gather_object(body["requests"], parts, dst=0)

        def split() -> list[list[dict]]:
            outputs = post([r for part in parts for r in part])
            ends = list(itertools.accumulate(len(part) for part in parts))
            return [outputs[end - len(part) : end] for part, end in zip(parts, ends, strict=True)]

        return self._on_leader(split, scatter=True)

    def _on_leader(self, work: Callable[[], Any], scatter: bool = False) -> Any:
        """Run `work` on rank 0 only and give every rank its result (`scatter`: rank r
        gets item r of it), or raise its error on every rank, so that no rank waits
        forever on a rank 0 that failed. Not distributed: just `work()`."""
        if not self.distributed:
            return work()
        world = dist.get_world_size()
        answers: list[Any] = [None] * world
        failure: Exception | None = None
        if self.leader:
            try:
                result = work()
                answers = list(result) if scatter else [result] * world
                answers = [("ok", a) for a in answers]
            except Exception as err:  # every rank raises it below
                failure = err
                why = str(err) if isinstance(err, PebrError) else f"{type(err).__name__}: {err}"
                answers = [("error", why)] * world
        mine: list[Any] = [None]
        dist.scatter_object_list(mine, answers if self.leader else None, src=0)
        kind, value = mine[0]
        if kind == "error":
            raise PebrError(value if self.leader else f"(from rank 0) {value}") from failure
        return value

    def prompt_text(self, ids: Tensor) -> str:
        """The prompt as text with one image placeholder per image (vLLM expands it)."""
        text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        return re.sub(f"(?:{re.escape(self.image_pad)})+", self.image_pad, text)

    def _rollout(self, prompt: dict[str, Tensor], outputs: list[dict], g: int, seconds: float):
        device = prompt["input_ids"].device
        width = max(1, max(len(o["token_ids"]) for o in outputs))
        n = len(outputs)
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        logprobs = torch.zeros((n, width))
        for row, out in enumerate(outputs):
            length = len(out["token_ids"])
            ids[row, :length] = torch.tensor(out["token_ids"], dtype=torch.long)
            mask[row, :length] = 1
            logprobs[row, :length] = torch.tensor(out["logprobs"] or [0.0] * length)
        truncated = torch.tensor([o["finish_reason"] == "length" for o in outputs])
        return Rollout(
            prompt_ids=prompt["input_ids"],
            prompt_mask=prompt["attention_mask"],
            completion_ids=ids.to(device),
            completion_mask=mask.to(device),
            logprobs=logprobs.to(device),
            truncated=truncated.to(device),
            group_size=g,
            seconds=seconds,
        )

    def _write(self, save, name: str) -> Path:
        """Write weights into a new folder beside, then rename: never half a folder."""
        target = self.folder / name
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        save(partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        return target

    def _start(self, python: str, model: str, rank: int, dtype: str, timeout: float) -> str:
        command = [python, str(WORKER), "--model", model, "--port", "0", "--dtype", dtype]
        command.append("--exit-with-stdin")  # a killed trainer leaves no worker behind
        if rank:
            command += ["--max-lora-rank", str(rank)]
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        port: list[int] = []
        # stderr is drained from the start (a full pipe would stop the worker before it
        # is ready); its last lines go into the error when it never becomes ready
        tail: collections.deque[str] = collections.deque(maxlen=20)
        threading.Thread(target=tail.extend, args=(self.process.stderr,), daemon=True).start()

        def read() -> None:
            for line in self.process.stdout:
                if line.startswith(READY):
                    port.append(int(line.split()[1]))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not port:
            code = self.process.poll()
            self.close()
            why = (
                f"exited with code {code}" if code is not None else f"not ready in {timeout:.0f} s"
            )
            last = "".join(tail).strip()[-1500:]
            raise PebrError(f"vllm engine: the worker ({python}) {why}; its last output:\n{last}")
        threading.Thread(target=self.process.stdout.read, daemon=True).start()  # drained too
        return f"http://127.0.0.1:{port[0]}"

    def _post(self, route: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + route, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout_s) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise PebrError(f"vllm engine (step {self.step}): {route} failed: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
            dead = self.process is not None and self.process.poll() is not None
            what = f"the worker died (exit {self.process.returncode})" if dead else str(err)
            raise PebrError(f"vllm engine (step {self.step}): {route}: {what}") from None

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: best effort
            self.close()


def png(image: Any) -> str:
    """A PIL image as base64 PNG text."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


__all__ = ["VLLMEngine", "png"]
