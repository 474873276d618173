"""The `pebr eval` command: greedy accuracy of a model on a manifest, by question type.

    pebr eval --model tiny-qwen2.5-vl --manifest data/shapes-val/manifest.jsonl --out eval/

Runs on the GPU in bfloat16 when there is one, else on the CPU in float32
(`--device`, `--dtype`; evaluation/devices.py). Writes OUT/predictions.jsonl and
OUT/metrics.json (which records the device and dtype) and prints a table. `main` lets
`PebrError` propagate: the top-level `pebr` command prints it as `error: <message>`
and exits with its exit code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from pebr_lightning.argtypes import positive_int
from pebr_lightning.engines import RolloutConfig
from pebr_lightning.errors import PebrError
from pebr_lightning.evaluation import devices
from pebr_lightning.evaluation.greedy import evaluate


def main(argv: list[str]) -> int:
    """Run `pebr eval <argv>` and return the exit code."""
    args = _parser().parse_args(argv)
    device = devices.resolve_device(args.device)
    dtype = devices.resolve_dtype(args.dtype, device)
    rollout = engine_config(args)
    where = f"through the {args.engine} engine" if args.engine != "hf" else ""
    print(f"running on {device} in {dtype} {where}".rstrip(), flush=True)
    values = evaluate(
        args.model,
        args.manifest,
        args.out,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        progress=not args.no_progress,
        device=device,
        dtype=dtype,
        samples=args.samples,
        temperature=args.temperature,
        rollout=rollout,
    )
    print(format_table(values))
    out = Path(args.out)
    print(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}")
    return 0


def format_table(values: dict[str, float]) -> str:
    """Type, n and accuracy per question type, then the overall line, then the other
    overall figures: sampled accuracy, pass@k, the perception shares, and accuracy given
    a right / a wrong description with how many records each is over."""
    types = sorted(k.split("/", 1)[1] for k in values if k.startswith("n/"))
    extra = [
        (key, "", values[key])
        for key in sorted(values)
        if key == "sampled_accuracy"
        or key.startswith("pass@")
        or (key.startswith("perception/") and key.count("/") == 1 and key not in _COUNTS)
    ]
    extra += [
        (f"accuracy/{side}", str(int(values[f"perception/{side}_n"])), values[f"accuracy/{side}"])
        for side in ("desc_right", "desc_wrong")
        if f"accuracy/{side}" in values
    ]
    width = max([len("overall"), len("type"), *map(len, types), *(len(k) for k, _, _ in extra)])
    lines = [f"{'type':<{width}}  {'n':>6}  accuracy"]
    for name in types:
        lines.append(
            f"{name:<{width}}  {int(values[f'n/{name}']):>6}  {values[f'accuracy/{name}']:.4f}"
        )
    overall = f"{'overall':<{width}}  {int(values['n']):>6}  {values['accuracy']:.4f}"
    if values.get("ungraded"):
        overall += f"  ({int(values['ungraded'])} ungraded, counted wrong)"
    lines.append(overall)
    lines += [f"{key:<{width}}  {n:>6}  {value:.4f}" for key, n, value in extra]
    return "\n".join(lines)


_COUNTS = {"perception/n", "perception/desc_right_n", "perception/desc_wrong_n"}
"""Record counts among the perception keys: shown as n beside a figure, not as one."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pebr eval",
        description="Answer every question of a manifest greedily, grade the final answers "
        "with the accuracy reward, and write OUT/predictions.jsonl and OUT/metrics.json.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="tiny-qwen2.5-vl, a checkpoint folder, a LoRA adapter folder (.hf) or a hub id",
    )
    parser.add_argument(
        "--manifest",
        required=True,
        metavar="MANIFEST",
        help="a .jsonl manifest, a .parquet file, a dataset folder[@split] or owner/name[@split]",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="questions per batch (default: 16)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=256,
        help="answer length cap in tokens (default: 256)",
    )
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="evaluate only the first N records"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=0,
        metavar="K",
        help="also draw K sampled answers per question: sampled accuracy and pass@K (default: 0)",
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="temperature of those answers (default: 1.0)"
    )
    devices.add_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_engine_arguments(parser)
    return parser


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--engine and its settings (engines/; docs/rollout.md)."""
    parser.add_argument(
        "--engine",
        default="hf",
        metavar="NAME",
        help="what decodes: an installed engine's name (hf: the model itself, the default; "
        "vllm: a vLLM worker) or the class path of an engine's settings class",
    )
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one setting of the engine, e.g. --engine-arg python=.vllm-env/bin/python "
        "(repeatable; VALUE is read as YAML: 8, 1.5, true, null, text)",
    )
    for former in FORMER_FLAGS:  # replaced on 2026-12-06: a clear error, not "unrecognized"
        parser.add_argument(former, help=argparse.SUPPRESS)


FORMER_FLAGS = {"--vllm-python": "python", "--vllm-url": "url", "--vllm-dtype": "dtype"}
"""The vLLM flags before 2026-12-06 -> the vllm engine's setting each one set."""


def engine_config(args: argparse.Namespace) -> RolloutConfig:
    """The RolloutConfig the engine arguments describe; the engine is looked up and its
    settings checked here, so a mistake is one clear error before any model loads."""
    for flag, key in FORMER_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            raise PebrError(f"{flag} was replaced: write --engine vllm --engine-arg {key}={value}")
    init_args = {}
    for item in args.engine_arg:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise PebrError(f"--engine-arg {item!r}: write KEY=VALUE, e.g. dtype=bfloat16")
        init_args[key.strip()] = yaml.safe_load(text) if text else ""
    field = "class_path" if "." in args.engine or ":" in args.engine else "name"
    config = RolloutConfig(**{field: args.engine}, init_args=init_args)
    config.settings()
    return config
