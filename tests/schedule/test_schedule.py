"""`pebr schedule`: stages chained, finished ones skipped, an interrupted one resumed."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from pebr_lightning.cli import main
from pebr_lightning.errors import PebrError
from pebr_lightning.schedule.config import FitStage, load_schedule
from pebr_lightning.schedule.runner import _split_manifest, inference_dtype, stage_precision

REPO = Path(__file__).resolve().parents[2]
SMALL_GRPO = [
    "--trainer.max_steps=2",
    "--model.init_args.sampling.group_size=2",
    "--model.init_args.sampling.max_new_tokens=8",
    "--data.init_args.batch_size=2",
]


def small_sft_config(path: Path) -> Path:
    """The demo SFT config, with a checkpoint every 2 steps and no validation."""
    config = yaml.safe_load((REPO / "configs" / "demo" / "sft.yaml").read_text())
    config["trainer"]["callbacks"][1]["init_args"] = {"save_last": True, "every_n_train_steps": 2}
    config["trainer"].update(val_check_interval=None, limit_val_batches=0, log_every_n_steps=1)
    config["data"]["init_args"].update(batch_size=4, num_workers=0)
    path.write_text(yaml.safe_dump(config))
    return path


def write_schedule(tmp_path: Path, data: dict[str, Path], sft_steps: int = 4) -> Path:
    train = str(data["train"])
    schedule = {
        "out": str(tmp_path / "out"),
        "model": "tiny-qwen2.5-vl",
        # the RL pool is a manifest of its own: difficulty sampling draws from it
        "data": {"train": train, "test": str(data["val"]), "rl": str(data["val"])},
        "eval": {"batch_size": 8, "max_new_tokens": 8, "limit": 8, "progress": False},
        "stages": {
            "sft": {
                "config": str(small_sft_config(tmp_path / "sft.yaml")),
                "args": [f"--trainer.max_steps={sft_steps}"],
            },
            "sample": {"k": 2, "max_new_tokens": 8, "limit": 6, "batch_size": 6},
            # A 4-step model answers (almost) nothing right: train on the full set.
            "perception": {
                "config": str(REPO / "configs/demo/perception.yaml"),
                "manifest": train,
                "args": SMALL_GRPO,
            },
            "reasoning": {
                "config": str(REPO / "configs/demo/reasoning.yaml"),
                "manifest": train,
                "args": SMALL_GRPO,
            },
        },
    }
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump(schedule))
    return path


def test_stages_chain_then_a_second_run_skips_them(tiny_path, shapes_data, tmp_path, capsys):
    config = write_schedule(tmp_path, shapes_data)
    assert main(["schedule", "--config", str(config)]) == 0
    out = tmp_path / "out"
    done = {s: json.loads((out / s / "DONE.json").read_text()) for s in ("sft", "sample")}
    done |= {
        s: json.loads((out / s / "DONE.json").read_text()) for s in ("perception", "reasoning")
    }
    assert done["sft"]["started_from"] == "tiny-qwen2.5-vl"
    assert done["perception"]["started_from"] == done["sft"]["weights"]
    assert done["reasoning"]["started_from"] == done["perception"]["weights"]
    # The demo RL stages fine-tune the whole model: full weights, no adapter.
    assert (Path(done["perception"]["weights"]) / "model.safetensors").exists()
    assert done["sample"]["summary"]["questions"] == 6
    pool = {json.loads(line)["id"] for line in shapes_data["val"].read_text().splitlines()}
    sorted_ids = [
        json.loads(line)["id"]
        for split in ("easy", "medium", "hard")
        for line in (out / "sample" / f"{split}.jsonl").read_text().splitlines()
    ]
    assert len(sorted_ids) == 6 and set(sorted_ids) <= pool  # data.rl, not data.train
    placement = ("cuda", "float32") if torch.cuda.is_available() else ("cpu", "float32")
    summary = done["sample"]["summary"]
    assert (summary["device"], summary["dtype"]) == placement  # the demo configs: 32-true
    for stage in ("sft", "perception", "reasoning"):
        metrics = json.loads((out / stage / "eval" / "metrics.json").read_text())
        assert done[stage]["eval"]["accuracy"] == pytest.approx(metrics["accuracy"])
        assert (metrics["device"].split(":")[0], metrics["dtype"]) == placement
    printed = capsys.readouterr().out
    assert f"on {placement[0]} in float32" in printed
    table = (out / "report.md").read_text()
    assert table.strip() in printed
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == [
        "sft",
        "perception",
        "reasoning",
        "(majority answer per type)",
    ]
    header = [c.strip() for c in re.split(r"(?<!\\)\|", table.splitlines()[0].strip("|"))]
    assert header[4:] == [
        "greedy",
        "sampled T=1",
        "pass@8",
        "desc. count",
        "desc. colours",
        "desc. shapes right",
        "desc. shapes in order",
        r"acc. \| desc. right",
        r"acc. \| desc. wrong",
    ]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "reward/accuracy/mean" in rows["reasoning"]
    sft = [cell.strip() for cell in rows["sft"].strip("|").split("|")]
    metrics = json.loads((out / "sft" / "eval" / "metrics.json").read_text())
    assert sft[4] == f"{metrics['accuracy']:.3f}"
    assert sft[7] == f"{metrics['perception/count']:.3f}"
    assert sft[9] == f"{metrics['perception/shapes']:.3f}"
    assert sft[5] == "—"  # this schedule draws no sampled answers
    with Image.open(out / "rewards.png") as picture:
        assert picture.size == (1300, 480)  # one panel per RL stage
        assert len(set(picture.getdata())) > 3  # axes, text and curves, not a blank page

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/DONE.json")}
    assert main(["schedule", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    for stage in ("sft", "sample", "perception", "reasoning"):
        assert f"[schedule] {stage}: finished earlier, skipped" in printed
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/DONE.json")} == stamps


def test_killed_stage_resumes_from_its_last_checkpoint(tiny_path, shapes_data, tmp_path, capsys):
    """kill -9 while SFT trains (after its first `last.ckpt`); the rerun resumes from
    that checkpoint: the new run's first logged step is past 0, and the stage ends.
    Meanwhile a second run on the same folder is refused (its lock is held), and the
    rerun after the kill takes the folder over, saying from which process."""
    config = write_schedule(tmp_path, shapes_data, sft_steps=60)
    stage_dir = tmp_path / "out" / "sft"
    pebr = str(Path(sys.executable).with_name("pebr"))
    proc = subprocess.Popen(
        [pebr, "schedule", "--config", str(config), "--stages", "sft"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        while not list(stage_dir.glob("lightning_logs/version_0/checkpoints/last.ckpt")):
            assert proc.poll() is None, "the stage ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        # Frozen, it holds its lock and stays mid-stage however long the second run takes
        # to start (it could otherwise finish its steps meanwhile on a loaded machine).
        proc.send_signal(signal.SIGSTOP)
        # a second run on the same folder while the first trains: refused at once
        second = subprocess.run(
            [pebr, "schedule", "--config", str(config), "--stages", "sft"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert proc.poll() is None  # the first one is still there, mid-stage
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"in use by another pebr schedule (process {proc.pid})" in second.stderr
    assert "[schedule] sft:" not in second.stdout  # it started nothing
    assert not (stage_dir / "DONE.json").exists()

    assert main(["schedule", "--config", str(config), "--stages", "sft"]) == 0
    out = capsys.readouterr().out
    assert f"taking over from process {proc.pid}, which stopped without finishing" in out
    assert "[schedule] sft: resuming from" in out
    assert (stage_dir / "DONE.json").exists()
    rows = list(csv.DictReader((stage_dir / "lightning_logs/version_1/metrics.csv").open()))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps and min(steps) > 0 and max(steps) == 59


def test_split_stage_reads_the_sample_split_and_refuses_an_empty_one(tmp_path):
    sample = {
        "summary": {"counts": {"easy": 3, "medium": 0, "hard": 1}, "histogram": [1, 0, 3]},
        "splits": {name: str(tmp_path / f"{name}.jsonl") for name in ("easy", "medium", "hard")},
    }
    schedule = load_schedule(write_schedule(tmp_path, {"train": "t.jsonl", "val": "v.jsonl"}))
    easy = FitStage("perception", "p.yaml", split="easy")
    assert _split_manifest(schedule, easy, {"sample": sample}) == str(tmp_path / "easy.jsonl")
    medium = FitStage("reasoning", "r.yaml", split="medium")
    with pytest.raises(PebrError, match=r"'medium' split, which is empty"):
        _split_manifest(schedule, medium, {"sample": sample})
    with pytest.raises(PebrError, match="sample stage has not finished"):
        _split_manifest(schedule, medium, {})


def test_sampling_and_eval_dtype_follow_the_producing_stage_precision(tmp_path):
    """On CUDA (named; no GPU needed), `dtype: auto` is the dtype of the stage's
    `trainer.precision`: from its config, or from `--trainer.precision` in its args;
    weights no stage produced get bfloat16; the CPU and a named dtype are not changed."""
    schedule = load_schedule(write_schedule(tmp_path, {"train": "t.jsonl", "val": "v.jsonl"}))
    on_cuda = dataclasses.replace(schedule, device="cuda")
    paper = FitStage("sft", str(REPO / "configs" / "sft.yaml"))  # bf16-true
    demo = FitStage("sft", str(REPO / "configs" / "demo" / "sft.yaml"))  # 32-true
    assert stage_precision(paper) == "bf16-true" and stage_precision(demo) == "32-true"
    assert inference_dtype(on_cuda, paper, bf16_supported=True) == "bfloat16"
    assert inference_dtype(on_cuda, demo, bf16_supported=True) == "float32"
    mixed = dataclasses.replace(
        demo, args=("--trainer.max_steps=4", "--trainer.precision=16-mixed")
    )
    assert stage_precision(mixed) == "16-mixed"
    assert inference_dtype(on_cuda, mixed, bf16_supported=True) == "float16"
    spaced = dataclasses.replace(paper, args=("--trainer.precision", "32-true"))
    assert inference_dtype(on_cuda, spaced, bf16_supported=True) == "float32"
    assert inference_dtype(on_cuda, None, bf16_supported=True) == "bfloat16"
    on_cpu = dataclasses.replace(schedule, device="cpu")
    assert inference_dtype(on_cpu, paper, bf16_supported=True) == "float32"
    forced = dataclasses.replace(on_cuda, dtype="float32")
    assert inference_dtype(forced, paper, bf16_supported=True) == "float32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_a_missing_device_stops_the_schedule_before_any_stage(shapes_data, tmp_path, capsys):
    path = write_schedule(tmp_path, shapes_data)
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "device": "cuda"}))
    assert main(["schedule", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: field 'device': cuda needs a CUDA device and none is available" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": {"warmup": {}}}, r"field 'stages.warmup': unknown stage"),
        ({"stages": {"sft": {"args": []}}}, r"field 'stages.sft.config': required"),
        ({"stages": {"sample": {"kk": 8}}}, r"field 'stages.sample.kk': unknown"),
        ({"model": ""}, r"field 'model': required"),
        ({"data": {"test": "x"}}, r"field 'data.train': required"),
        (
            {"data": {"train": "t", "pool": "p"}},
            r"field 'data.pool': expected train, val, test or rl",
        ),
        ({"device": "gpu"}, r"field 'device': expected auto or a torch device"),
        ({"device": 0}, r"field 'device': expected auto or a torch device"),
        ({"dtype": "fp8"}, r"field 'dtype': expected one of auto, float32, bfloat16, float16"),
        ({"eval": {"device": "cuda"}}, r"field 'eval.device': set `device` at the top level"),
        # Before: found only after SFT had run, when the sample stage started
        (
            {"stages": {"sample": {"k": 4, "easy_min": 6}}},
            r"field 'stages.sample': thresholds need 0 <= hard_max < easy_min <= k",
        ),
        ({"stages": {"sample": {"k": 0}}}, r"field 'stages.sample': k must be >= 1"),
        ({"stages": {"sample": {"k": "8"}}}, r"field 'stages.sample.k': expected a whole"),
        ({"stages": {"sample": {"hard_max": -1}}}, r"field 'stages.sample.hard_max': expected"),
    ],
)
def test_bad_schedule_names_file_and_field(change, message, tmp_path):
    base = {"out": "o", "model": "m", "data": {"train": "t"}, "stages": {"sft": {"config": "c"}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**base, **change}))
    with pytest.raises(PebrError, match=rf"bad.yaml: {message}"):
        load_schedule(path)
    assert main(["schedule", "--config", str(path)]) == 2


@pytest.mark.parametrize(
    ("change", "why"),
    [
        # an older layout: the same ids and questions over shapes placed elsewhere
        ("layout", "line 1 is not the record this version writes for it"),
        # written with another synth.train
        ("count", "holds 5 records, not 6"),
    ],
)
def test_synthetic_data_of_another_version_is_refused_not_reused(change, why, tmp_path, capsys):
    from pebr_demo.data.synth import write_dataset, written_differently

    manifest = write_dataset(tmp_path / "data" / "train", n=6, seed=0)
    assert written_differently(manifest, 6, 0) is None  # what this version writes
    lines = manifest.read_text().splitlines()
    if change == "layout":
        first = json.loads(lines[0])
        first["shapes"][0]["x"] += 3
        lines[0] = json.dumps(first)
    else:
        lines = lines[:5]
    manifest.write_text("\n".join(lines) + "\n")
    before = manifest.read_bytes()
    path = tmp_path / "schedule.yaml"
    schedule = {
        "out": str(tmp_path / "out"),
        "model": "tiny-qwen2.5-vl",
        "data": {"train": str(manifest)},
        "synth": {"train": 6, "seed": 0},
        "stages": {"sft": {"config": str(small_sft_config(tmp_path / "sft.yaml"))}},
    }
    path.write_text(yaml.safe_dump(schedule))
    assert main(["schedule", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: field 'data.train': {manifest} {why}" in err
    assert f"Remove {manifest.parent} to have it written again" in err
    assert manifest.read_bytes() == before  # nothing rewritten
    assert not (tmp_path / "out" / "sft").exists()  # no stage ran on it
