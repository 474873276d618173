"""Decoding with the KV cache reserved after the prefill against the growing one.

`engines.hf.sample_group` (GRPO rollouts, `pebr eval`, `pebr sample`) writes each
decode step's keys and values into room reserved after the prefill
(models/kv_cache.py). transformers' own DynamicLayer instead grows by `torch.cat`,
copying the whole cache every step. This script decodes the same prompts both ways,
alternating rounds, checks that both give the same completions and log-probs to the
last bit, and prints seconds per rollout and tokens/s of each.

The model is a folder (e.g. the demo SFT's `last.hf`, which ends its answers; random
weights rarely say EOS, so every row runs to the limit) or an embedded name. Prompts
are the synthetic shapes set. The first round of each side is warm-up.

    python benchmarks/decode_cache.py                 # the tiny random-init model
    python benchmarks/decode_cache.py --model DIR     # e.g. the demo SFT's last.hf

Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-qwen2.5-vl")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)

    from pebr_demo.data.synth import write_dataset
    from pebr_lightning.data.collate import PromptCollator, RecordDataset, prompt_inputs
    from pebr_lightning.data.manifest import load_manifest
    from pebr_lightning.data.prompts import PromptConfig
    from pebr_lightning.engines import hf
    from pebr_lightning.models.policy import build_policy, unwrap
    from pebr_lightning.models.rollout import SamplingConfig, eos_token_ids

    built = build_policy(args.model)
    model, processor = built.model.eval().requires_grad_(False), built.processor
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp), args.prompts, seed=1)
        dataset = RecordDataset(load_manifest(Path(tmp) / "manifest.jsonl").records)
        batch = prompt_inputs(PromptCollator(processor, PromptConfig())(list(dataset)))
    sampling = SamplingConfig(
        group_size=args.group_size,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
    )
    rows = args.prompts * args.group_size
    tokenizer = processor.tokenizer
    family_end = hf.family_of(unwrap(model).config).end_tokens
    reserve = hf.reserve

    def rollout(reserved: bool):
        hf.reserve = reserve if reserved else (lambda cache, tokens: cache)
        try:
            start = time.perf_counter()
            out = hf.sample_group(
                model,
                unwrap(model),
                batch,
                sampling,
                eos_token_ids(tokenizer, family_end),
                tokenizer.pad_token_id,
                keys=torch.arange(rows) * 7919 + 1,
            )
            return out, time.perf_counter() - start
        finally:
            hf.reserve = reserve

    times: dict[str, list[float]] = {"growing (torch.cat)": [], "reserved": []}
    outs = {}
    for i in range(args.rounds + 1):
        for name in times:
            out, seconds = rollout(name == "reserved")
            outs[name] = out
            if i:  # round 0 is warm-up
                times[name].append(seconds)
    a, b = outs.values()
    same = all(
        torch.equal(x, y)
        for x, y in (
            (a.completion_ids, b.completion_ids),
            (a.completion_mask, b.completion_mask),
            (a.logprobs, b.logprobs),
        )
    )
    tokens = int(a.completion_mask.sum())
    given = sys.argv[1:] if argv is None else argv
    print(f"command: python benchmarks/decode_cache.py {shlex.join(given)}".rstrip())
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(
        f"model {args.model}; {args.prompts} prompts x G={args.group_size} = {rows} rows, "
        f"T={args.temperature}, at most {args.max_new_tokens} new tokens "
        f"({tokens} generated, longest {a.completion_ids.shape[1]}); "
        f"torch threads {torch.get_num_threads()}; {args.rounds} rounds after a warm-up"
    )
    print(f"same completions and log-probs, bit for bit: {'yes' if same else 'NO'}")
    print()
    print("| KV cache | s per rollout (median) | min - max | tokens/s |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"| {name} | {median:.2f} | {min(values):.2f} - {max(values):.2f} | "
            f"{tokens / median:,.0f} |"
        )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
