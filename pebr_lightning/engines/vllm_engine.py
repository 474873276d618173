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

Faults: a worker that dies, does not answer in full within `request_timeout_s`
(the whole request, not each read), answers more bytes than the request can need,
something that is not JSON, the wrong number of completions, or a completion that
cannot be (more tokens than asked, ids outside the vocabulary, log-probs that are
not finite or above 0, lists of different lengths) is a PebrError naming the engine,
the training step (`step`, set by the trainer) and the completion; nothing is written
half-way (weight folders are written beside and renamed).

Trust: the worker answers only requests that carry its token (engines/remote.py); the
trainer makes a fresh one for a worker it starts and passes it in the environment,
never on the command line. A worker reached at `vllm_url` was started with
PEBR_VLLM_TOKEN set, and the trainer reads the same variable. LoRA adapter ids are
random, so no id can be loaded ahead of the trainer.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import io
import itertools
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pebr_lightning.data.images import image_paths, load_image
from pebr_lightning.engines.remote import (
    TOKEN_ENV,
    RemoteError,
    check_outputs,
    get_json,
    new_token,
    post_json,
    token_from_env,
)
from pebr_lightning.errors import PebrError
from pebr_lightning.models.policy import unwrap
from pebr_lightning.models.rollout import Rollout, SamplingConfig, eos_token_ids, vision_token_ids
from pebr_lightning.parallel.sharding import full_state_dict, is_sharded

WORKER = Path(__file__).with_name("vllm_worker.py")
READY = "PEBR_VLLM_READY"
FOLDER_PREFIX = "pebr-vllm-"
"""Each engine's temporary folder (weights it syncs, the worker's temp files) is
<tmp>/pebr-vllm-<trainer pid>-<random>."""
DEFAULT_MAX_MODEL_LEN = 8192
"""The worker's sequence length when none is given and the model allows more: its KV
cache must hold one whole sequence, so the model's own limit (128k for Qwen2.5-VL)
would cost gigabytes before the first request."""
BYTES_PER_TOKEN = 64
"""Room in an answer for one token: its id and log-prob as JSON take about 30 bytes."""


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
        max_model_len: int | None = None,
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
            max_model_len: prompt + completion tokens the worker holds per sequence (a
                worker it starts gets it; one at `vllm_url` says its own); a longer
                request is refused here, naming the sample. None: the model's
                max_position_embeddings, at most DEFAULT_MAX_MODEL_LEN.
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
        self.max_model_len = max_model_len or default_max_model_len(model)
        self.vocab = len(self.tokenizer)
        """Token ids the trainer can take (the policy's embedding rows after a sync)."""
        self.token: str | None = None
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
            remove_stale_folders()
            self.folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))
            if vllm_url is not None:
                self.url = vllm_url.rstrip("/")
                self.token = token_from_env()
                if self.token is None:
                    raise PebrError(
                        f"rollout.vllm_url {vllm_url}: set {TOKEN_ENV} to the token the "
                        "worker was started with (the worker refuses requests without it)"
                    )
                health = self._get("/health")
                if isinstance(health, dict) and isinstance(health.get("max_model_len"), int):
                    self.max_model_len = health["max_model_len"]
            else:
                self.token = new_token()
                self.url = self._start(vllm_python, model, max_lora_rank, dtype, startup_timeout_s)

        self._on_leader(start)

    # -- the RolloutEngine protocol -------------------------------------------------------

    def sync_weights(self, policy: nn.Module) -> None:
        start = time.perf_counter()
        base = unwrap(policy)
        self.banned = vision_token_ids(base.config)
        self.vocab = max(self.vocab, base.get_input_embeddings().num_embeddings)
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
                # a random id: one the worker has never seen, so nothing loaded there
                # before (by anyone) can answer for this adapter
                lora_id = 1 + secrets.randbelow(2**31 - 2)
                return {"name": f"pebr-{lora_id}", "id": lora_id, "path": str(target)}

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
        self._check_lengths(mask.sum(dim=1).tolist(), sampling.max_new_tokens, records)
        if keys is not None:
            seeds = [int(k) for k in keys.tolist()]  # [B*G], 32-bit values
        else:
            draw = torch.randint(2**31 - 1, (len(texts) * g,), generator=generator)
            seeds = draw.tolist()
        # Each prompt's images in order, as its text's image placeholders come.
        pngs = [[png(load_image(path)) for path in image_paths(r)] for r in records]
        requests = [
            {"prompt": texts[i // g], "images": pngs[i // g], "seed": seeds[i]}
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

        max_tokens = body["sampling"]["max_tokens"]

        def post(requests: list[dict]) -> list[dict]:
            room = (1 << 20) + len(requests) * max_tokens * BYTES_PER_TOKEN
            answer = self._post("/generate", {**body, "requests": requests}, room)
            try:
                return check_outputs(answer, len(requests), max_tokens, self.vocab)
            except ValueError as err:
                raise PebrError(f"vllm engine (step {self.step}): {err}") from None

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
            logprobs[row, :length] = torch.tensor(out["logprobs"], dtype=torch.float32)
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
        command += ["--max-model-len", str(self.max_model_len)]
        command.append("--exit-with-stdin")  # a killed trainer leaves no worker behind
        if rank:
            command += ["--max-lora-rank", str(rank)]
        # the token goes in the environment: a command line is readable by every user
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", TOKEN_ENV: self.token}
        # vLLM's own temporary files (a vllm_dist_* rendezvous file per start) go into
        # this engine's folder, removed with it, or by the next engine after a kill -9
        scratch = self.folder / "tmp"
        scratch.mkdir(exist_ok=True)
        env["TMPDIR"] = str(scratch)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        except OSError as err:  # a mistyped path, or not an executable
            raise PebrError(
                f"rollout.vllm_python {python}: cannot start it ({err.strerror}); give the "
                "interpreter of a vLLM environment (`make vllm-env`: .vllm-env/bin/python)"
            ) from None
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

    def _post(self, route: str, body: dict, max_bytes: int = 1 << 20) -> Any:
        try:
            return post_json(
                self.url,
                route,
                body,
                token=self.token,
                deadline_s=self.request_timeout_s,
                max_bytes=max_bytes,
            )
        except RemoteError as err:
            raise PebrError(f"vllm engine (step {self.step}): {route}: {self._why(err)}") from None

    def _get(self, route: str) -> Any:
        try:
            return get_json(self.url, route, token=self.token, deadline_s=self.request_timeout_s)
        except RemoteError as err:
            raise PebrError(f"vllm engine: {self.url}{route}: {self._why(err)}") from None

    def _why(self, err: RemoteError) -> str:
        dead = self.process is not None and self.process.poll() is not None
        return f"the worker died (exit {self.process.returncode})" if dead else str(err)

    def _check_lengths(
        self, prompt_lengths: list[int], max_new_tokens: int, records: Sequence[dict]
    ) -> None:
        """Refuse a prompt whose completion cannot fit the worker's sequence length
        here, naming the sample, rather than as vLLM's error mid-run."""
        for length, record in zip(prompt_lengths, records, strict=True):
            if length + max_new_tokens > self.max_model_len:
                raise PebrError(
                    f"vllm engine (step {self.step}): sample {record.get('id')}: its prompt "
                    f"is {length} tokens, and with max_new_tokens {max_new_tokens} it needs "
                    f"{length + max_new_tokens}, over the worker's max_model_len "
                    f"{self.max_model_len}: raise rollout.vllm_max_model_len (memory "
                    "allowing), or shorten the prompt or the completions"
                )

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


def remove_stale_folders() -> list[Path]:
    """Remove the temporary folders of engines whose trainer is gone (killed with
    SIGKILL, it could not): a full-weight run leaves a whole model in each."""
    from pebr_lightning.files import process_alive

    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*-*"):
        pid = folder.name[len(FOLDER_PREFIX) :].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def default_max_model_len(model: str) -> int:
    """The model folder's max_position_embeddings, at most DEFAULT_MAX_MODEL_LEN."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError):
        return DEFAULT_MAX_MODEL_LEN
    text = getattr(config, "text_config", None) or config
    limit = getattr(text, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
    return min(int(limit), DEFAULT_MAX_MODEL_LEN)


def png(image: Any) -> str:
    """A PIL image as base64 PNG text."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


__all__ = ["VLLMEngine", "png", "remove_stale_folders"]
