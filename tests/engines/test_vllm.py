"""The vLLM engine, end to end on the CPU: a real worker process in the vLLM
environment (`make vllm-env`), the embedded tiny Qwen2.5-VL, real weight syncs.

Each test starts its own worker (about 15 s). Greedy decoding in float32 on both
sides makes the two engines comparable token for token.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import lightning as L
import pytest
import torch

from pebr_demo.testing.processes import free_port
from pebr_lightning.data.datamodule import ManifestDataModule
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.engines import HFEngine, RolloutConfig, complete_records
from pebr_lightning.engines.remote import TOKEN_ENV
from pebr_lightning.engines.vllm_engine import VLLMEngine
from pebr_lightning.errors import PebrError
from pebr_lightning.models.policy import LoraConfig, PolicySpec, build_policy
from pebr_lightning.models.rollout import SamplingConfig
from pebr_lightning.modules.grpo import GRPOLossConfig, GRPOModule
from pebr_lightning.modules.optim import OptimConfig

from ..conftest import vllm_python

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parents[2]
SPREAD = {"class_path": "pebr_demo.testing.spread_reward.VowelShareReward", "weight": 1.0}
GREEDY = SamplingConfig(group_size=1, temperature=0.0, max_new_tokens=12)


def stir(policy: torch.nn.Module, seed: int, names: tuple[str, ...]) -> None:
    """Move some weights, so that the greedy text depends on which weights decode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if any(part in name for part in names):
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)


def texts(engine, processor, records) -> list[str]:
    return [
        t
        for _, ts in complete_records(engine, processor, records, GREEDY, batch_size=4)
        for t in ts
    ]


def test_after_a_sync_vllm_decodes_what_the_hf_engine_decodes(tiny_path, shapes_data):
    records = load_manifest(shapes_data["val"]).records[:4]
    built = build_policy(str(tiny_path))
    policy = built.model.eval()
    engine = VLLMEngine(built.processor, str(tiny_path), str(vllm_python()), dtype="float32")
    try:
        stir(policy, 0, ("layers.1.mlp",))
        engine.sync_weights(policy)  # full weights: safetensors + reload_weights
        hf = HFEngine(built.processor)
        hf.sync_weights(policy)
        first = texts(hf, built.processor, records)
        assert texts(engine, built.processor, records) == first
        stir(policy, 5, ("layers.1.mlp",))
        hf_second = texts(hf, built.processor, records)
        assert hf_second != first  # the stirring changed what greedy decodes
        assert texts(engine, built.processor, records) == first  # no sync yet: old weights
        engine.sync_weights(policy)
        assert texts(engine, built.processor, records) == hf_second
        assert engine.sync_seconds is not None and engine.sync_seconds < 30
    finally:
        engine.close()


def test_records_of_several_images_decode_as_the_hf_engine_decodes(
    tiny_path, shapes_data, tmp_path
):
    """Prompts of 1, 2 and 3 images: each request carries its prompt's images in
    order, and vLLM's greedy text is the HF engine's."""
    from ..data.test_multi_image import two_image_manifest

    records = load_manifest(two_image_manifest(shapes_data["val"], tmp_path)).records
    assert sorted({len(r["images"]) for r in records}) == [1, 2, 3]
    built = build_policy(str(tiny_path))
    policy = built.model.eval()
    engine = VLLMEngine(built.processor, str(tiny_path), str(vllm_python()), dtype="float32")
    try:
        stir(policy, 0, ("layers.1.mlp", "visual.merger"))  # the images decide the text
        engine.sync_weights(policy)
        hf = HFEngine(built.processor)
        hf.sync_weights(policy)
        expected = texts(hf, built.processor, records)
        assert len(set(expected)) > 1
        assert texts(engine, built.processor, records) == expected
    finally:
        engine.close()


def test_a_lora_policy_syncs_its_adapter(tiny_path, shapes_data):
    records = load_manifest(shapes_data["val"]).records[:4]
    built = build_policy(str(tiny_path), lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    policy = built.model.eval()
    engine = VLLMEngine(
        built.processor, str(tiny_path), str(vllm_python()), max_lora_rank=8, dtype="float32"
    )
    try:
        hf = HFEngine(built.processor)
        hf.sync_weights(policy)
        before = texts(hf, built.processor, records)
        stir(policy, 2, ("lora_B",))
        after = texts(hf, built.processor, records)
        assert after != before
        engine.sync_weights(policy)  # the adapter folder, a new LoRARequest
        assert texts(engine, built.processor, records) == after
    finally:
        engine.close()


def test_grpo_trains_a_lora_policy_through_vllm_with_the_engine_correction(
    tiny_path, shapes_data, tmp_path
):
    module = GRPOModule(
        policy=PolicySpec(model=str(tiny_path), lora=LoraConfig(r=4, alpha=8, dropout=0.0)),
        rewards=[{"class_path": "pebr_demo.testing.spread_reward.VowelShareReward", "weight": 1.0}],
        sampling=SamplingConfig(group_size=4, max_new_tokens=8, temperature=1.0, top_p=1.0),
        rollout=RolloutConfig("vllm", init_args={"python": str(vllm_python()), "dtype": "float32"}),
        loss=GRPOLossConfig(beta=0.0, engine_correction="token_truncate"),
        optim=OptimConfig(lr=1e-2, schedule="constant"),
        log_samples_every_n_steps=0,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = ManifestDataModule(train_manifest=str(shapes_data["train"]), batch_size=2)
    try:
        trainer.fit(module, datamodule=data)
    finally:
        if module.engine is not None:  # the fit failed before its teardown closed it
            module.engine.close()
    assert module.engine is None and workers_of(tiny_path) == []
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    steps = [r for r in rows if r.get("train/engine_logprob_gap")]
    assert len(steps) == 2
    for row in steps:
        gap = float(row["train/engine_logprob_gap"])
        # float32 on both sides: the same distribution but for the banned vision tokens,
        # whose mass vLLM's logit bias removes (about 0.009 nats per token here)
        assert 0 <= gap < 0.02, gap
        # pi_old / q per token: close to 1, a little below (q renormalised without the
        # banned tokens), never near the cap
        assert 0.95 < float(row["train/engine_is/mean"]) <= 1.01
        assert float(row["train/engine_is/capped_frac"]) == 0
        assert float(row["time/sync_s"]) > 0
        assert float(row["rollout/tokens_per_s"]) > 0


def test_a_killed_worker_is_a_clear_error_not_a_hang(tiny_path, shapes_data):
    records = load_manifest(shapes_data["val"]).records[:2]
    built = build_policy(str(tiny_path))
    engine = VLLMEngine(built.processor, str(tiny_path), str(vllm_python()), request_timeout_s=60)
    try:
        engine.sync_weights(built.model)
        engine.process.send_signal(signal.SIGKILL)
        engine.process.wait()
        with pytest.raises(PebrError, match=r"vllm engine \(step 0\): /generate: the worker died"):
            texts(engine, built.processor, records)
    finally:
        engine.close()


def test_full_weight_grpo_on_tied_embeddings_is_refused_before_a_worker_starts(tiny_path):
    """The measured fault: vLLM's reload leaves a tied output layer stale, so a full
    fine-tuning run would sample from another policy than it trains."""
    module = GRPOModule(
        policy=PolicySpec(model=str(tiny_path), lora=None),
        rewards=[{"name": "format", "weight": 1.0}],
        rollout=RolloutConfig("vllm", init_args={"python": str(vllm_python())}),
    )
    module.setup("fit")
    with pytest.raises(PebrError, match="ties its input and output embeddings"):
        module.configure_model()
    assert module.engine is None


def test_pebr_eval_and_sample_run_through_vllm(tiny_path, shapes_data, tmp_path):
    """`pebr eval --engine vllm` writes the same greedy predictions as the default
    engine; `pebr sample --engine vllm` sorts every question; neither leaves a worker."""
    import json
    import subprocess

    from pebr_lightning.cli import main

    common = ["--model", str(tiny_path), "--manifest", str(shapes_data["val"]), "--no-progress"]
    vllm = [
        "--engine",
        "vllm",
        "--engine-arg",
        f"python={vllm_python()}",
        "--engine-arg",
        "dtype=float32",
    ]
    short = ["--max-new-tokens", "8", "--limit", "4"]
    assert main(["eval", *common, *short, "--out", str(tmp_path / "hf")]) == 0
    assert main(["eval", *common, *short, *vllm, "--out", str(tmp_path / "vllm")]) == 0

    def predictions(name: str) -> list[str]:
        lines = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
        return [json.loads(line)["prediction"] for line in lines]

    assert predictions("vllm") == predictions("hf") and len(predictions("hf")) == 4
    assert json.loads((tmp_path / "vllm" / "metrics.json").read_text())["engine"] == "vllm"
    argv = ["sample", *common, *vllm, "--k", "2", "--max-new-tokens", "4", "--limit", "3"]
    assert main([*argv, "--easy-min", "2", "--out", str(tmp_path / "sample")]) == 0
    summary = json.loads((tmp_path / "sample" / "summary.json").read_text())
    assert summary["questions"] == 3
    workers = subprocess.run(["pgrep", "-f", "vllm_worker.py"], capture_output=True, text=True)
    assert workers.stdout.strip() == ""


def test_eval_with_the_vllm_engine_and_no_interpreter_says_what_to_give(shapes_data, tmp_path):
    from pebr_lightning.cli import main

    argv = ["eval", "--model", "tiny-qwen2.5-vl", "--manifest", str(shapes_data["val"])]
    assert main([*argv, "--out", str(tmp_path), "--engine", "vllm"]) == 2


def test_a_hung_worker_times_out_with_a_clear_error(tiny_path, shapes_data):
    """A worker that stops answering (SIGSTOP: alive, silent) ends the request after
    `request_timeout_s` with an error naming the engine and step, not a hang."""
    records = load_manifest(shapes_data["val"]).records[:2]
    built = build_policy(str(tiny_path))
    engine = VLLMEngine(built.processor, str(tiny_path), str(vllm_python()), request_timeout_s=5)
    try:
        engine.sync_weights(built.model)
        engine.process.send_signal(signal.SIGSTOP)
        with pytest.raises(PebrError, match=r"vllm engine \(step 0\): /generate: timed out"):
            texts(engine, built.processor, records)
    finally:
        engine.process.send_signal(signal.SIGCONT)
        engine.close()


class Short(BaseHTTPRequestHandler):
    """A server that answers /generate with one completion fewer than asked."""

    def log_message(self, *_):
        pass

    def do_GET(self):
        data = json.dumps({"ok": True, "max_model_len": 4096}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        out = [{"token_ids": [1], "logprobs": [-1.0], "finish_reason": "length"}]
        data = json.dumps({"outputs": out * (len(body["requests"]) - 1)}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def short_server(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "a-token")  # a worker at a URL needs one; this one ignores it
    server = HTTPServer(("127.0.0.1", 0), Short)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_wrong_completion_count_is_an_error(tiny_path, shapes_data, short_server):
    records = load_manifest(shapes_data["val"]).records[:2]
    built = build_policy(str(tiny_path))
    engine = VLLMEngine(built.processor, str(tiny_path), vllm_url=short_server)
    try:
        with pytest.raises(PebrError, match="asked for 2 completions, got 1"):
            texts(engine, built.processor, records)
    finally:
        engine.close()


def test_under_fsdp2_a_failure_on_rank_0_stops_every_rank(
    tiny_path, shapes_data, tmp_path, short_server
):
    """Rank 0 alone talks to the worker; when its request fails, every rank raises
    the same error (rank 1 says it came from rank 0) and the run ends, no rank left
    waiting for completions that will not come."""
    from ..parallel.test_fsdp_fit import stage_args

    args, _ = stage_args("grpo", shapes_data["train"])
    rollout = json.dumps({"name": "vllm", "init_args": {"url": short_server}})
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_port", str(free_port()), "-m", "pebr_lightning.cli", "fit", *args),
        *("--model.init_args.rollout", rollout, "--data.init_args.batch_size", "2"),
        *(
            "--trainer.strategy",
            json.dumps({"class_path": "pebr_lightning.parallel.FSDP2Strategy"}),
        ),
        *("--trainer.devices", "2", "--trainer.default_root_dir", str(tmp_path)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    text = done.stdout + done.stderr
    assert re.search(r"vllm engine \(step 0\): asked for 16 completions, got 15", text)
    assert "(from rank 0) vllm engine (step 0): asked for 16" in text


def test_the_same_rollout_keys_draw_the_same_completions(tiny_path, shapes_data):
    """Each completion's seed comes from its rollout key (seed, step, sample id, member):
    the same keys draw the same tokens whatever else the call holds, so a resumed run
    draws what the uninterrupted one drew; other keys draw others."""
    from pebr_lightning.data.collate import PromptCollator, RecordDataset, prompt_inputs
    from pebr_lightning.data.prompts import PromptConfig
    from pebr_lightning.models.rollout import group_keys

    records = load_manifest(shapes_data["val"]).records[:3]
    built = build_policy(str(tiny_path))
    items = RecordDataset(records)
    batch = PromptCollator(built.processor, PromptConfig())([items[i] for i in range(3)])
    prompt = prompt_inputs(batch)
    sampling = SamplingConfig(group_size=4, temperature=1.0, top_p=1.0, max_new_tokens=8)
    ids = [str(r["id"]) for r in records]
    engine = VLLMEngine(built.processor, str(tiny_path), str(vllm_python()), dtype="float32")
    try:
        keys = group_keys(0, 5, 0, ids, 4)
        first = engine.generate(prompt, sampling, keys=keys, records=records)
        again = engine.generate(prompt, sampling, keys=keys, records=records)
        # the last prompt alone, as a resumed run with a smaller batch would send it
        alone = engine.generate(
            {k: v[2:] for k, v in prompt.items() if k in ("input_ids", "attention_mask")},
            sampling,
            keys=group_keys(0, 5, 0, ids[2:], 4),
            records=records[2:],
        )
        other = engine.generate(prompt, sampling, keys=group_keys(0, 6, 0, ids, 4), records=records)
    finally:
        engine.close()
    torch.testing.assert_close(first.completion_ids, again.completion_ids)
    width = alone.completion_ids.shape[1]
    torch.testing.assert_close(first.completion_ids[8:, :width], alone.completion_ids)
    assert not torch.equal(first.completion_ids, other.completion_ids)


def workers_of(model: Path) -> list[str]:
    """Command lines of running vLLM workers serving `model`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "vllm_worker.py" in line and str(model) in line:
                found.append(line)
    return found
