"""The `pebr rewards` subcommands: list the installed reward plugins, check one.

    pebr rewards list
    pebr rewards check NAME [--manifest FILE] [--n N] [--init-args JSON]
    pebr rewards check my_pkg.rewards.MyReward --class-path

`list` imports every registered class to show its docstring (a class that fails to
import is listed with the error), and warns on stderr about each plugin registered
under a built-in reward's name. `check` loads one reward the way training does,
runs the contract checks of pebr_lightning.testing on a batch of reference
responses plus edge cases, prints PASS/FAIL per check and the scores, and exits 0
only when every check passes. A name that is not installed or malformed
`--init-args` raise PebrError (the `pebr` command prints it and exits 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Any

from pebr_lightning.argtypes import positive_int
from pebr_lightning.errors import PebrError
from pebr_lightning.rewards import registry
from pebr_lightning.rewards.combine import unpack_output

SHOWN_COMPONENTS = 4


def main(argv: list[str]) -> int:
    """Run `pebr rewards <argv>` and return the exit code."""
    args = _parser().parse_args(argv)
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pebr rewards", description="List and check reward plugins."
    )
    commands = parser.add_subparsers(title="commands", metavar="{list,check}", required=True)

    listing = commands.add_parser(
        "list",
        help="list installed rewards: name, distribution, version, summary",
        description=f"List the rewards registered under the entry-point group {registry.GROUP!r}.",
    )
    listing.set_defaults(run=_list)

    check = commands.add_parser(
        "check",
        help="load one reward and run the reward-contract checks on it",
        description="Load a reward as training does and check it against the reward "
        "contract (docs/plugins.md) on reference responses and edge cases.",
    )
    check.add_argument("name", metavar="NAME", help="registered name, or dist:name")
    check.add_argument(
        "--class-path", action="store_true", help="NAME is a dotted import path to a class"
    )
    check.add_argument(
        "--manifest", metavar="FILE", help="take samples from this manifest (default: synthetic)"
    )
    check.add_argument(
        "--n", type=positive_int, default=4, help="number of samples (default: %(default)s)"
    )
    check.add_argument(
        "--init-args",
        metavar="JSON",
        default="{}",
        help="constructor arguments as a JSON object, e.g. '{\"max_tokens\": 256}'",
    )
    check.set_defaults(run=_check)
    return parser


def _list(args: argparse.Namespace) -> int:
    entries = registry.available()
    if not entries:
        print(f"no rewards installed (entry-point group {registry.GROUP!r})")
        return 0
    builtins = {e.name for e in entries if e.builtin}
    for entry in registry.shadowing():
        what = (
            f"{entry.name!r}, the name of a built-in reward: {entry.name!r} stays the built-in"
            if entry.name in builtins
            else f"{entry.name!r}, a built-in reward's name in other case: it is refused as a "
            "plain name"
        )
        print(
            f"warning: distribution {entry.dist!r} registers {what}, and this plugin's reward "
            f"is {entry.qualified_name!r}",
            file=sys.stderr,
        )
    rows = [("NAME", "DISTRIBUTION", "VERSION", "DESCRIPTION")]
    for entry, name in zip(entries, registry.display_names(), strict=True):
        rows.append((name, entry.dist or "?", entry.version or "?", _summary(entry)))
    widths = [max(len(row[k]) for row in rows) for k in range(3)]
    for name, dist, version, summary in rows:
        cells = (name.ljust(widths[0]), dist.ljust(widths[1]), version.ljust(widths[2]), summary)
        print("  ".join(cells).rstrip())
    return 0


def _summary(entry: registry.RewardEntry) -> str:
    """First docstring line of the entry's class, or why it could not be imported."""
    try:
        target = entry.entry_point.load()
    except Exception as err:
        return f"(import failed: {type(err).__name__}: {err})"
    doc = (getattr(target, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def _check(args: argparse.Namespace) -> int:
    from pebr_lightning.rewards.checks import make_batch, make_context, make_samples, run_checks

    init_args = _parse_init_args(args.init_args)
    spec = registry.RewardSpec(
        name=None if args.class_path else args.name,
        class_path=args.name if args.class_path else None,
        init_args=init_args,
    )
    if spec.name is not None:
        print(f"checking reward {spec.name!r}: {registry.resolve(spec.name).origin}")
    else:
        print(f"checking reward class {spec.class_path!r}")
    try:
        reward = registry.build_reward(spec)
    except registry.PluginValidationError as err:
        print(f"FAIL  load and validate: {err}")
        return 1
    print("PASS  load and validate")

    with tempfile.TemporaryDirectory(prefix="pebr-rewards-check-") as tmp:
        if args.manifest:
            from pebr_lightning.data.manifest import load_manifest

            samples = load_manifest(args.manifest).records[: args.n]
            source = f"{len(samples)} samples of {args.manifest}"
        else:
            samples = make_samples(n=args.n, seed=0, root=tmp)
            source = f"{len(samples)} synthetic samples"
        batch = make_batch(samples)
        total = len(batch.completions)
        print(f"batch: {source}, their reference responses + edge cases ({total} in all)")
        context = make_context(batch.samples)
        report = run_checks(reward, batch.samples, batch.completions, context)

    for result in report.results:
        print(result)
    if report.output is not None:
        _print_scores(report.output, batch)
    failed = len(report.failures)
    print("all checks passed" if not failed else f"{failed} of {len(report.results)} checks failed")
    return 0 if not failed else 1


def _print_scores(output: Any, batch: Any) -> None:
    try:
        scores, components = unpack_output(output)
    except TypeError:
        return
    components = components if isinstance(components, dict) else {}
    keys = list(components)[:SHOWN_COMPONENTS]
    print("scores:")
    for i, (label, sample) in enumerate(zip(batch.labels, batch.samples, strict=True)):
        cells = [f"{label:<12}", f"{sample.get('id', i)!s:<22}", _fmt(scores, i)]
        cells += [f"{k}={_fmt(components[k], i)}" for k in keys]
        print("  " + "  ".join(cells))


def _fmt(values: Any, i: int) -> str:
    """values[i] for a table cell: floats to 4 digits, anything odd as its repr."""
    if not isinstance(values, (list, tuple)) or i >= len(values):
        return "(missing)"
    value = values[i]
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


def _parse_init_args(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise PebrError(f"--init-args is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise PebrError(f"--init-args must be a JSON object, got {text}")
    return value
