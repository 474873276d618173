"""Run a schedule: each stage into its own folder, finished stages skipped, interrupted
ones resumed.

A stage is finished when `out/<stage>/DONE.json` exists; it is written (atomically)
only after the stage's training and its held-out evaluation both completed, and it
records the weights the next stage starts from. A training stage that was
interrupted resumes from the newest `last.ckpt` in its folder (`--ckpt_path`), so
its configs should save `last` every few steps (the demo configs do); sampling
resumes from its own progress file. Stages run in this process one after another,
so a kill stops the whole schedule and nothing runs on unattended.

Sampling and evaluation run on the schedule's `device` (auto: the GPU when there is
one), checked before the first stage; on CUDA their dtype follows the precision
the weights were trained in (`inference_dtype`). Their progress bars show only when
stderr is a terminal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pebr_lightning.errors import PebrError
from pebr_lightning.evaluation.devices import resolve_device, resolve_dtype
from pebr_lightning.files import exclusive_lock, write_atomic
from pebr_lightning.resume import latest_last_checkpoint, newest_readable_checkpoint
from pebr_lightning.schedule.config import DATA_KEYS, ORDER, FitStage, Schedule

Echo = Callable[[str], None]


def run_schedule(
    schedule: Schedule, stages: list[str] | None = None, echo: Echo = print
) -> dict[str, dict]:
    """Run `stages` (default: all in the file) in order; returns each stage's DONE record."""
    chosen = list(schedule.stage_names if stages is None else stages)
    for name in chosen:
        if name not in schedule.stage_names:
            raise PebrError(
                f"--stages: {name!r} is not in {schedule.path} (it has:"
                f" {', '.join(schedule.stage_names)})"
            )
    # Before anything runs: a schedule that asks for a missing GPU fails now, not after SFT.
    device = resolve_device(schedule.device, f"{schedule.path}: field 'device'")
    schedule = dataclasses.replace(schedule, device=device)
    out = Path(schedule.out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out, "pebr schedule", lambda line: echo(f"[schedule] {line}")):
        return _run_stages(schedule, chosen, out, echo)


def _run_stages(schedule: Schedule, chosen: list[str], out: Path, echo: Echo) -> dict[str, dict]:
    if schedule.synth:
        _ensure_data(schedule, echo)
    records: dict[str, dict] = {}
    for name in schedule.stage_names:
        done = read_done(out / name)
        if name not in chosen:
            if done is not None:
                records[name] = done
            continue
        if done is not None:
            echo(f"[schedule] {name}: finished earlier, skipped ({out / name / 'DONE.json'})")
            records[name] = done
            continue
        started = time.perf_counter()
        if name == "sample":
            record = _run_sample(schedule, records, out / name, echo)
        else:
            record = _run_fit(schedule, schedule.fit[name], records, out / name, echo)
        record["seconds"] = round(time.perf_counter() - started, 1)
        write_atomic(out / name / "DONE.json", json.dumps(record, indent=2) + "\n")
        echo(f"[schedule] {name}: done in {record['seconds']:.0f} s")
        records[name] = record
    return records


def read_done(stage_dir: Path) -> dict | None:
    """The record of a finished stage, or None; a damaged record is an error, not "unfinished"."""
    path = stage_dir / "DONE.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise PebrError(f"{path}: unreadable stage record ({err}); delete it to rerun") from None


def _start_weights(
    schedule: Schedule, stage: FitStage | None, records: dict[str, dict], before: str
) -> str:
    """Where a stage starts: its `start_from`, else the latest earlier stage's weights."""
    if stage is not None and stage.start_from:
        source = Path(stage.start_from)
        done = read_done(source) if source.is_dir() else None
        return os.path.abspath(done["weights"]) if done else stage.start_from
    for name in reversed(ORDER[: ORDER.index(before)]):
        if name in records and records[name].get("weights"):
            return records[name]["weights"]
        if name in schedule.stage_names and name != "sample":
            raise PebrError(
                f"stage {before!r} starts from stage {name!r}, which has not finished;"
                f" run it first (pebr schedule --stages {name},{before})"
            )
    return schedule.model


def _run_fit(
    schedule: Schedule, stage: FitStage, records: dict[str, dict], stage_dir: Path, echo: Echo
) -> dict[str, Any]:
    from pebr_lightning.cli import cli

    start = _start_weights(schedule, stage, records, stage.name)
    manifest = stage.manifest or _split_manifest(schedule, stage, records)
    args = [
        "fit",
        "--config",
        stage.config,
        "--trainer.default_root_dir",
        str(stage_dir),
        "--model.init_args.policy.model",
        start,
        "--data.init_args.train_manifest",
        manifest,
    ]
    # The schedule's `data` decides validation, not whatever path the stage config
    # names: SFT validates on data.val when given; the RL stages have no validation step.
    val = schedule.data.get("val") if stage.name == "sft" else None
    args += ["--data.init_args.val_manifest", val or "null"]
    args += list(stage.args)
    resume = newest_readable_checkpoint(stage_dir, echo)
    if resume is not None:
        echo(f"[schedule] {stage.name}: resuming from {resume}")
        args += ["--ckpt_path", str(resume)]
    echo(f"[schedule] {stage.name}: pebr {' '.join(args)}")
    argv = sys.argv
    sys.argv = argv[:1]  # LightningCLI warns when given args while sys.argv holds others
    try:
        cli(args)
    finally:
        sys.argv = argv
    last = latest_last_checkpoint(stage_dir)
    weights = last.with_name("last.hf") if last else None
    if weights is None or not weights.is_dir():
        raise PebrError(
            f"stage {stage.name!r} wrote no last.hf under {stage_dir}: its config must keep"
            " an HFCheckpoint callback with save_last: true"
        )
    _check_same_step(last, weights)
    record: dict[str, Any] = {
        "stage": stage.name,
        "weights": os.path.abspath(weights),
        "started_from": start,
        "manifest": manifest,
    }
    if schedule.data.get("test"):
        record["eval"] = _evaluate(schedule, stage, record["weights"], stage_dir / "eval", echo)
    return record


def _check_same_step(ckpt: Path, weights: Path) -> None:
    """Refuse a stage result whose `.hf` holds another step than its checkpoint."""
    from pebr_lightning.callbacks.checkpoint import checkpoint_step, hf_step

    step = checkpoint_step(ckpt)
    found = hf_step(weights)
    if found != step:
        raise PebrError(
            f"{weights} holds the weights of step {found}, but {ckpt} is step {step}: "
            "rerun the stage (it resumes and writes last.hf again)"
        )


def _split_manifest(schedule: Schedule, stage: FitStage, records: dict[str, dict]) -> str:
    if stage.split is None:
        return schedule.data["train"]
    sample = records.get("sample")
    if sample is None:
        raise PebrError(
            f"stage {stage.name!r} trains on the {stage.split!r} split, but the sample stage"
            " has not finished (or is not in the schedule); run it first, or give the stage"
            " a `manifest`"
        )
    count = sample["summary"]["counts"][stage.split]
    if count == 0:
        raise PebrError(
            f"stage {stage.name!r} trains on the {stage.split!r} split, which is empty"
            f" ({sample['summary']['counts']}; histogram of correct rollouts"
            f" {sample['summary']['histogram']}): change the thresholds in stages.sample"
            " (easy_min, hard_max) and delete the sample folder, or give the stage a `manifest`"
        )
    return sample["splits"][stage.split]


def _run_sample(
    schedule: Schedule, records: dict[str, dict], stage_dir: Path, echo: Echo
) -> dict[str, Any]:
    from pebr_lightning.difficulty.sampler import SampleSettings, sample_difficulty
    from pebr_lightning.difficulty.split import format_summary

    spec = dict(schedule.sample or {})
    batch_size = spec.pop("batch_size", 8)
    model = _start_weights(schedule, None, records, "sample")
    producer = next(
        (s for n, s in schedule.fit.items() if records.get(n, {}).get("weights") == model), None
    )
    dtype = inference_dtype(schedule, producer)
    pool = schedule.data.get("rl", schedule.data["train"])
    settings = SampleSettings(model=model, manifest=os.path.abspath(pool), **spec)
    echo(
        f"[schedule] sample: {settings.k} rollouts per question with {model}"
        f" on {schedule.device} in {dtype}"
    )
    summary = sample_difficulty(
        settings,
        stage_dir,
        batch_size=batch_size,
        progress=sys.stderr.isatty(),
        device=schedule.device,
        dtype=dtype,
    )
    echo(format_summary(summary))
    splits = {name: os.path.abspath(stage_dir / f"{name}.jsonl") for name in summary["counts"]}
    return {"stage": "sample", "summary": summary, "splits": splits}


def _evaluate(
    schedule: Schedule, stage: FitStage, weights: str, out_dir: Path, echo: Echo
) -> dict[str, float]:
    from pebr_lightning.evaluation.greedy import evaluate

    dtype = inference_dtype(schedule, stage)
    options = {"progress": sys.stderr.isatty(), **schedule.eval}
    metrics = evaluate(
        weights, schedule.data["test"], out_dir, device=schedule.device, dtype=dtype, **options
    )
    echo(
        f"[schedule] held-out accuracy {metrics['accuracy']:.3f}"
        f" on {schedule.device} in {dtype} ({out_dir})"
    )
    return metrics


def inference_dtype(
    schedule: Schedule, stage: FitStage | None, bf16_supported: bool | None = None
) -> str:
    """The dtype sampling or evaluation loads `stage`'s weights in (None: weights no
    stage of this schedule produced), on the schedule's device: its `dtype`, where
    `auto` on CUDA follows the precision the stage trained in (evaluation/devices.py)."""
    precision = None if stage is None else stage_precision(stage)
    return resolve_dtype(schedule.dtype, schedule.device, precision, bf16_supported)


def stage_precision(stage: FitStage) -> str | None:
    """`trainer.precision` of a fit stage: the last `--trainer.precision` in its args,
    else its config's; None when neither sets it (or the config does not read: the
    stage's own `pebr fit` reports that)."""
    args = list(stage.args)
    for i in reversed(range(len(args))):
        if args[i].startswith("--trainer.precision="):
            return args[i].split("=", 1)[1]
        if args[i] == "--trainer.precision" and i + 1 < len(args):
            return args[i + 1]
    try:
        config = yaml.safe_load(Path(stage.config).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    trainer = config.get("trainer") if isinstance(config, dict) else None
    precision = trainer.get("precision") if isinstance(trainer, dict) else None
    return None if precision is None else str(precision)


def _ensure_data(schedule: Schedule, echo: Echo) -> None:
    """Write the synthetic data (`synth.name`, default shapes: data/synthetic.py)
    where the schedule expects it, if missing.

    Data already there is used only if it is what these settings write now: data
    from an older version of the synthetic layout, or with another record count,
    would otherwise train and score every stage on the old task without a word."""
    from pebr_lightning.data.synthetic import DEFAULT, load_synthetic

    data = load_synthetic(str(schedule.synth.get("name", DEFAULT)))
    seed = int(schedule.synth.get("seed", 0))
    for offset, split in enumerate(DATA_KEYS):
        path = schedule.data.get(split)
        n = schedule.synth.get(split)
        if path is None or n is None:
            continue
        if Path(path).exists():
            why = data.written_differently(path, int(n), seed + offset)
            if why is not None:
                raise PebrError(
                    f"{schedule.path}: field 'data.{split}': {path} {why}, so it was"
                    f" written by another version of the synthetic data or with other"
                    f" `synth` settings. Remove {Path(path).parent} to have it written"
                    f" again, or drop synth.{split} to use the file as it is."
                )
            continue
        echo(f"[schedule] writing {n} synthetic {split} records to {Path(path).parent}")
        written = data.write(Path(path).parent, n=int(n), seed=seed + offset)
        if Path(written) != Path(path):
            raise PebrError(
                f"{schedule.path}: field 'data.{split}': synthetic data is written as"
                f" {written}; point data.{split} there"
            )
