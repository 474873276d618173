"""The `pebr data` subcommands: make the synthetic dataset, check a manifest.

    pebr data synth --out data/shapes --n 2000 --seed 0
    pebr data validate data/shapes/manifest.jsonl [--skip-invalid]

`main` lets `PebrError` propagate: the top-level `pebr` command prints it as
`error: <message>` and exits with its exit code.
"""

from __future__ import annotations

import argparse

from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.data.synth import write_dataset


def main(argv: list[str]) -> int:
    """Run `pebr data <argv>` and return the exit code."""
    args = _parser().parse_args(argv)
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pebr data", description="Make or check the data a PeBR stage trains on."
    )
    commands = parser.add_subparsers(title="commands", metavar="{synth,validate}", required=True)

    synth = commands.add_parser(
        "synth",
        help="write the synthetic shapes dataset (images + manifest.jsonl)",
        description="Write DIR/images/*.png and DIR/manifest.jsonl; the same seed "
        "gives byte-identical files.",
    )
    synth.add_argument("--out", required=True, metavar="DIR", help="output folder")
    synth.add_argument(
        "--n", type=_positive_int, default=2000, help="number of records (default: %(default)s)"
    )
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    synth.set_defaults(run=_synth)

    validate = commands.add_parser(
        "validate",
        help="check a manifest and every image it points to",
        description="Check every line of a JSONL manifest against the schema in "
        "docs/data.md and open every image it points to.",
    )
    validate.add_argument("manifest", metavar="MANIFEST", help="path to a .jsonl manifest")
    validate.add_argument(
        "--skip-invalid",
        action="store_true",
        help="report invalid records and count them as skipped instead of failing",
    )
    validate.add_argument(
        "--no-check-images",
        action="store_true",
        help="check the manifest lines only, without opening the images",
    )
    validate.set_defaults(run=_validate)
    return parser


def _synth(args: argparse.Namespace) -> int:
    manifest = write_dataset(args.out, n=args.n, seed=args.seed)
    print(f"wrote {args.n} records to {manifest}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    loaded = load_manifest(
        args.manifest, check_images=not args.no_check_images, skip_invalid=args.skip_invalid
    )
    if not loaded.problems:
        print(f"{args.manifest}: {len(loaded.records)} records OK")
        return 0
    print(f"{args.manifest}: {len(loaded.records)} valid, {loaded.skipped_lines} skipped")
    for problem in loaded.problems:
        print(f"  {problem}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
