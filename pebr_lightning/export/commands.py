"""The `pebr export` command: a training checkpoint -> PEFT adapter + merged HF model.

    pebr export runs/sft/lightning_logs/version_0/checkpoints/last.ckpt --out export/sft

Writes DIR/adapter/ (LoRA runs) and DIR/merged/; docs/export.md shows how to load
them in transformers, peft and vLLM. `main` lets `PebrError` propagate: the top-level
`pebr` command prints it as `error: <message>` and exits with its exit code.
"""

from __future__ import annotations

import argparse

from pebr_lightning.export.export import DTYPES, export_checkpoint


def main(argv: list[str]) -> int:
    """Run `pebr export <argv>` and return the exit code."""
    args = _parser().parse_args(argv)
    result = export_checkpoint(
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        merge=not args.no_merge,
        module=args.module,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
    )
    if result.adapter is not None:
        print(f"wrote {result.adapter} (LoRA adapter, PEFT format, with the processor)")
    if result.merged is not None:
        what = "LoRA adapter merged into its base" if result.lora else "full fine-tuned weights"
        print(f"wrote {result.merged} ({result.kind} policy, {what}, {result.dtype})")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pebr export",
        description="Turn a Lightning checkpoint of any stage into DIR/adapter (the LoRA "
        "adapter in PEFT format; LoRA runs only) and DIR/merged (a plain Hugging Face "
        "model folder with the adapter merged in, loadable by transformers and vLLM). "
        "A QLoRA run is exported unquantized.",
    )
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a .ckpt file, or a sharded checkpoint folder (FSDP2, save_distributed_checkpoint)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="dtype of the merged weights (default: the run's dtype, else a QLoRA run's "
        "compute dtype, else bfloat16)",
    )
    parser.add_argument(
        "--no-merge", action="store_true", help="write the adapter only, not DIR/merged"
    )
    parser.add_argument(
        "--module",
        choices=("sft", "grpo"),
        default=None,
        help="the stage, for checkpoints that record no class path (default: grpo when "
        "the hyper-parameters name rewards, else sft)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DIR if it exists and is not empty"
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the base model's own Python code run (needed if the run set it)",
    )
    return parser
