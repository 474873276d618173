"""`pebr schedule`: the paper's four steps as one resumable command.

    pebr schedule --config configs/demo/schedule.yaml [--stages sft,sample] [--out DIR]

Ends with a table (stage, training metric at start and end, held-out accuracy greedy
and sampled, description count and colours) written to OUT/report.md and a picture
of every reward component and the KL per RL stage, OUT/rewards.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.errors import PebrError
from pebr_lightning.schedule.config import ORDER, load_schedule
from pebr_lightning.schedule.curves import plot_curves
from pebr_lightning.schedule.report import format_table, majority_baseline, summary_rows
from pebr_lightning.schedule.runner import read_done, run_schedule


def main(argv: list[str]) -> int:
    """Run `pebr schedule <argv>` and return the exit code."""
    args = _parser().parse_args(argv)
    schedule = load_schedule(args.config)
    if args.out:
        schedule = dataclasses.replace(schedule, out=args.out)
    stages = None
    if args.stages:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in stages if s not in ORDER]
        if unknown:
            raise PebrError(f"--stages: unknown {', '.join(unknown)} (expected {', '.join(ORDER)})")
    run_schedule(schedule, stages)
    print(report(schedule.out, schedule.data.get("test")))
    return 0


def report(out: str | Path, test_manifest: str | None) -> str:
    """Write OUT/report.md, OUT/report.json and OUT/rewards.png; return the table."""
    out = Path(out)
    done = {name: d for name in ORDER if (d := read_done(out / name)) is not None}
    rows = summary_rows(out, done)
    baseline = None
    if test_manifest and Path(test_manifest).exists():
        baseline = majority_baseline(load_manifest(test_manifest, check_images=False).records)
    table = format_table(rows, baseline)
    picture = plot_curves(out, out / "rewards.png")
    (out / "report.md").write_text(table + "\n")
    (out / "report.json").write_text(
        json.dumps({"rows": rows, "majority_baseline": baseline}, indent=2) + "\n"
    )
    lines = [table, f"report: {out / 'report.md'}"]
    if picture is not None:
        lines.append(f"reward curves: {picture}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pebr schedule",
        description="Run SFT -> difficulty sampling -> perception RL -> reasoning RL, each "
        "stage in OUT/<stage>/ starting from the previous stage's weights. Finished stages "
        "are skipped; an interrupted stage resumes from its last checkpoint.",
    )
    parser.add_argument("--config", required=True, help="schedule YAML (configs/schedule.yaml)")
    parser.add_argument(
        "--stages", default=None, help=f"comma-separated subset of {','.join(ORDER)}"
    )
    parser.add_argument("--out", default=None, help="output folder (overrides `out` in the file)")
    return parser
