"""Greedy accuracy of a model on a manifest, overall and per question type.

Each question is answered once with greedy decoding (temperature 0: the most likely
token at every step, so a run is reproducible), the final answer is graded by the
accuracy reward that RL trains on (rewards/accuracy.py), and the results go to
`OUT/predictions.jsonl` (one line per record) and `OUT/metrics.json`. The paper
reports accuracy on its benchmarks the same way: one greedy answer per question.

Prompts are batched with left padding; the prompt is prefilled once and decoded with
the same loop as RL rollouts (models/rollout.py), with each image encoded once.
`greedy_answers` runs that loop on a model already in memory, for a stage that
evaluates between steps without loading the model again.

    pebr eval --model tiny-qwen2.5-vl --manifest data/shapes-val/manifest.jsonl --out eval/
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pebr_lightning import entry_points
from pebr_lightning.data.manifest import DEFAULT_TYPE, load_manifest
from pebr_lightning.data.prompts import PromptConfig
from pebr_lightning.engines import (
    HFEngine,
    RolloutConfig,
    RolloutEngine,
    complete_records,
    load_decoder,
)
from pebr_lightning.errors import PebrError
from pebr_lightning.files import write_atomic
from pebr_lightning.metrics.accuracy import AccuracyByType
from pebr_lightning.models.rollout import (
    SamplingConfig,
)
from pebr_lightning.rewards.accuracy import AccuracyReward
from pebr_lightning.rewards.answers import extract_final_answer


def evaluate(
    model: str,
    manifest: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    prompt: PromptConfig = PromptConfig(),
    limit: int | None = None,
    progress: bool = True,
    device: str = "cpu",
    dtype: str | None = None,
    samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    rollout: RolloutConfig = RolloutConfig(),
) -> dict[str, float]:
    """Answer every question of `manifest` greedily, grade it, write predictions and metrics.

    Args:
        model: `tiny-qwen2.5-vl`, a checkpoint folder, a LoRA adapter folder (merged into
            its base) or a hub id.
        manifest: a JSONL manifest (docs/data.md); records without `type` count as "all".
        out_dir: where `predictions.jsonl` and `metrics.json` are written (created if
            needed); each file appears whole or not at all.
        batch_size: questions decoded together.
        max_new_tokens: answer length cap; an answer cut there is graded as it stands.
        prompt: instruction and system prompt, as in training.
        limit: evaluate only the first `limit` records.
        progress: show a progress bar (or a line per batch without tqdm) on stderr.
        device: where the model runs, e.g. "cpu", "cuda".
        dtype: weight dtype name ("float32", "bfloat16", "float16"); None keeps the
            checkpoint's own.
        samples: also draw this many sampled answers per question (at `temperature`)
            and report their mean accuracy and pass@samples; 0 draws none.
        temperature: sampling temperature of those answers.
        seed: seed of those answers' random draws (the same seed draws the same answers).
        rollout: the engine that decodes, by name or class path with its settings
            (`hf`: the model itself; `vllm`: a vLLM worker that loads `model`, a full
            model folder or hub id; or any installed engine plugin).

    Returns:
        "accuracy", "accuracy/<type>", "n", "n/<type>", "ungraded" and "seconds" (the
        whole run, model loading included), as floats; with `samples` = k,
        "sampled_accuracy" and "pass@k" too; and what every evaluation metric plugin
        (`extra_metrics`) adds: with the demo installed, for records that carry
        ground-truth `shapes`, "perception/count", "perception/colours",
        "perception/shapes" and "perception/shapes_ordered" of the greedy descriptions,
        and accuracy split by whether the description named the right shapes:
        "accuracy/desc_right", "accuracy/desc_wrong" (with their counts), and per type
        (pebr_demo/evaluation/perception.py).

    Raises:
        PebrError: the manifest is missing or invalid, the model cannot be loaded, or a
            setting is out of range.
    """
    start = time.perf_counter()
    if batch_size < 1:
        raise PebrError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise PebrError(f"limit must be >= 1, got {limit}")
    if samples < 0:
        raise PebrError(f"samples must be >= 0, got {samples}")
    records = load_manifest(manifest).records[:limit]  # fail on a bad manifest before loading
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy, processor, engine = load_decoder(model, rollout, device, dtype)
    where: dict[str, Any] = {"engine": rollout.label}
    if rollout.init_args:
        where["engine_args"] = rollout.init_args
    if policy is not None:
        weights = next(policy.parameters())
        where["device"] = str(weights.device)
        where["dtype"] = str(weights.dtype).removeprefix("torch.")

    bar = _Progress(len(records), progress)
    try:  # the bar closes (idempotent) and a worker started here stops, whatever happens
        texts = greedy_answers(
            policy,
            processor,
            records,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            prompt=prompt,
            on_batch=bar.update,
            engine=engine,
        )
        bar.close()  # before the sampled answers' bar starts
        rows = grade_answers(records, texts)
        metric = accuracy_metric(rows)
        values = {k: float(v) for k, v in metric.compute().items()}
        values.update({k: float(v) for k, v in metric.counts().items()})
        values.update(extra_metrics(records, texts, [r["correct"] for r in rows], values))
        if samples:
            sampling = SamplingConfig(
                group_size=samples,
                temperature=temperature,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
            )
            values.update(
                sampled_accuracy(
                    policy,
                    processor,
                    records,
                    sampling,
                    batch_size=batch_size,
                    prompt=prompt,
                    seed=seed,
                    progress=progress,
                    engine=engine,
                )
            )
    finally:
        bar.close()
        engine.close()  # e.g. a worker process it started
    values["seconds"] = time.perf_counter() - start
    summary = {
        **values,
        "model": model,
        "manifest": str(manifest),
        **where,
    }
    write_atomic(
        out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    write_atomic(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    return values


def greedy_answers(
    policy: nn.Module,
    processor: Any,
    records: Sequence[dict[str, Any]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    prompt: PromptConfig = PromptConfig(),
    share_image_features: bool = True,
    on_batch: Callable[[int], None] | None = None,
    synced: bool = False,
    engine: RolloutEngine | None = None,
) -> list[str]:
    """One greedy completion per record, in record order, from a model already loaded.

    `policy` may be PEFT-wrapped (its adapter stays active) and in training mode: it is
    put in eval mode for the loop and back in its previous mode afterwards. Inputs go
    to the device of its parameters. `on_batch(n)` is called after each batch of n.
    `synced`: the weights are sharded, so every process decodes until all are done.
    """
    sampling = SamplingConfig(group_size=1, temperature=0.0, max_new_tokens=max_new_tokens)
    texts: list[str] = []
    for chunk, chunk_texts in batched_completions(
        policy,
        processor,
        records,
        sampling,
        batch_size=batch_size,
        prompt=prompt,
        share_image_features=share_image_features,
        synced=synced,
        engine=engine,
    ):
        texts += chunk_texts
        if on_batch is not None:
            on_batch(len(chunk))
    return texts


def batched_completions(
    policy: nn.Module,
    processor: Any,
    records: Sequence[dict[str, Any]],
    sampling: SamplingConfig,
    *,
    batch_size: int = 16,
    prompt: PromptConfig = PromptConfig(),
    share_image_features: bool = True,
    seed: int | None = None,
    synced: bool = False,
    engine: RolloutEngine | None = None,
) -> Iterator[tuple[list[dict[str, Any]], list[str]]]:
    """Yield (records of the batch, their G completions each, group members contiguous),
    generated by an HFEngine on `policy` (engines/: the loop GRPO rollouts, evaluation
    and difficulty sampling share). With `seed`, the batch starting at record i draws
    from a generator seeded with seed + i, so a resumed run draws what it would have.
    """
    if engine is None:  # the policy decodes (an engine given instead serves the weights)
        engine = HFEngine(processor, share_image_features, synced=synced)
        engine.sync_weights(policy)
    device = next(policy.parameters()).device if policy is not None else "cpu"
    yield from complete_records(
        engine,
        processor,
        records,
        sampling,
        batch_size=batch_size,
        prompt=prompt,
        device=device,
        seed=seed,
    )


def sampled_accuracy(
    policy: nn.Module,
    processor: Any,
    records: Sequence[dict[str, Any]],
    sampling: SamplingConfig,
    *,
    batch_size: int = 16,
    prompt: PromptConfig = PromptConfig(),
    seed: int = 0,
    progress: bool = False,
    engine: RolloutEngine | None = None,
) -> dict[str, float]:
    """Mean accuracy of `sampling.group_size` sampled answers per question, and pass@k
    (the share of questions with at least one right answer among them).

    Greedy accuracy shows the single most likely answer; RL on a small model often
    moves the sampled distribution first, which only these two figures show.
    """
    k = sampling.group_size
    right = per_question = 0.0
    bar = _Progress(len(records), progress, desc=f"sample x{k}")
    try:
        for chunk, texts in batched_completions(
            policy,
            processor,
            records,
            sampling,
            batch_size=batch_size,
            prompt=prompt,
            seed=seed,
            engine=engine,
        ):
            rows = grade_answers([r for r in chunk for _ in range(k)], texts)
            correct = torch.tensor([r["correct"] for r in rows], dtype=torch.float64)
            correct = correct.view(len(chunk), k)  # [B, k]: group members are contiguous
            right += float(correct.sum())
            per_question += float(correct.amax(-1).sum())
            bar.update(len(chunk))
    finally:
        bar.close()
    n = max(len(records), 1)
    return {"sampled_accuracy": right / (n * k), f"pass@{k}": per_question / n}


def extra_metrics(
    records: list[dict[str, Any]],
    texts: list[str],
    correct: list[bool],
    taken: dict[str, float],
) -> dict[str, float]:
    """What the evaluation metric plugins (entry-point group `pebr_lightning.eval_metrics`)
    compute from the greedy predictions: `f(records, texts, correct) -> {name: value}`,
    {} where a metric does not apply. A name already `taken` (by accuracy or by another
    plugin) is an error naming the plugin, not a silent overwrite."""
    found: dict[str, float] = {}
    for name, metric in entry_points.load_all(
        entry_points.EVAL_METRICS, "evaluation metric"
    ).items():
        for key, value in metric(records, texts, correct).items():
            if key in taken or key in found:
                raise PebrError(f"evaluation metric {name!r}: {key!r} is already reported")
            found[key] = float(value)
    return found


def grade_answers(
    records: Sequence[dict[str, Any]],
    texts: Sequence[str],
    reward: AccuracyReward | None = None,
) -> list[dict[str, Any]]:
    """One prediction row per record: id, type, question, answer, prediction, extracted,
    correct, graded. An answer the reward cannot grade (None) has correct False and
    graded False."""
    reward = reward or AccuracyReward()
    scores = reward(completions=list(texts), samples=list(records))
    rows = []
    for record, text, score in zip(records, texts, scores, strict=True):
        rows.append(
            {
                "id": record["id"],
                "type": record.get("type") or DEFAULT_TYPE,
                "question": record["question"],
                "answer": record["answer"],
                "prediction": text,
                "extracted": extract_final_answer(text),
                "correct": score == 1.0,
                "graded": score is not None,
            }
        )
    return rows


def accuracy_metric(
    rows: Sequence[dict[str, Any]], types: Sequence[str] | None = None
) -> AccuracyByType:
    """An AccuracyByType updated with prediction rows (from `grade_answers`).

    `types` defaults to the sorted types of `rows`; across processes pass the types of
    the whole manifest, so that every process holds states of the same length.
    """
    types = sorted({r["type"] for r in rows}) if types is None else list(types)
    position = {name: i for i, name in enumerate(types)}
    metric = AccuracyByType(types)
    metric.update(
        torch.tensor([r["correct"] for r in rows], dtype=torch.float64),
        torch.tensor([position[r["type"]] for r in rows], dtype=torch.long),
        ungraded=torch.tensor([not r["graded"] for r in rows], dtype=torch.bool),
    )
    return metric


class _Progress:
    """A tqdm bar on stderr, or a line per batch where tqdm is missing; silent when off."""

    def __init__(self, total: int, enabled: bool, desc: str = "eval") -> None:
        self.total, self.done, self.enabled, self.bar = total, 0, enabled, None
        self.desc = desc
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=desc, unit="q", file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            print(f"{self.desc}: {self.done}/{self.total} questions", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
