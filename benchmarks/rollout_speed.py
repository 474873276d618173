"""GRPO rollout speed against the memory-bandwidth limit: tokens/s of our decode loop.

Decoding one token for every sequence of a batch reads every weight of the language
model once (plus the KV cache so far), so a decode step cannot take less than
(bytes read) / (memory bandwidth). This script loads a random-weight checkpoint of
the Qwen2.5-VL-7B architecture (benchmarks/qlora_memory.py writes it) through the
project's loader, in 4-bit NF4 and in bfloat16, runs the GRPO rollout
(`engines.hf.sample_group`, what `GRPOModule.rollout` calls) for B prompts x G
completions of exactly `--max-new-tokens` tokens, and prints per precision:

- rollout tokens/s (all B·G completions) and seconds per decode step;
- the bytes a decode step must read: the language model's weights as stored (4-bit
  weights count their packed bytes plus quantization constants; the input embedding
  table is left out, since a step reads only B·G of its rows) plus the mean KV cache;
- the limit: those bytes / the device's bandwidth, measured here with a large
  device-to-device copy (bytes read + written per second, best of 5) unless
  `--bandwidth-gbs` is given;
- the ratio limit / measured: 1.0 would be a decode loop bound only by memory traffic.

The prefill (image features and prompt, up to the first token) is timed inside each
rollout (`Rollout.first_token_seconds`) and left out of the per-step figures. The
first rollout of each precision is warm-up.

    python benchmarks/rollout_speed.py --size 7b --checkpoint /tmp/pebr-7b   # GPU
    python benchmarks/rollout_speed.py --size small --device cpu --max-new-tokens 8

Results and notes: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from qlora_memory import SIZES, describe_machine, ensure_checkpoint

PRECISIONS = ("4bit", "bf16")
GIB = 2**30


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    header = {
        "command": f"python benchmarks/rollout_speed.py {shlex.join(given)}".rstrip(),
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "machine": describe_machine(args.device),
        "versions": versions(),
        "settings": (
            f"{args.size} model, {args.prompts} prompts x G={args.group_size} = "
            f"{args.prompts * args.group_size} completions of exactly {args.max_new_tokens} "
            f"tokens, {args.repeats} rollouts per precision (first left out)"
        ),
    }
    for key, value in header.items():
        print(f"{key}: {value}")
    folder, _ = ensure_checkpoint(args.checkpoint, args.size, args.device)
    bandwidth, measured = args.bandwidth_gbs, False
    if bandwidth is None:
        bandwidth, measured = copy_bandwidth_gbs(args.device), True
    print(f"bandwidth: {bandwidth:.0f} GB/s ({'measured copy' if measured else 'given'})")
    rows = [measure(precision, folder, args, bandwidth) for precision in args.precisions]
    print()
    for line in table(rows):
        print(line)
    if args.out:
        result = {
            **header,
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "bandwidth_gbs": bandwidth,
            "bandwidth_measured": measured,
            "precisions": rows,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda if available",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="folder of the random-weight checkpoint; written there first if missing",
    )
    parser.add_argument(
        "--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS), metavar="P"
    )
    parser.add_argument("--prompts", type=int, default=2, help="prompts per rollout, B")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt, G")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="rollouts per precision")
    parser.add_argument(
        "--bandwidth-gbs", type=float, default=None, help="memory bandwidth; default: measured"
    )
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu)")
    if args.size == "7b" and args.device == "cpu":
        parser.error("--size 7b --device cpu would take hours; use --size small on CPU")
    if args.repeats < 2:
        parser.error("--repeats must be >= 2 (the first rollout is warm-up)")
    if args.max_new_tokens < 2:
        parser.error("--max-new-tokens must be >= 2 (one prefill token, then decode steps)")
    return args


def versions() -> str:
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = "not installed"
    return f"torch {torch.__version__}, transformers {transformers.__version__}, bnb {bnb}"


def copy_bandwidth_gbs(device: str, gib: float | None = None) -> float:
    """Best of 5 large copies: (bytes read + bytes written) / seconds, in GB/s."""
    size = int((gib if gib is not None else (2.0 if device == "cuda" else 0.25)) * GIB)
    src = torch.empty(size, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):  # the first is warm-up
        sync(device)
        started = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - started)
    del src, dst
    return 2 * size / best / 1e9


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(precision: str, folder: Path, args: argparse.Namespace, bandwidth: float) -> dict:
    """Load in `precision`, run `args.repeats` rollouts, return the figures of this row."""
    from pebr_lightning.models.policy import LoraConfig, QuantizationConfig, build_policy

    four_bit = precision == "4bit"
    started = time.perf_counter()
    # As under the Trainer (configure_model runs with the device as default): weights
    # are created on the device, and 4-bit ones quantized there. build_policy refuses
    # 4-bit without LoRA (it is for training), so the 4-bit row decodes through a
    # fresh adapter, as a QLoRA run's rollout does.
    with torch.device(args.device):
        policy = build_policy(
            str(folder),
            lora=LoraConfig(r=16, alpha=32, dropout=0.0) if four_bit else None,
            quantization=QuantizationConfig(bits=4, compute_dtype="bfloat16") if four_bit else None,
            dtype="bfloat16",
        )
    model = policy.model
    model.eval()
    load_seconds = time.perf_counter() - started
    weight_bytes = decode_weight_bytes(model)
    prompt = prompt_batch(policy.processor, args)
    runs = [rollout_once(policy, prompt, args) for _ in range(args.repeats)]
    measured = runs[1:]
    # Each rollout times its own first token (the prefill; engines/hf.py syncs the device
    # there), so the decode is the rest of that same rollout: never negative, however
    # loaded the machine (a prefill timed by a run of its own could take longer than a
    # whole rollout and make the difference negative).
    decode_s = statistics.median(r["seconds"] - r["prefill_seconds"] for r in measured)
    steps = args.max_new_tokens - 1  # the first token comes from the prefill
    step_s = decode_s / steps if decode_s > 0 else math.nan
    kv = kv_bytes_per_step(model.config, args, prompt["input_ids"].shape[1])
    limit_s = (weight_bytes + kv) / (bandwidth * 1e9)
    rows = args.prompts * args.group_size
    row = {
        "precision": precision,
        "load_seconds": load_seconds,
        "prefill_seconds": statistics.median(r["prefill_seconds"] for r in measured),
        "decode_seconds": decode_s,
        "tokens_per_s": rows
        * args.max_new_tokens
        / statistics.median(r["seconds"] for r in measured),
        "decode_step_ms": 1e3 * step_s,
        "weight_bytes": weight_bytes,
        "kv_bytes_mean": kv,
        "limit_step_ms": 1e3 * limit_s,
        "ratio_of_limit": limit_s / step_s if step_s > 0 else math.nan,
        "peak_gib": (torch.cuda.max_memory_allocated() / GIB if args.device == "cuda" else None),
        "tokens_generated": [r["tokens"] for r in runs],
    }
    print(
        f"{precision}: loaded in {load_seconds:.0f} s; {row['tokens_per_s']:.0f} tokens/s, "
        f"{row['decode_step_ms']:.2f} ms per decode step, limit {row['limit_step_ms']:.2f} ms "
        f"({weight_bytes / GIB:.2f} GiB weights + {kv / GIB:.3f} GiB KV per step)"
    )
    del policy, model
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of language-model weights one decode step reads (input embeddings left out)."""
    total = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if ".visual." in f".{name}" or "embed_tokens" in name:
            continue
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:  # 4-bit: absmax (and its own quantization constants)
            for part in (getattr(state, "absmax", None), getattr(state, "code", None)):
                if part is not None:
                    total += part.numel() * part.element_size()
            nested = getattr(state, "state2", None)
            if nested is not None and getattr(nested, "absmax", None) is not None:
                total += nested.absmax.numel() * nested.absmax.element_size()
    return total


def kv_bytes_per_step(config: Any, args: argparse.Namespace, prompt_tokens: int) -> float:
    """Mean bytes of K and V cache a decode step reads, over the decode (bfloat16 cache)."""
    text = getattr(config, "text_config", config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2  # K+V, bf16
    mean_length = prompt_tokens + args.max_new_tokens / 2
    return per_token * mean_length * args.prompts * args.group_size


def prompt_batch(processor: Any, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """B synthetic shapes prompts, left-padded, as GRPO's loader gives them."""
    import tempfile

    from pebr_demo.data.synth import write_dataset
    from pebr_lightning.data.collate import PromptCollator, RecordDataset, prompt_inputs
    from pebr_lightning.data.manifest import load_manifest
    from pebr_lightning.data.prompts import PromptConfig

    with tempfile.TemporaryDirectory(prefix="pebr-rollout-") as scratch:
        manifest = write_dataset(Path(scratch) / "data", n=args.prompts, seed=0)
        dataset = RecordDataset(load_manifest(manifest).records)
        batch = PromptCollator(processor, PromptConfig())([dataset[i] for i in range(len(dataset))])
    return {k: v.to(args.device) for k, v in prompt_inputs(batch).items()}


def rollout_once(policy: Any, prompt: dict[str, torch.Tensor], args: argparse.Namespace) -> dict:
    """One full-length rollout: its seconds, and those to its first token (the prefill)."""
    from pebr_lightning.engines.hf import sample_group
    from pebr_lightning.models.families import family_of
    from pebr_lightning.models.policy import unwrap
    from pebr_lightning.models.rollout import SamplingConfig, eos_token_ids

    tokenizer = policy.processor.tokenizer
    sampling = SamplingConfig(
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,  # every completion full length: equal work
    )
    base = unwrap(policy.model)
    eos, pad = eos_token_ids(tokenizer, family_of(base.config).end_tokens), tokenizer.pad_token_id
    with torch.no_grad():
        sync(args.device)
        started = time.perf_counter()
        rollout = sample_group(policy.model, base, prompt, sampling, eos, pad)
        sync(args.device)
        seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "prefill_seconds": rollout.first_token_seconds,
        "tokens": int(rollout.completion_mask.sum()),
    }


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| precision | tokens/s | ms / decode step | weights read GiB | limit ms / step "
        "| measured vs limit | prefill s | load s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['precision']} | {r['tokens_per_s']:.0f} | {r['decode_step_ms']:.2f} "
            f"| {r['weight_bytes'] / GIB:.2f} | {r['limit_step_ms']:.2f} "
            f"| {r['ratio_of_limit']:.2f} | {r['prefill_seconds']:.2f} | {r['load_seconds']:.0f} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
