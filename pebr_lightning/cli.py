"""The `pebr` command.

`pebr fit|validate|test --config FILE.yaml` is a LightningCLI: a YAML key is an
`__init__` parameter of the model, data module or Trainer, and parameter docstrings
are the `--help` text (`pebr fit --model.help SFTModule`). Commands that train
nothing live beside it in EXTRA_COMMANDS (`pebr data synth|validate`, ...), each a
`main(argv) -> int` imported only when called. `pebr` alone or `pebr --help` lists
every command with one line each; a mistyped command names the nearest one.

Left at their defaults, a run gets what a Lightning user expects to see: CSV and
TensorBoard loggers in one fresh `lightning_logs/version_N` (a saved config.yaml
run again writes a new version, never over the old one), a LearningRateMonitor, and
a progress bar with the training figures on it where a terminal is attached.

Errors caused by input (`PebrError`: a bad manifest line, a missing model folder)
print one `error:` message and exit with code 2, without a traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

# Re-exported: the checkpoint checks `pebr fit --ckpt_path` runs.
from pebr_lightning.resume import check_checkpoint, resolve_last, shards_checkpoints

LIGHTNING_COMMANDS = {
    "fit": "train one stage from a config: SFT or GRPO, by model.class_path",
    "validate": "one pass over data.init_args.val_manifest: SFT loss, GRPO greedy accuracy",
    "test": "greedy accuracy on data.init_args.test_manifest, graded as `pebr eval` does",
}

EXTRA_COMMANDS = {
    "data": ("pebr_lightning.data.commands", "make and check manifests: synth, validate"),
    "rewards": ("pebr_lightning.rewards.commands", "list and check reward plugins: list, check"),
    "sample": ("pebr_lightning.difficulty.commands", "k rollouts per question -> easy/medium/hard"),
    "eval": ("pebr_lightning.evaluation.commands", "greedy accuracy on a manifest, by type"),
    "schedule": ("pebr_lightning.schedule.commands", "SFT -> sample -> perception -> reasoning"),
    "export": ("pebr_lightning.export.commands", "checkpoint -> PEFT adapter + merged HF model"),
}

# The modules a config's class_path may name, imported before parsing so that short
# class names resolve (`--model.help SFTModule`, `class_path: GRPOModule`).
CONFIG_CLASSES = (
    "pebr_lightning.modules.sft",
    "pebr_lightning.modules.grpo",
    "pebr_lightning.data.datamodule",
    "pebr_lightning.callbacks",
)

# errno values of a write that ran out of room: disk full, file too large, quota
FULL_DISK = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}

DESCRIPTION = "PeBR-R1 two-stage RL for vision-language models (arXiv 2509.13031)."


def version() -> str:
    """The installed distribution's version (the package's own when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("pebr-lightning")
    except PackageNotFoundError:
        from pebr_lightning import __version__

        return __version__


def overview() -> str:
    """`pebr --help`: every command with one line each."""
    lines = [
        "usage: pebr COMMAND [options]      (pebr COMMAND --help: that command's options)",
        "",
        DESCRIPTION,
        "",
        "Training (LightningCLI; --config FILE.yaml, every key an __init__ parameter):",
        *(f"  {name:<10} {text}" for name, text in LIGHTNING_COMMANDS.items()),
        "",
        "Other commands:",
        *(f"  {name:<10} {text}" for name, (_, text) in EXTRA_COMMANDS.items()),
        "",
        "Options:",
        "  -h, --help  this list",
        "  --version   the installed version",
        "",
        "Start: README.md, 'Using it'; pebr fit --model.help SFTModule lists a module's options.",
    ]
    return "\n".join(lines)


def unknown_command(word: str) -> str:
    """The error for a command that does not exist, with the nearest one when close."""
    names = [*LIGHTNING_COMMANDS, *EXTRA_COMMANDS]
    near = difflib.get_close_matches(word, names, n=1, cutoff=0.5)
    hint = f"; did you mean `pebr {near[0]}`?" if near else ""
    return f"unknown command {word!r}{hint} (commands: {', '.join(names)}; see pebr --help)"


class _NoAdvertisement(logging.Filter):
    """Drops Lightning's "Tip: try installing litlogger" line, which every run printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _quiet_advertisements() -> None:
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvertisement) for f in rank_zero.filters):
        rank_zero.addFilter(_NoAdvertisement())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pebr` console script."""
    from pebr_lightning.errors import PebrError, wrapped_user_error

    args = list(sys.argv[1:] if argv is None else argv)
    # Transformers' load/save progress bars only clutter the logs of a run.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _quiet_advertisements()
    if not args or args[0] in ("-h", "--help"):
        print(overview())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"pebr {version()}")
        return 0
    try:
        if args[0] in EXTRA_COMMANDS:
            module = importlib.import_module(EXTRA_COMMANDS[args[0]][0])
            return int(module.main(args[1:]) or 0)
        if not args[0].startswith("-") and args[0] not in LIGHTNING_COMMANDS:
            raise PebrError(unknown_command(args[0]))
        # LightningCLI reads sys.argv itself when given None (and warns when given both).
        cli(None if argv is None else args)
        # Only after success: a rank that failed may leave the others in a collective,
        # and tearing down then would hang instead of exiting.
        _leave_process_group()
    except PebrError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except ValueError as err:
        # jsonargparse re-raises what a config class's __init__ raised (an unknown
        # reward name in GRPOModule) as a ValueError about union types
        cause = wrapped_user_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return cause.exit_code
    except OSError as err:
        if err.errno not in FULL_DISK:
            raise
        # Outputs are written to a temporary name and renamed when complete
        # (files.write_atomic, Lightning's checkpoint save): what was there is intact.
        where = f" {err.filename}" if err.filename else ""
        print(
            f"error: cannot write{where}: {err.strerror} (disk full or over a size quota); "
            "files written before are intact: free space and rerun (`--ckpt_path last` "
            "resumes a fit)",
            file=sys.stderr,
        )
        return 2
    return 0


def _leave_process_group() -> None:
    """Tear down the process group a multi-process run made (Lightning leaves it up).

    Left to interpreter exit, gloo's background threads are destroyed while still
    joinable and the C++ runtime aborts the rank ("terminate called without an active
    exception", SIGABRT) after a run that succeeded, and torchrun reports a failure
    (pytorch/pytorch#190489).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def cli(args: list[str] | None, run: bool = True):
    """Build (and with `run`, execute) the LightningCLI for `args`."""
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    from pebr_lightning.trainer_defaults import fill_trainer_defaults

    # Docstrings under dataclass fields become --help text (LoraConfig.r, OptimConfig.lr...).
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    for name in CONFIG_CLASSES:
        importlib.import_module(name)

    class PebrCLI(LightningCLI):
        """LightningCLI whose model and data are chosen by `class_path` in the config."""

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            # `predict` is left out: `pebr eval` writes every completion with its grade.
            commands = LightningCLI.subcommands()
            return {name: commands[name] for name in LIGHTNING_COMMANDS}

        def parse_arguments(self, parser, args) -> None:
            argv = list(sys.argv[1:] if args is None else args)
            check_config_files(argv)
            check_former_args(argv)
            nulled = null_block_fields(argv)
            # jsonargparse prints --print_config before our defaults are filled in;
            # print it after, so that it shows the loggers and callbacks a run will use.
            printing, argv = take_print_config(nulled)
            if printing is None and nulled == list(sys.argv[1:] if args is None else args):
                super().parse_arguments(parser, args)
                return
            with contextlib.ExitStack() as stack:
                if args is None:  # LightningCLI warns when given args beside sys.argv
                    saved = sys.argv
                    sys.argv = saved[:1]
                    stack.callback(setattr, sys, "argv", saved)
                super().parse_arguments(parser, argv)
            if printing is None:
                return
            config = self.config[self.config.subcommand] if "subcommand" in self.config else None
            if config is None:
                return
            fill_trainer_defaults(config["trainer"], assign_versions=False)
            sub = self._subcommand_parsers[self.config.subcommand]
            print(sub.dump(config, skip_none="skip_null" in printing), end="")
            raise SystemExit(0)

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            self._versioned = fill_trainer_defaults(config["trainer"])
            if "weights_only" in config and config["weights_only"] is None:
                # checkpoints are data: no pickled code runs on load (torch's own
                # default today, stated so that a change upstream cannot undo it)
                config["weights_only"] = True

        def instantiate_classes(self) -> None:
            super().instantiate_classes()
            # The loggers were built with this run's version; the saved config.yaml
            # keeps it unset, so that running that file again writes a new version
            # instead of deleting this one's logs.
            for entry in self._versioned:
                entry["init_args"]["version"] = None

        def _run_subcommand(self, subcommand: str) -> None:
            # Lightning stops a fit on SIGTERM by raising SIGTERMException, a SystemExit
            # without a code: the process would exit 0, as if the run had finished.
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            try:
                super()._run_subcommand(subcommand)
            except SIGTERMException:
                from pebr_lightning.stopping import stopped

                raise stopped(self.trainer) from None

        def _parse_ckpt_path(self) -> None:
            # Replaces LightningCLI's: it reads the checkpoint's hyper-parameters over the
            # config, importing the `_class_path` written inside the checkpoint. Here the
            # config stays the authority: `last` is resolved, the file checked, and the
            # recorded class compared as text with the config's, never imported.
            if not self.config.get("subcommand"):
                return
            config = self.config[self.config.subcommand]
            ckpt_path = config.get("ckpt_path")
            if not ckpt_path:
                return
            if ckpt_path == "last":
                root = config["trainer"].get("default_root_dir") or os.getcwd()
                ckpt_path = config["ckpt_path"] = resolve_last(root)
                if ckpt_path is None:
                    return
            recorded = check_checkpoint(ckpt_path)
            if os.path.isdir(ckpt_path) and not shards_checkpoints(config["trainer"]):
                from pebr_lightning.errors import PebrError

                raise PebrError(
                    f"{ckpt_path}: a sharded checkpoint folder (written by FSDP2Strategy); "
                    "resume it with the same strategy (trainer.strategy: "
                    "pebr_lightning.parallel.FSDP2Strategy), or turn it into weights with "
                    "`pebr export`"
                )
            wanted = config["model"].get("class_path") if config.get("model") else None
            if recorded and wanted and recorded != wanted:
                from pebr_lightning.errors import PebrError

                raise PebrError(
                    f"{ckpt_path}: written by {recorded}, but the config trains {wanted}; "
                    "resume a checkpoint of the same stage"
                )

    from pebr_lightning.stopping import finished, sigterm_deadline, stopped

    with sigterm_deadline() as signals:
        built = PebrCLI(
            model_class=None,
            datamodule_class=None,
            args=args,
            run=run,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION},
        )
    if signals.received and not finished(getattr(built, "trainer", None)):
        raise stopped(getattr(built, "trainer", None))
    return built


def check_config_files(argv: Sequence[str]) -> None:
    """Fail with the file's name (and the line, for a YAML error) on a `--config` that
    is missing or not YAML; jsonargparse names neither ("in '<unicode string>'")."""
    import yaml

    from pebr_lightning.errors import PebrError

    paths = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    for path in paths:
        if path.lstrip().startswith("{") or "\n" in path:
            continue  # an inline config string, parsed by jsonargparse itself
        if not os.path.isfile(path):
            raise PebrError(f"--config {path}: no such file")
        try:
            with open(path, encoding="utf-8") as file:
                node = yaml.compose(file)
            check_former_keys(node, path)
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark
            where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            raise PebrError(f"{path}{where}: not valid YAML: {err.problem}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise PebrError(f"{path}: not valid YAML: {err}") from None


def check_former_keys(node: Any, path: str) -> None:
    """Stop on a module argument that moved into a block on 2026-12-06 (`lora` ->
    `policy.lora`), naming the file, line and key to write: jsonargparse would say only
    that the option is not accepted. `node` is the composed YAML of one config file."""
    from pebr_lightning.errors import PebrError
    from pebr_lightning.modules.shared import FORMER_KEYS

    def child(mapping: Any, name: str) -> Any:
        if getattr(mapping, "tag", "").endswith(":map"):
            for key, value in mapping.value:
                if key.value == name:
                    return value
        return None

    model = child(node, "model")
    init_args = child(model, "init_args")
    if init_args is None:
        return
    class_path = child(model, "class_path")
    name = str(getattr(class_path, "value", "GRPOModule")).rsplit(".", 1)[-1]
    former = FORMER_KEYS.get(name, {})
    for key, _ in init_args.value:
        if key.value in former:
            block = former[key.value]
            raise PebrError(
                f"{path}:{key.start_mark.line + 1}: model.init_args.{key.value} moved into the "
                f"{block} block (2026-12-06): write model.init_args.{block}.{key.value}"
            )


def check_former_args(argv: Sequence[str]) -> None:
    """The same for command-line keys: `--model.init_args.lora ...` (or `--model.lora`)."""
    from pebr_lightning.errors import PebrError
    from pebr_lightning.modules.shared import FORMER_KEYS, STILL_FLAT

    former = {k: b for keys in FORMER_KEYS.values() for k, b in keys.items() if k not in STILL_FLAT}
    for arg in argv:
        if not arg.startswith("--model."):
            continue
        key = arg.split("=", 1)[0].removeprefix("--model.").removeprefix("init_args.")
        if key in former:
            block = former[key]
            raise PebrError(
                f"{arg.split('=', 1)[0]} moved into the {block} block (2026-12-06): write "
                f"--model.init_args.{block}.{key}"
            )


def null_block_fields(argv: list[str]) -> list[str]:
    """`--model.init_args.policy.lora null` as `--model.init_args.policy '{"lora": null}'`.

    jsonargparse 4.53 refuses null for an optional dataclass field inside a dataclass
    argument given by its dotted key ("Expected a path but None ..."), though the same
    null inside a mapping for the block is taken and merged with the block's other
    fields. Only `null` values of keys two levels below init_args are rewritten."""
    import json

    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, sep, value = arg.partition("=")
        if not sep and i + 1 < len(argv):
            value = argv[i + 1]
        parts = key.removeprefix("--").split(".")
        nested = key.startswith("--model.init_args.") and len(parts) == 4
        if nested and value in ("null", "None"):
            out += ["--" + ".".join(parts[:3]), json.dumps({parts[3]: None})]
            i += 1 if sep else 2
            continue
        out.append(arg)
        i += 1
    return out


def take_print_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --print_config flags or None, argv without it)."""
    rest, flags = [], None
    for arg in argv:
        if arg == "--print_config":
            flags = ""
        elif arg.startswith("--print_config="):
            flags = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if flags is not None and "skip_default" in flags:
        return None, list(argv)  # jsonargparse's own: it needs the unfilled defaults
    return flags, rest


if __name__ == "__main__":
    raise SystemExit(main())
