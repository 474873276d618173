"""`pebr sample`: roll k responses per question, grade them, write the three splits.

Progress lives in `OUT/rollouts.jsonl`, one line per graded question, appended
after every batch and flushed to disk. A killed run leaves at most one partial
last line, which the next run cuts off before continuing with the questions not
yet graded; the split manifests and the summary are written (atomically) only
once every question is graded. The settings are kept in `OUT/settings.json`: a
run with other settings refuses to continue someone else's progress. Where the
model runs (device, dtype) is not a setting: a run cut on one machine may finish
on another; `OUT/summary.json` records where the last run ran.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.data.prompts import PromptConfig
from pebr_lightning.difficulty.split import SPLITS, check_thresholds, difficulty, histogram
from pebr_lightning.engines import RolloutConfig, load_decoder
from pebr_lightning.errors import PebrError
from pebr_lightning.evaluation.devices import resolve_device, resolve_dtype
from pebr_lightning.evaluation.greedy import batched_completions
from pebr_lightning.files import write_atomic
from pebr_lightning.models.rollout import SamplingConfig
from pebr_lightning.rewards.accuracy import AccuracyReward


@dataclass(frozen=True)
class SampleSettings:
    """What a difficulty-sampling run does (defaults: the paper's k 8, T 1.2, top_p 0.99)."""

    model: str
    """The checkpoint to sample from (usually the warm-up SFT result)."""
    manifest: str
    """Questions to sort (absolute path)."""
    k: int = 8
    """Rollouts per question."""
    temperature: float = 1.2
    top_p: float = 0.99
    max_new_tokens: int = 256
    easy_min: int | None = None
    """Correct rollouts needed for Easy; None = all k."""
    hard_max: int = 0
    """At most this many correct rollouts = Hard."""
    seed: int = 0
    limit: int | None = None
    """Only the first `limit` questions (quick runs)."""


def sample_difficulty(
    settings: SampleSettings,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    prompt: PromptConfig = PromptConfig(),
    progress: bool = True,
    device: str = "auto",
    dtype: str = "auto",
    rollout: RolloutConfig = RolloutConfig(),
) -> dict[str, Any]:
    """Sort `settings.manifest` into OUT/{easy,medium,hard}.jsonl; returns the summary.

    Resumes a run killed part-way (same settings). `batch_size` is in questions: one
    batch decodes batch_size x k sequences. `progress` shows a bar with rate and ETA
    on stderr. `device` and `dtype` say where the model runs (evaluation/devices.py:
    `auto` is the GPU in bfloat16 when there is one, else the CPU in float32).
    `rollout`: the engine that decodes (`hf`, the default; `vllm`: a vLLM worker loads
    `settings.model`; or any installed engine plugin).
    """
    check_thresholds(settings.k, settings.easy_min, settings.hard_max)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _claim(out / "settings.json", settings)
    records = load_manifest(settings.manifest).records[: settings.limit]
    log = out / "rollouts.jsonl"
    done = _read_progress(log)
    todo = [r for r in records if r["id"] not in done]
    if todo:
        where = (device, dtype, rollout)
        _roll(settings, records, todo, log, batch_size, prompt, progress, where)
        done = _read_progress(log)
    return _write_splits(settings, records, done, out, {"device": device, "dtype": dtype})


def _roll(
    settings: SampleSettings,
    records: list[dict],
    todo: list[dict],
    log: Path,
    batch_size: int,
    prompt: PromptConfig,
    progress: bool,
    where: tuple[str, str, RolloutConfig],
) -> None:
    from tqdm import tqdm

    device, dtype, rollout = where
    policy, processor, engine = load_decoder(settings.model, rollout, device, dtype)
    sampling = SamplingConfig(
        group_size=settings.k,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
    )
    grader = AccuracyReward()
    first = len(records) - len(todo)
    # Progress lines are a prefix of `records`, so `todo` starts at record `first`:
    # seeding by record position makes a resumed run draw the numbers it would have.
    batches = batched_completions(
        policy,
        processor,
        todo,
        sampling,
        batch_size=batch_size,
        prompt=prompt,
        seed=settings.seed * 1_000_003 + first,
        engine=engine,
    )
    # Rate and ETA count this run's questions only (`initial`: graded before a resume).
    bar = tqdm(
        total=len(records),
        initial=first,
        desc=f"sample x{settings.k}",
        unit="q",
        file=sys.stderr,
        disable=not progress,
    )
    try:
        for chunk, texts in batches:
            _append(log, tally(chunk, texts, settings.k, grader))
            bar.update(len(chunk))
    finally:
        bar.close()
        engine.close()  # e.g. the worker process this run started


def tally(records: list[dict], texts: list[str], k: int, grader: Any) -> list[dict]:
    """One progress line per record: how many of its k completions (contiguous in
    `texts`) the grader scored 1.0, and how many it could not grade (None)."""
    scores = grader(completions=texts, samples=[r for r in records for _ in range(k)])
    lines = []
    for i, record in enumerate(records):
        mine = scores[i * k : (i + 1) * k]
        lines.append(
            {
                "id": record["id"],
                "correct": sum(1 for s in mine if s == 1.0),
                "ungraded": sum(1 for s in mine if s is None),
                "k": k,
            }
        )
    return lines


def _claim(path: Path, settings: SampleSettings) -> None:
    """Record the settings, or check that an earlier run used the same ones."""
    mine = asdict(settings)
    if path.exists():
        try:
            theirs = json.loads(path.read_text())
        except ValueError as err:
            raise PebrError(f"{path}: unreadable settings of an earlier run: {err}") from None
        changed = sorted(k for k in mine if theirs.get(k) != mine[k])
        if changed:
            raise PebrError(
                f"{path.parent} holds a sampling run with other settings"
                f" ({', '.join(f'{k}: {theirs.get(k)!r} -> {mine[k]!r}' for k in changed)});"
                " use another output folder, or delete it to start over"
            )
        return
    write_atomic(path, json.dumps(mine, indent=2) + "\n")


def _read_progress(log: Path) -> dict[str, dict]:
    """Graded questions by id; a partial last line (a killed write) is cut off the file."""
    if not log.exists():
        return {}
    data = log.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with log.open("r+b") as f:
            f.truncate(len(complete))
    done = {}
    for number, raw in enumerate(complete.splitlines(), start=1):
        try:
            line = json.loads(raw)
            done[line["id"]] = line
        except (ValueError, KeyError, TypeError) as err:
            raise PebrError(f"{log}:{number}: unreadable progress line: {err}") from None
    return done


def _append(log: Path, lines: list[dict]) -> None:
    """Append whole lines in one write, then force them to disk."""
    with log.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def _write_splits(
    settings: SampleSettings,
    records: list[dict],
    done: dict[str, dict],
    out: Path,
    placement: dict[str, str],
) -> dict[str, Any]:
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for record in records:
        line = done[record["id"]]
        label = difficulty(line["correct"], settings.k, settings.easy_min, settings.hard_max)
        splits[label].append(record)
    for name, members in splits.items():
        write_atomic(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in members))
    counts = [done[r["id"]]["correct"] for r in records]
    summary = {
        "questions": len(records),
        "counts": {name: len(members) for name, members in splits.items()},
        "histogram": histogram(counts, settings.k),
        "ungraded_rollouts": sum(done[r["id"]]["ungraded"] for r in records),
        "easy_min": check_thresholds(settings.k, settings.easy_min, settings.hard_max),
        "hard_max": settings.hard_max,
        "k": settings.k,
        **placement,
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
