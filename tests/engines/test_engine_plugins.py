"""Engines are plugins: a package that registers a settings class under the
`pebr_lightning.engines` entry-point group is used by GRPO, `pebr eval` and `pebr
sample` with no file of this package naming it. The package here is installed the way
pip leaves one (a real `*.dist-info` with entry_points.txt on sys.path)."""

from __future__ import annotations

import importlib
import json
import pickle
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from pebr_lightning.cli import main
from pebr_lightning.engines import RolloutConfig, registered_engines
from pebr_lightning.engines.base import GROUP, EngineContext, RolloutConfigError, build_engine
from pebr_lightning.engines.hf import HFConfig
from pebr_lightning.engines.vllm_engine import VLLMConfig
from pebr_lightning.errors import PebrError

REPO = Path(__file__).resolve().parents[2]

# A real engine: the HF decode loop underneath, every call written to a JSONL log.
RECORDER = """
import json
from dataclasses import dataclass

from pebr_lightning.engines import HFEngine


@dataclass(frozen=True)
class RecorderSettings:
    log: str
    tag: str = "rec"

    in_process = True

    def build(self, context):
        inner = HFEngine(context.processor, context.share_image_features, synced=context.synced)
        return RecorderEngine(inner, self.log, self.tag)


class RecorderEngine:
    def __init__(self, inner, log, tag):
        self.inner, self.log, self.tag, self.step = inner, log, tag, None

    def _write(self, **event):
        with open(self.log, "a") as f:
            f.write(json.dumps({"tag": self.tag, "step": self.step, **event}) + "\\n")

    def sync_weights(self, policy):
        self.inner.sync_weights(policy)
        self._write(event="sync")

    def at_step(self, step):
        self.step = step

    def generate(self, prompt, sampling, *, keys=None, generator=None, records=None):
        rollout = self.inner.generate(
            prompt, sampling, keys=keys, generator=generator, records=records
        )
        ids = [r["id"] for r in records]
        self._write(event="generate", ids=ids, rows=int(rollout.completion_ids.shape[0]))
        return rollout

    def close(self):
        self._write(event="close")
"""


@pytest.fixture
def recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install the `pebr-recorder` distribution (engine `recorder`) for this test."""
    site = tmp_path / "site"
    site.mkdir()
    info = site / "pebr_recorder-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pebr-recorder\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[{GROUP}]\nrecorder = pebr_recorder:RecorderSettings\n"
    )
    (site / "pebr_recorder.py").write_text(textwrap.dedent(RECORDER))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield tmp_path / "engine.jsonl"
    sys.modules.pop("pebr_recorder", None)


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_the_built_in_engines_are_registered_and_config_entries_name_them():
    found = registered_engines()
    assert found["hf"] == "pebr_lightning.engines.hf:HFConfig"
    assert found["vllm"] == "pebr_lightning.engines.vllm_engine:VLLMConfig"
    assert isinstance(RolloutConfig().settings(), HFConfig)
    assert RolloutConfig.parse("hf") == RolloutConfig(name="hf")
    vllm = RolloutConfig.parse({"name": "vllm", "init_args": {"url": "http://h:1"}})
    assert vllm.settings() == VLLMConfig(url="http://h:1")
    by_path = RolloutConfig.parse({"class_path": "pebr_lightning.engines.hf.HFConfig"})
    assert isinstance(by_path.settings(), HFConfig) and by_path.label.endswith("HFConfig")
    assert RolloutConfig.parse(vllm.to_dict()) == vllm


def test_engine_config_mistakes_are_one_line_naming_the_engine_and_setting():
    with pytest.raises(
        PebrError, match=r"no engine named 'vlm' is installed \(did you mean 'vllm'"
    ):
        RolloutConfig(name="vlm").settings()
    bad = RolloutConfig(name="vllm", init_args={"pyton": "x"})
    with pytest.raises(
        RolloutConfigError, match=r"rollout \(vllm\): unknown setting\(s\) \['pyton'\]"
    ):
        bad.settings()
    with pytest.raises(PebrError, match=r"give exactly one of init_args\.python"):
        RolloutConfig(name="vllm").settings()
    with pytest.raises(RolloutConfigError, match=r"unknown key\(s\) \['dtype'\]"):
        RolloutConfig.parse({"name": "vllm", "dtype": "float32"})
    with pytest.raises(PebrError, match="is not a EngineSettings"):
        RolloutConfig(class_path="pebr_lightning.data.prompts.PromptConfig").settings()


def test_the_former_flat_keys_still_load_from_yaml_and_from_checkpoints(tmp_path):
    former = {"engine": "vllm", "vllm_python": "/env/bin/python", "vllm_dtype": "float32"}
    with pytest.warns(FutureWarning, match="write rollout: {'name': 'vllm'"):
        parsed = RolloutConfig.parse(former)
    assert parsed == RolloutConfig(
        name="vllm", init_args={"python": "/env/bin/python", "dtype": "float32"}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert RolloutConfig.parse({"engine": "hf", "vllm_dtype": "auto"}) == RolloutConfig("hf")

    # a checkpoint written before: the object pickled with its flat fields, loaded the
    # way `pebr export` and resumes load hyper-parameters (weights_only)
    old_state = {
        "engine": "vllm",
        "vllm_python": None,
        "vllm_url": "http://127.0.0.1:9",
        "vllm_dtype": "auto",
        "max_lora_rank": 32,
        "startup_timeout_s": 600.0,
        "request_timeout_s": 60.0,
        "vllm_max_model_len": None,
    }
    original = RolloutConfig.__getstate__
    RolloutConfig.__getstate__ = lambda self: old_state
    try:
        torch.save({"rollout": RolloutConfig()}, tmp_path / "hp.pt")
    finally:
        RolloutConfig.__getstate__ = original
    with torch.serialization.safe_globals([RolloutConfig]):
        loaded = torch.load(tmp_path / "hp.pt", weights_only=True)["rollout"]
    assert loaded.settings() == VLLMConfig(
        url="http://127.0.0.1:9", max_lora_rank=32, request_timeout_s=60.0
    )
    assert pickle.loads(pickle.dumps(loaded)) == loaded


def test_a_vllm_config_is_checked_before_any_worker_starts():
    with pytest.raises(PebrError, match="max_model_len must be >= 1"):
        VLLMConfig(url="http://h:1", max_model_len=0)
    with pytest.raises(PebrError, match="no model folder"):
        build_engine(RolloutConfig("vllm", init_args={"url": "http://h:1"}), EngineContext(None))


def test_an_engine_that_lacks_part_of_the_protocol_is_refused(monkeypatch):
    class NoStep:  # a new class: isinstance caches earlier answers per class
        def generate(self, prompt, sampling, **kwargs): ...

        def sync_weights(self, policy): ...

        def close(self): ...

    monkeypatch.setattr(HFConfig, "build", lambda self, context: NoStep())
    with pytest.raises(PebrError, match=r"lacks at_step \(engines/base.py: RolloutEngine\)"):
        build_engine(RolloutConfig(), EngineContext(None))


def test_former_vllm_flags_name_the_new_ones(tmp_path, capsys):
    argv = ["--model", "m", "--manifest", "x.jsonl", "--out", str(tmp_path)]
    assert main(["eval", *argv, "--vllm-python", "/p/python"]) == 2
    assert capsys.readouterr().err == (
        "error: --vllm-python was replaced: write --engine vllm --engine-arg python=/p/python\n"
    )
    assert main(["sample", *argv, "--engine", "vllm", "--engine-arg", "dtype"]) == 2
    assert "--engine-arg 'dtype': write KEY=VALUE" in capsys.readouterr().err
    assert main(["eval", *argv, "--engine", "vllm", "--engine-arg", "dtype=float32"]) == 2
    assert "give exactly one of init_args.python" in capsys.readouterr().err


def test_grpo_eval_and_sample_run_through_an_installed_engine_package(
    recorder, tiny_path, shapes_data, tmp_path
):
    log = recorder
    rollout = {"name": "recorder", "init_args": {"log": str(log), "tag": "fit"}}
    fit = [
        "fit",
        "--config", str(REPO / "configs/demo/reasoning.yaml"),
        "--model.init_args.policy.model", str(tiny_path),
        "--model.init_args.rewards", json.dumps([{"name": "format"}]),
        "--model.init_args.rollout", json.dumps(rollout),
        "--model.init_args.sampling.group_size", "2",
        "--model.init_args.sampling.max_new_tokens", "6",
        "--data.init_args.train_manifest", str(shapes_data["train"]),
        "--data.init_args.batch_size", "2",
        "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(tmp_path / "fit"),
    ]  # fmt: skip
    assert main(fit) == 0
    fitted = [e for e in events(log) if e["tag"] == "fit"]
    kinds = [e["event"] for e in fitted]
    # synced once before training and after each update; a rollout per step; closed
    assert kinds == ["sync", "generate", "sync", "generate", "sync", "close"]
    assert [e["step"] for e in fitted if e["event"] == "generate"] == [0, 1]
    assert all(e["rows"] == 4 for e in fitted if e["event"] == "generate")  # 2 prompts x 2

    common = ["--model", str(tiny_path), "--manifest", str(shapes_data["val"]), "--no-progress"]
    evaluate = ["eval", *common, "--limit", "5", "--batch-size", "4", "--max-new-tokens", "8"]
    engine = ["--engine", "recorder", "--engine-arg", f"log={log}", "--engine-arg", "tag=eval"]
    assert main([*evaluate, "--out", str(tmp_path / "hf")]) == 0
    assert main([*evaluate, *engine, "--out", str(tmp_path / "rec")]) == 0
    evaluated = [e for e in events(log) if e["tag"] == "eval"]
    assert [e["event"] for e in evaluated] == ["sync", "generate", "generate", "close"]
    assert [len(e["ids"]) for e in evaluated if e["event"] == "generate"] == [4, 1]
    metrics = json.loads((tmp_path / "rec" / "metrics.json").read_text())
    assert metrics["engine"] == "recorder" and metrics["engine_args"]["tag"] == "eval"
    # the same decode loop underneath: the same greedy answers as the default engine
    hf = (tmp_path / "hf" / "predictions.jsonl").read_text()
    assert (tmp_path / "rec" / "predictions.jsonl").read_text() == hf

    sample = ["sample", *common, "--k", "2", "--limit", "3", "--max-new-tokens", "6"]
    engine[-1] = "tag=sample"
    assert main([*sample, *engine, "--out", str(tmp_path / "sample")]) == 0
    sampled = [e for e in events(log) if e["tag"] == "sample"]
    assert sampled[-1]["event"] == "close"
    assert sum(len(e["ids"]) for e in sampled if e["event"] == "generate") == 3
    assert all(e["rows"] == 2 * len(e["ids"]) for e in sampled if e["event"] == "generate")
    summary = json.loads((tmp_path / "sample" / "summary.json").read_text())
    assert sum(summary["counts"].values()) == 3
