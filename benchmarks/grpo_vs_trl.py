"""GRPO steps per second: `GRPOModule` against TRL's `GRPOTrainer` on identical work.

Both sides load the same saved checkpoint (an embedded random-init Qwen2.5-VL, built
locally), read the same prompts and images in the same order (TRL's dataset is laid
out in the order our sampler draws, TRL's shuffling off), score with the same reward
objects (our reward set, wrapped as one TRL reward function), and train with the same
settings: prompts per step, G, max new tokens, temperature, top-p, mu = 1, beta, the
DAPO token-mean loss, clip range 0.2 / 0.3 (no dual clip, which TRL lacks), AdamW
with the same learning rate and weight decay, constant schedule, grad-norm clip 1.0,
one optimizer step per rollout with one micro-batch of B·G sequences, float32.

Equal work: random weights rarely sample EOS, so each side would stop at a different
point. Both are given `min_new_tokens = max_new_tokens` (TRL through
`generation_kwargs`, i.e. transformers' MinNewTokensLengthLogitsProcessor; ours
through `SamplingConfig.min_new_tokens`): EOS is masked until the cap, so every
completion is exactly max_new_tokens long. The table shows the tokens each side
generated per step, counted from its own output. The same vision placeholder
tokens are banned on both sides (TRL's `suppress_tokens`).

Alternating: TRL's trainer runs in a second thread; the two loops hand a turn back
and forth so that exactly one step of one side runs at a time (TRL step, our step,
TRL step, ...). A side's step time runs from getting the turn to handing it back,
so it includes its data loading, logging and bookkeeping. Model loading and set-up
happen before the first turn and are not timed. The first step of each side is
left out as warm-up.

    python benchmarks/grpo_vs_trl.py                      # embedded tiny model, G = 8
    python benchmarks/grpo_vs_trl.py --model medium       # the larger random-init config
    python benchmarks/grpo_vs_trl.py --model medium --device cuda   # both sides on one GPU
    python benchmarks/grpo_vs_trl.py --steps 3 --group-size 2 --max-new-tokens 4 --prompts 1

Results and notes: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIDES = ("trl", "ours")  # the order of turns
MODELS = {"tiny": "tiny-qwen2.5-vl", "medium": "tiny-qwen2.5-vl-m"}
PHASES = ("rollout", "score", "logprobs", "backward", "optimizer")
TARGET_RATIO = 1.5


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    given = sys.argv[1:] if argv is None else argv
    header = describe_run(f"python benchmarks/grpo_vs_trl.py {shlex.join(given)}".rstrip(), args)
    for key, value in header.items():
        print(f"{key}: {value}")
    with tempfile.TemporaryDirectory(prefix="pebr-vs-trl-") as scratch:
        runs = run_both(args, Path(scratch))
    figures = summarize(runs, args)
    print()
    for line in report(figures, args):
        print(line)
    if args.out:
        Path(args.out).write_text(
            json.dumps({**header, "settings": vars(args), **figures, "steps": runs}, indent=2)
            + "\n"
        )
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=8, help="steps per side (first is warm-up)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step, B")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt, G")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.2)
    parser.add_argument("--top-p", type=float, default=0.99)
    parser.add_argument("--beta", type=float, default=0.0, help="KL weight (0: no reference)")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument(
        "--no-share-prompt",
        action="store_true",
        help="ours without the shared-prompt loss forward (for the log in docs/BENCHMARKS.md)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where both sides run (cuda: the same GPU, one side stepping at a time)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", help="also write figures and per-step records to this JSON")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is warm-up)")
    if args.group_size < 2:
        parser.error("--group-size must be >= 2 (GRPO needs a group)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
    return args


def describe_run(command: str, args: argparse.Namespace) -> dict[str, str]:
    import lightning
    import torch
    import transformers
    import trl
    from qlora_memory import describe_machine  # the same machine line as that benchmark

    return {
        "command": command,
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "machine": describe_machine(args.device),
        "versions": (
            f"trl {trl.__version__}, transformers {transformers.__version__}, "
            f"torch {torch.__version__}, lightning {lightning.__version__}"
        ),
        "settings": (
            f"model {args.model} ({MODELS[args.model]}), {args.prompts} prompts x "
            f"G={args.group_size} = {args.prompts * args.group_size} completions of exactly "
            f"{args.max_new_tokens} tokens per step, temperature {args.temperature}, top-p "
            f"{args.top_p}, beta {args.beta}, mu 1, loss dapo, AdamW lr {args.lr}, float32 "
            f"on {args.device}, "
            f"{args.steps} steps per side alternating (first left out)"
        ),
    }


# -- taking turns ------------------------------------------------------------------------


def run_side(side: str, args: argparse.Namespace, folder: str, scratch: str, conn) -> None:
    """A child process: build one side, train it turn by turn, send back its steps."""
    import torch
    from grpo_sides import Turn, build_ours, build_trl, read_data

    if args.threads:
        torch.set_num_threads(args.threads)
    turn = Turn(conn)
    try:
        scratch_path = Path(scratch)
        manifest, records = read_data(scratch_path, args)
        if side == "trl":
            trainer, steps = build_trl(args, Path(folder), records, scratch_path / "trl", turn)
            trainer.train()
        else:
            trainer, module, data, steps = build_ours(
                args, Path(folder), manifest, scratch_path, turn
            )
            trainer.fit(module, datamodule=data)
        conn.send(("finished", steps))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def run_both(args: argparse.Namespace, scratch: Path) -> dict[str, list[dict]]:
    """Both sides in their own process, one step each in turn (TRL first)."""
    from pebr_demo.models.tiny import ensure_tiny_model

    folder = ensure_tiny_model(MODELS[args.model])
    write_data(scratch, args)
    context = multiprocessing.get_context("spawn")
    conns, procs = {}, {}
    for side in SIDES:
        mine, theirs = context.Pipe()
        procs[side] = context.Process(
            target=run_side, args=(side, args, str(folder), str(scratch), theirs), daemon=True
        )
        procs[side].start()
        conns[side] = mine
    results: dict[str, list[dict]] = {}
    try:
        for side in SIDES:  # both set up before the first timed step
            expect(conns[side], side, "ready")
        active = list(SIDES)
        while active:
            for side in list(active):
                conns[side].send("go")
                kind, payload = expect(conns[side], side, "step", "finished")
                if kind == "finished":
                    results[side] = payload
                    active.remove(side)
    finally:
        for proc in procs.values():
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return results


def expect(conn, side: str, *kinds: str) -> tuple[str, Any]:
    kind, payload = conn.recv()
    if kind == "error":
        raise RuntimeError(f"the {side} side failed:\n{payload}")
    if kind not in kinds:
        raise RuntimeError(f"the {side} side sent {kind!r}, expected one of {kinds}")
    return kind, payload


# -- the data and the rewards, shared --------------------------------------------------------


def write_data(scratch: Path, args: argparse.Namespace) -> Path:
    """The synthetic manifest both sides read (B prompts for each step)."""
    from pebr_demo.data.synth import write_dataset

    return write_dataset(scratch / "data", n=args.prompts * args.steps, seed=0)


# -- figures -----------------------------------------------------------------------------------


def summarize(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict[str, Any]:
    sides = {}
    for side, steps in runs.items():
        measured = steps[1:]
        if not measured:
            raise RuntimeError(f"{side}: only {len(steps)} step(s) ran; nothing to measure")
        seconds = [s["seconds"] for s in measured]
        median = statistics.median(seconds)
        rollout = sum(s["rollout_seconds"] for s in measured)
        tokens = sum(s["tokens"] for s in measured)
        sides[side] = {
            "steps": len(measured),
            "step_s_median": median,
            "step_s_min": min(seconds),
            "step_s_max": max(seconds),
            "samples_per_s": measured[0]["samples"] / median,
            "rollout_tokens_per_s": tokens / rollout if rollout else None,
            "rollout_s_median": statistics.median(s["rollout_seconds"] for s in measured),
            "tokens_per_step": sorted({s["tokens"] for s in measured}),
        }
    ours = runs["ours"][1:]
    sides["ours"]["phases"] = {
        name: statistics.median(s["phases"].get(name, 0.0) for s in ours) for name in PHASES
    }
    sides["ours"]["skipped_steps"] = sum(s["skipped"] for s in ours)
    ratio = sides["ours"]["samples_per_s"] / sides["trl"]["samples_per_s"]
    expected = args.prompts * args.group_size * args.max_new_tokens
    equal = all(sides[s]["tokens_per_step"] == [expected] for s in sides)
    return {"sides": sides, "ratio": ratio, "equal_work": equal, "target_ratio": TARGET_RATIO}


def report(figures: dict[str, Any], args: argparse.Namespace) -> list[str]:
    sides = figures["sides"]
    lines = [
        "| side | samples/s | rollout tokens/s | step s (median) | step s (min-max) "
        "| tokens/step |",
        "|---|---|---|---|---|---|",
    ]
    for side, label in (("trl", "TRL GRPOTrainer"), ("ours", "pebr GRPOModule")):
        f = sides[side]
        tok = f["rollout_tokens_per_s"]
        lines.append(
            f"| {label} | {f['samples_per_s']:.2f} | {'-' if tok is None else f'{tok:.0f}'} "
            f"| {f['step_s_median']:.3f} | {f['step_s_min']:.3f}-{f['step_s_max']:.3f} "
            f"| {', '.join(map(str, f['tokens_per_step']))} |"
        )
    lines.append("")
    lines.append(
        f"ratio (pebr / TRL samples/s): {figures['ratio']:.2f}x; target >= {TARGET_RATIO}x: "
        f"{'met' if figures['ratio'] >= TARGET_RATIO else 'NOT met'}"
    )
    ours = sides["ours"]
    lines.append(
        f"equal work: {'yes' if figures['equal_work'] else 'NO'} (every step generated "
        f"{args.prompts}x{args.group_size}x{args.max_new_tokens} tokens on both sides); "
        f"our steps skipped for lack of reward spread: {ours['skipped_steps']:.0f}"
    )
    lines.append(f"TRL generate(): {sides['trl']['rollout_s_median']:.3f} s per step (median)")
    lines.append("")
    lines.append("| our phase | s / step (median) | share of step |")
    lines.append("|---|---|---|")
    for name, seconds in ours["phases"].items():
        lines.append(f"| {name} | {seconds:.4f} | {seconds / ours['step_s_median']:.0%} |")
    other = ours["step_s_median"] - sum(ours["phases"].values())
    lines.append(f"| (outside phases) | {other:.4f} | {other / ours['step_s_median']:.0%} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
