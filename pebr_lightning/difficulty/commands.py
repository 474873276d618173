"""`pebr sample`: difficulty sampling from the command line.

    pebr sample --model runs/sft/.../last.hf --manifest data/train/manifest.jsonl \
        --out runs/sample [--k 8 --temperature 1.2 --top-p 0.99 --easy-min 8 --hard-max 0]
        [--device auto --dtype auto]

Runs on the GPU in bfloat16 when there is one, else on the CPU in float32
(evaluation/devices.py), with a progress bar on stderr. Re-running the same command
after a crash continues where it stopped.
"""

from __future__ import annotations

import argparse
import os

from pebr_lightning.argtypes import positive_int
from pebr_lightning.difficulty.sampler import SampleSettings, sample_difficulty
from pebr_lightning.difficulty.split import format_summary
from pebr_lightning.evaluation import devices
from pebr_lightning.evaluation.commands import add_engine_arguments, engine_config


def main(argv: list[str]) -> int:
    """Run `pebr sample <argv>` and return the exit code."""
    args = _parser().parse_args(argv)
    device = devices.resolve_device(args.device)
    dtype = devices.resolve_dtype(args.dtype, device)
    settings = SampleSettings(
        model=args.model,
        manifest=os.path.abspath(args.manifest),
        k=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        easy_min=args.easy_min,
        hard_max=args.hard_max,
        seed=args.seed,
        limit=args.limit,
    )
    print(f"running on {device} in {dtype}", flush=True)
    summary = sample_difficulty(
        settings,
        args.out,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        device=device,
        dtype=dtype,
        rollout=engine_config(args),
    )
    print(format_summary(summary))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pebr sample",
        description="Roll k responses per question, grade them with the accuracy reward and "
        "write OUT/easy.jsonl, OUT/medium.jsonl, OUT/hard.jsonl and OUT/summary.json. "
        "Resumable: run the same command again after an interruption.",
    )
    parser.add_argument("--model", required=True, help="checkpoint folder or model name")
    parser.add_argument("--manifest", required=True, help="questions to sort")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--k", type=positive_int, default=8, help="rollouts per question (default: 8)"
    )
    parser.add_argument("--temperature", type=float, default=1.2, help="default: 1.2")
    parser.add_argument("--top-p", type=float, default=0.99, help="default: 0.99")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="default: 256")
    parser.add_argument(
        "--easy-min", type=int, default=None, help="correct rollouts for Easy (default: k)"
    )
    parser.add_argument(
        "--hard-max", type=int, default=0, help="at most this many correct = Hard (default: 0)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="questions per batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="only the first N questions"
    )
    devices.add_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_engine_arguments(parser)
    return parser
