"""Does each stage do its job? The demo schedule over several seeds, plus the ablation.

For each seed, the whole schedule (SFT -> difficulty sampling -> perception RL ->
reasoning RL, with held-out evaluation after each training stage) runs into
OUT/seed<N>/, with that seed for every stage (`seed_everything`, the GRPO rollout
noise and the difficulty sampler). Then the paper's ablation runs from the same SFT
checkpoint on the same Medium split: reasoning RL alone, with the RL steps of both
stages together (OUT/seed<N>-reasoning-only/). The data and the embedded model's
initial weights are the same for every seed; what differs is the order of batches
and every random draw (rollouts, difficulty sampling).

It prints one table, mean ± std over seeds of every figure per stage, whether
each target of the learning issue holds (docs/RESULTS.md), and per seed the held-out
greedy accuracy of two-stage vs reasoning-only (the ablation, reported, not judged),
and writes OUT/learning.md, OUT/learning.json and each seed's reward curves,
OUT/seed<N>/rewards.png. Finished stages are skipped on a second run, as
`pebr schedule` does, so an interrupted run continues where it stopped.

Stage 1's reward is also measured on a fixed set: the first `--fixed-questions` of
each seed's split it trained on, 8 completions each at the stage config's sampling
settings and rewards, scored for the weights it started from and those it ended with
(evaluation/stage_reward.py), and for the reference responses (the ceiling). Its
logged curve compares different questions at its start and end; this compares the
same ones, with a paired standard error. Kept in OUT/seed<N>/perception/fixed_set.json.

    python benchmarks/learning.py                       # 3 seeds + ablation, ~50 min on 2 cores
    python benchmarks/learning.py --seeds 0 --no-ablation --out runs/learning-1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.schedule.config import FitStage, Schedule, load_schedule
from pebr_lightning.schedule.curves import plot_curves
from pebr_lightning.schedule.report import majority_baseline, summary_rows
from pebr_lightning.schedule.runner import read_done, run_schedule

HELDOUT = (
    ("accuracy", "greedy acc"),
    ("sampled_accuracy", "sampled acc (T=1)"),
    ("pass@8", "pass@8"),
    ("accuracy/count", "count acc"),
    ("accuracy/colour", "colour acc"),
    ("perception/count", "desc. count right"),
    ("perception/colours", "desc. colours right"),
    ("perception/shapes", "desc. shapes right"),
    ("perception/shapes_ordered", "desc. shapes in order"),
    ("accuracy/desc_right", r"acc. \| desc. right"),
    ("accuracy/desc_wrong", r"acc. \| desc. wrong"),
)
"""Held-out figures per stage and their column titles. "desc. shapes right": the share
of greedy descriptions naming the picture's (colour, kind) pairs as a multiset (what
Stage 1 should raise); "acc. | desc. right" / "desc. wrong": greedy accuracy given a
right / a wrong description (Stage 2 should raise the first); pebr_demo/evaluation/perception.py.
The "|" is escaped so that the Markdown cell holds it."""
ROWS = ("sft", "perception", "reasoning", "reasoning-only")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    base = load_schedule(args.schedule)
    out = Path(args.out)
    started = time.perf_counter()
    runs: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        schedule = seeded(base, seed, out / f"seed{seed}")
        echo(f"seed {seed}: schedule into {schedule.out}")
        run_schedule(schedule)
        plot_curves(Path(schedule.out), Path(schedule.out) / "rewards.png")
        rows = {r["stage"]: r for r in summary_rows(Path(schedule.out), done_records(schedule))}
        if not args.no_ablation:
            ablation = reasoning_only(schedule, seed, out / f"seed{seed}-reasoning-only")
            echo(f"seed {seed}: ablation (reasoning RL only) into {ablation.out}")
            run_schedule(ablation)
            (row,) = summary_rows(Path(ablation.out), done_records(ablation))
            rows["reasoning-only"] = {**row, "stage": "reasoning-only"}
        sample = read_done(Path(schedule.out) / "sample")
        counts = sample["summary"]["counts"] if sample else None
        runs[seed] = {
            "rows": rows,
            "sample": counts,
            "reuse": question_reuse(schedule, counts) if counts else {},
        }
        if args.fixed_questions:
            fixed = fixed_set_reward(schedule, "perception", args.fixed_questions, seed)
            if fixed:
                runs[seed]["fixed_set"] = fixed
    test = base.data.get("test")
    baseline = majority_baseline(load_manifest(test, check_images=False).records) if test else None
    result = {
        "schedule": str(args.schedule),
        "seeds": seeds,
        "majority_baseline": baseline,
        "runs": {str(s): r for s, r in runs.items()},
        "targets": targets(runs, baseline),
        "ablation": ablation_pairs(runs),
        "seconds": round(time.perf_counter() - started, 1),
    }
    table = format_report(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning.md").write_text(table + "\n")
    (out / "learning.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(table)
    print(f"wrote {out / 'learning.md'} and {out / 'learning.json'}")
    return 0


def seeded(base: Schedule, seed: int, out: Path) -> Schedule:
    """The schedule with every random draw seeded by `seed`, written into `out`."""
    # The batch order (the data module's own seed), the GRPO rollout noise (its own
    # seed) and everything else seed_everything reaches.
    extra = (f"--seed_everything={seed}", f"--data.init_args.seed={seed}")
    fit = {}
    for name, stage in base.fit.items():
        args = extra if name == "sft" else (*extra, f"--model.init_args.rollout_seed={seed}")
        fit[name] = dataclasses.replace(stage, args=(*stage.args, *args))
    sample = None if base.sample is None else {**base.sample, "seed": seed}
    return dataclasses.replace(base, out=str(out), fit=fit, sample=sample)


def reasoning_only(schedule: Schedule, seed: int, out: Path) -> Schedule:
    """Reasoning RL alone from the schedule's SFT weights, on the reasoning stage's
    data, for as many steps as perception and reasoning RL took together."""
    reasoning = schedule.fit["reasoning"]
    steps = max_steps(schedule.fit["perception"]) + max_steps(reasoning)
    sft = Path(schedule.out) / "sft"
    manifest = reasoning.manifest or str(Path(schedule.out) / "sample" / f"{reasoning.split}.jsonl")
    stage = FitStage(
        name="reasoning",
        config=reasoning.config,
        args=(*reasoning.args, f"--trainer.max_steps={steps}"),
        start_from=str(sft),
        manifest=manifest,
    )
    return dataclasses.replace(
        schedule,
        out=str(out),
        fit={"reasoning": stage},
        sample=None,
        synth=None,
        stage_names=("reasoning",),
    )


def max_steps(stage: FitStage) -> int:
    """The stage's `--trainer.max_steps` (its last one), else its config's."""
    for arg in reversed(stage.args):
        if arg.startswith("--trainer.max_steps="):
            return int(arg.split("=", 1)[1])
    config = yaml.safe_load(Path(stage.config).read_text())
    return int(config["trainer"]["max_steps"])


def question_reuse(schedule: Schedule, counts: dict[str, int]) -> dict[str, dict[str, float]]:
    """How often an RL stage saw the average question it trained on: its draws (steps x
    prompts per step) over the distinct questions drawn, min(split size, draws), since
    the data module goes through its shuffled split before repeating one. 1.0 means no
    question came back, so a rising reward cannot be answers learnt per question."""
    found = {}
    for name, stage in schedule.fit.items():
        if stage.split is None or not counts.get(stage.split):
            continue
        config = yaml.safe_load(Path(stage.config).read_text())
        draws = max_steps(stage) * int(config["data"]["init_args"]["batch_size"])
        size = counts[stage.split]
        found[name] = {"draws": draws, "questions": size, "seen": draws / min(size, draws)}
    return found


def fixed_set_reward(schedule: Schedule, stage: str, n: int, seed: int) -> dict[str, Any] | None:
    """`stage`'s reward on the first `n` questions of its split, at its start and end
    weights and for the reference responses; None until the stage has finished. The
    rewards and sampling settings are read from the stage's config file (not from
    overrides in its `args`). Cached in the stage folder."""
    out = Path(schedule.out) / stage
    cached = out / "fixed_set.json"
    if cached.exists():
        return json.loads(cached.read_text())
    done = read_done(out)
    if done is None or not done.get("started_from"):
        return None
    from pebr_lightning.evaluation.stage_reward import (
        paired_difference,
        reference_reward,
        sampled_reward,
    )
    from pebr_lightning.models.policy import build_policy
    from pebr_lightning.models.rollout import SamplingConfig
    from pebr_lightning.rewards.combine import load_rewards

    args = yaml.safe_load(Path(schedule.fit[stage].config).read_text())["model"]["init_args"]
    rewards = load_rewards(args["rewards"])
    fields = {f.name for f in dataclasses.fields(SamplingConfig)}
    sampling = SamplingConfig(**{k: v for k, v in args.get("sampling", {}).items() if k in fields})
    records = load_manifest(done["manifest"]).records[:n]
    echo(f"{stage}: reward on {len(records)} fixed questions of {done['manifest']}")
    found: dict[str, Any] = {}
    for side in ("started_from", "weights"):
        built = build_policy(done[side])
        policy = built.model.eval().requires_grad_(False)
        found[side] = sampled_reward(policy, built.processor, records, rewards, sampling, seed=seed)
    ceiling = reference_reward(records, rewards, built.processor)
    diff, se = paired_difference(found["started_from"].per_question, found["weights"].per_question)
    result = {
        "questions": len(records),
        "manifest": done["manifest"],
        "group_size": sampling.group_size,
        "start": found["started_from"].mean,
        "end": found["weights"].mean,
        "difference": diff,
        "standard_error": se,
        "reference": ceiling.mean,
        "per_reward": {
            "start": found["started_from"].per_reward,
            "end": found["weights"].per_reward,
            "reference": ceiling.per_reward,
        },
    }
    cached.write_text(json.dumps(result, indent=2) + "\n")
    return result


def done_records(schedule: Schedule) -> dict[str, dict]:
    out = Path(schedule.out)
    return {n: d for n in schedule.stage_names if (d := read_done(out / n)) is not None}


def targets(runs: dict[int, dict[str, Any]], baseline: float | None) -> list[dict[str, Any]]:
    """The learning issue's targets, each with the figures it was judged on."""

    def per_seed(stage: str, key: str) -> list[float]:
        return [
            r["rows"][stage]["heldout"].get(key, math.nan)
            for r in runs.values()
            if stage in r["rows"]
        ]

    def gains(stage: str) -> list[float]:
        return [
            r["rows"][stage]["end"] - r["rows"][stage]["start"]
            for r in runs.values()
            if stage in r["rows"]
        ]

    def delta(stage: str, before: str, key: str) -> list[float]:
        return [a - b for a, b in zip(per_seed(stage, key), per_seed(before, key), strict=True)]

    found = []

    def check(name: str, values: list[float], ok: bool) -> None:
        found.append({"target": name, "values": values, "met": bool(values) and ok})

    def up(values: list[float], by: float) -> bool:
        """At least `by` up in the mean, and not down in any seed (NaN fails both)."""
        return mean(values) >= by and all(v >= 0 for v in values)

    if baseline is not None:
        lead = [a - baseline for a in per_seed("sft", "accuracy")]
        check("SFT: greedy accuracy >= majority baseline + 0.15 (mean)", lead, mean(lead) >= 0.15)
    values = delta("perception", "sft", "perception/shapes")
    check(
        "Stage 1: held-out right shapes (perception/shapes) +0.05 from sft to perception"
        " (mean), down in no seed",
        values,
        up(values, 0.05),
    )
    values = gains("perception")
    check(
        "Stage 1: perception reward +0.05, first vs last 10% (every seed)",
        values,
        all(v >= 0.05 for v in values),
    )
    values = delta("reasoning", "perception", "accuracy")
    check(
        "Stage 2: greedy accuracy +0.03 over the perception stage's (mean), below it in no seed",
        values,
        up(values, 0.03),
    )
    values = delta("reasoning", "perception", "accuracy/desc_right")
    check(
        "Stage 2: accuracy given a right description (accuracy/desc_right) up from"
        " perception to reasoning (mean)",
        values,
        mean(values) > 0,
    )
    return found


def ablation_pairs(runs: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per seed, held-out greedy accuracy of the two-stage model (after reasoning RL)
    and of reasoning RL alone from the same SFT weights (the paper's ablation); seeds
    without both are left out. Reported beside the targets, not judged."""
    return [
        {
            "seed": seed,
            "two_stage": run["rows"]["reasoning"]["heldout"].get("accuracy", math.nan),
            "reasoning_only": run["rows"]["reasoning-only"]["heldout"].get("accuracy", math.nan),
        }
        for seed, run in runs.items()
        if {"reasoning", "reasoning-only"} <= set(run["rows"])
    ]


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def mean_std(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def format_report(result: dict[str, Any]) -> str:
    runs = list(result["runs"].values())
    n = len(runs)
    titles = " | ".join(t for _, t in HELDOUT)
    lines = [
        f"Mean ± std over {n} seed(s) ({', '.join(map(str, result['seeds']))}); start and end"
        " are the means of the first and last 10% of a stage's logged steps.",
        "",
        f"| stage | training metric | start | end | {titles} |",
        "|---|---|---|---|---|" + "---|" * (len(HELDOUT) - 1),
    ]
    for stage in ROWS:
        rows = [r["rows"][stage] for r in runs if stage in r["rows"]]
        if not rows:
            continue
        cells = [mean_std([row["heldout"].get(k, math.nan) for row in rows]) for k, _ in HELDOUT]
        lines.append(
            f"| {stage} | {rows[0]['metric']} | {mean_std([r['start'] for r in rows])}"
            f" | {mean_std([r['end'] for r in rows])} | {' | '.join(cells)} |"
        )
    if result["majority_baseline"] is not None:
        lines.append(
            f"| (majority answer per type) | | | | {result['majority_baseline']:.3f} |"
            + " |" * (len(HELDOUT) - 1)
        )
    splits = [r["sample"] for r in runs if r["sample"]]
    if splits:
        lines += ["", "Difficulty split per seed: " + "; ".join(json.dumps(s) for s in splits)]
    reuse = [r.get("reuse") or {} for r in runs]
    for stage in ("perception", "reasoning"):
        found = [r[stage] for r in reuse if stage in r]
        if found:
            lines.append(
                f"{stage}: each training question seen "
                + ", ".join(
                    f"{f['seen']:.2f}x ({f['draws']} draws, {f['questions']} in split)"
                    for f in found
                )
                + " per seed"
            )
    lines += ["", "| target | per seed | met |", "|---|---|---|"]
    for t in result["targets"]:  # every target is judged on differences: signed
        values = ", ".join(f"{v:+.3f}" for v in t["values"])
        lines.append(f"| {t['target']} | {values} | {'yes' if t['met'] else 'NO'} |")
    fixed = [(seed, r["fixed_set"]) for seed, r in result["runs"].items() if r.get("fixed_set")]
    if fixed:
        first = fixed[0][1]
        lines += [
            "",
            f"Stage 1 reward on {first['questions']} fixed questions of its split"
            f" ({first['group_size']} completions each), start -> end weights, paired"
            " difference ± standard error: "
            + "; ".join(
                f"seed {seed} {f['start']:.3f} -> {f['end']:.3f}"
                f" ({f['difference']:+.3f} ± {f['standard_error']:.3f})"
                for seed, f in fixed
            )
            + f"; the reference responses score {mean([f['reference'] for _, f in fixed]):.3f}",
        ]
    if result.get("ablation"):
        pairs = "; ".join(
            f"seed {a['seed']} {a['two_stage']:.3f} vs {a['reasoning_only']:.3f}"
            for a in result["ablation"]
        )
        lines += ["", f"Ablation, held-out greedy, two-stage vs reasoning-only: {pairs}"]
    lines.append(f"\n{result['seconds']:.0f} s in all")
    return "\n".join(lines)


def echo(message: str) -> None:
    print(f"[learning] {message}", file=sys.stderr, flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/learning.py",
        description="Run the demo schedule for several seeds plus the reasoning-only"
        " ablation; print mean ± std per stage and metric and which targets hold.",
    )
    p.add_argument("--schedule", default="configs/demo/schedule.yaml", help="schedule YAML")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--out", default="runs/learning", help="output folder")
    p.add_argument("--no-ablation", action="store_true", help="skip reasoning-only RL")
    p.add_argument(
        "--fixed-questions",
        type=int,
        default=256,
        help="Stage 1's reward on this many fixed questions of its split, at its start"
        " and end weights (default: 256; 0: skip)",
    )
    return p


if __name__ == "__main__":
    sys.exit(main())
