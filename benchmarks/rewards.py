"""CLIP-score throughput on CPU: batched vs one by one, with and without image de-duplication.

A GRPO rollout batch holds G completions per image. This scores such a batch with the
embedded tiny CLIP (`ClipScoreReward()`, the demo's default) and prints the
descriptions scored per second for batch sizes 1 ("one by one"), 32 and 64, each with
the reward's de-duplication (each distinct image encoded once) and without it (every
completion's image encoded again). Each figure is the median of several calls after one
warm-up call (which loads the model). Results and notes: docs/BENCHMARKS.md.

    python benchmarks/rewards.py            # 16 images x G=8, 5 repeats
    python benchmarks/rewards.py --quick    # 8 images x G=8, 3 repeats
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone

BATCH_SIZES = (1, 32, 64)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import open_clip
    import torch

    from pebr_demo.models.tiny_clip import ensure_tiny_clip

    if args.threads:
        torch.set_num_threads(args.threads)
    given = sys.argv[1:] if argv is None else argv
    print(f"command: python benchmarks/rewards.py {shlex.join(given)}".rstrip())
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__} "
        f"threads={torch.get_num_threads()}, open_clip {open_clip.__version__}, no GPU used"
    )
    started = time.perf_counter()
    ensure_tiny_clip()
    print(f"tiny CLIP ready in {time.perf_counter() - started:.1f} s")
    completions, samples, images = make_batch(args.images, args.group)
    n = len(completions)
    print(
        f"batch: {args.images} images x G={args.group} = {n} descriptions, "
        f"median of {args.repeats} calls"
    )
    print()
    rows = []
    for batch_size in BATCH_SIZES:
        for dedup in (True, False):
            seconds = time_reward(batch_size, dedup, completions, samples, images, args.repeats)
            rows.append((batch_size, dedup, seconds))
    baseline = next(s for b, d, s in rows if b == 1 and not d)
    print("| batch size | de-dup | images encoded | seconds / call | descriptions/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for batch_size, dedup, seconds in rows:
        label = "1 (one by one)" if batch_size == 1 else str(batch_size)
        encoded = args.images if dedup else n
        print(
            f"| {label} | {'yes' if dedup else 'no'} | {encoded} | {seconds:.3f} | "
            f"{n / seconds:.0f} | {baseline / seconds:.1f}x |"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="8 images, 3 repeats (for tests)")
    parser.add_argument("--images", type=int, default=None, help="distinct images (default 16)")
    parser.add_argument("--group", type=int, default=8, help="completions per image, G")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 5)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args(argv)
    if args.images is None:
        args.images = 8 if args.quick else 16
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    return args


def make_batch(n_images: int, group: int) -> tuple[list[str], list[dict], list]:
    """G responses per synthetic image: the right description and G-1 with one thing wrong."""
    from pebr_demo.data.synth import synth_records
    from pebr_demo.models.tiny_clip import perturb_description
    from pebr_lightning.data.prompts import render_response

    rng = random.Random(0)
    completions, samples, images = [], [], []
    for record, image in synth_records(n_images, seed=1):
        for g in range(group):
            if g == 0:
                description = record["description"]
            else:
                description = perturb_description(record["shapes"], rng)
            completions.append(render_response(record["answer"], description))
            samples.append(record)
            images.append(image)
    return completions, samples, images


def time_reward(
    batch_size: int,
    dedup: bool,
    completions: list[str],
    samples: list[dict],
    images: list,
    repeats: int,
) -> float:
    """Median seconds of one reward call on the whole batch (after a warm-up call)."""
    from pebr_lightning.rewards.clip_score import ClipScoreReward

    if not dedup:  # a distinct image path per completion: nothing is shared
        samples = [{**s, "image": f"{s['image']}#{i}"} for i, s in enumerate(samples)]
    reward = ClipScoreReward(batch_size=batch_size)
    reward(completions=completions, samples=samples, images=images)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        reward(completions=completions, samples=samples, images=images)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


if __name__ == "__main__":
    main()
