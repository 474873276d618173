"""The `pebr data` subcommands: make a synthetic dataset, check a manifest.

    pebr data synth --out data/shapes --n 2000 --seed 0 [--name shapes]
    pebr data validate data/shapes/manifest.jsonl [--skip-invalid]
    pebr data validate data/geo/train.parquet --field-map question=problem,image=images

`main` lets `PebrError` propagate: the top-level `pebr` command prints it as
`error: <message>` and exits with its exit code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pebr_lightning.argtypes import positive_int
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.data.synthetic import DEFAULT, load_synthetic
from pebr_lightning.data.tables import DEMO_DATA


def main(argv: list[str]) -> int:
    """Run `pebr data <argv>` and return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.run is _synth and not (args.out or args.demo):
        parser.error("synth: give --out DIR (or --demo for the demo's data)")
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pebr data", description="Make or check the data a PeBR stage trains on."
    )
    commands = parser.add_subparsers(title="commands", metavar="{synth,validate}", required=True)

    synth = commands.add_parser(
        "synth",
        help="write a synthetic dataset (images + manifest.jsonl)",
        description="Write DIR/manifest.jsonl and its images with a synthetic dataset "
        "registered in the `pebr_lightning.datasets` entry-point group (the demo's "
        "shapes by default); the same seed gives byte-identical files.",
    )
    synth.add_argument(
        "--name",
        default=DEFAULT,
        help="the registered synthetic dataset (default: %(default)s)",
    )
    synth.add_argument(
        "--out", metavar="DIR", help="output folder (with --demo: default data/demo)"
    )
    synth.add_argument(
        "--demo",
        action="store_true",
        help="write the demo configs' data: DIR/train (2000), DIR/val (200), DIR/test (400), "
        "as `pebr schedule --config configs/demo/schedule.yaml` does",
    )
    synth.add_argument(
        "--n",
        type=positive_int,
        help="number of records (default: 2000); with --demo, per split (default: 2000 train, "
        "200 val, 400 test)",
    )
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    synth.set_defaults(run=_synth)

    validate = commands.add_parser(
        "validate",
        help="check a manifest and every image it points to",
        description="Check every record of a manifest (a .jsonl file, a .parquet file, a "
        "dataset folder, or a hub id such as owner/name@split) against the schema in "
        "docs/data.md and open every image it points to. Image bytes in a table are "
        "written to files first.",
    )
    validate.add_argument(
        "manifest",
        metavar="MANIFEST",
        help="a .jsonl manifest, a .parquet file, a dataset folder[@split] or owner/name[@split]",
    )
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
    validate.add_argument(
        "--field-map",
        type=_field_map,
        default=None,
        metavar="OURS=THEIRS,...",
        help="read our fields from differently named columns, e.g. question=problem,image=images",
    )
    validate.add_argument(
        "--image-dir",
        metavar="DIR",
        default=None,
        help="where image bytes from a table are written (default: $PEBR_CACHE/images)",
    )
    validate.set_defaults(run=_validate)
    return parser


def _synth(args: argparse.Namespace) -> int:
    data = load_synthetic(args.name)
    if args.demo:
        out = Path(args.out or DEMO_DATA)
        for offset, (split, n) in enumerate(data.splits.items()):
            n = args.n or n
            manifest = data.write(out / split, n=n, seed=args.seed + offset)
            print(f"wrote {n} records to {manifest}")
        return 0
    n = args.n or 2000
    manifest = data.write(args.out, n=n, seed=args.seed)
    print(f"wrote {n} records to {manifest}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    loaded = load_manifest(
        args.manifest,
        check_images=not args.no_check_images,
        skip_invalid=args.skip_invalid,
        field_map=args.field_map,
        image_dir=args.image_dir,
    )
    if not loaded.problems:
        print(f"{args.manifest}: {len(loaded.records)} records OK")
        return 0
    print(f"{args.manifest}: {len(loaded.records)} valid, {loaded.skipped_lines} skipped")
    for problem in loaded.problems:
        print(f"  {problem}")
    return 0


def _field_map(text: str) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for pair in text.split(","):
        ours, sep, theirs = (part.strip() for part in pair.partition("="))
        if not sep or not ours or not theirs:
            raise argparse.ArgumentTypeError(
                f"expected OURS=THEIRS pairs separated by commas, e.g. question=problem; "
                f"got {pair!r}"
            )
        if ours in mapping:
            raise argparse.ArgumentTypeError(f"field {ours!r} is mapped twice")
        mapping[ours] = theirs
    return mapping
