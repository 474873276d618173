"""The `pebr` command.

`pebr fit|validate|test|predict --config FILE.yaml` is a LightningCLI: a YAML key
is an `__init__` parameter of the model, data module or Trainer, and parameter
docstrings are the `--help` text (`pebr fit --model.help SFTModule`). Commands that
train nothing live beside it in EXTRA_COMMANDS (`pebr data synth|validate`), each a
`main(argv) -> int` imported only when called.

Errors caused by input (`PebrError`: a bad manifest line, a missing model folder)
print one `error:` message and exit with code 2, without a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

EXTRA_COMMANDS = {
    "data": ("pebr_lightning.data.commands", "make and check manifests: synth, validate"),
    "rewards": ("pebr_lightning.rewards.commands", "list and check reward plugins: list, check"),
    "sample": ("pebr_lightning.difficulty.commands", "k rollouts per question -> easy/medium/hard"),
    "eval": ("pebr_lightning.evaluation.commands", "greedy accuracy on a manifest, by type"),
    "schedule": ("pebr_lightning.schedule.commands", "SFT -> sample -> perception -> reasoning"),
    "export": ("pebr_lightning.export.commands", "checkpoint -> PEFT adapter + merged HF model"),
}

DESCRIPTION = "PeBR-R1 two-stage RL for vision-language models.\n\nOther commands:\n" + "\n".join(
    f"  pebr {name:<10} {summary}" for name, (_, summary) in EXTRA_COMMANDS.items()
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pebr` console script."""
    from pebr_lightning.errors import PebrError

    args = list(sys.argv[1:] if argv is None else argv)
    # Transformers' load/save progress bars only clutter the logs of a run.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        if args and args[0] in EXTRA_COMMANDS:
            module = importlib.import_module(EXTRA_COMMANDS[args[0]][0])
            return int(module.main(args[1:]) or 0)
        # LightningCLI reads sys.argv itself when given None (and warns when given both).
        cli(None if argv is None else args)
    except PebrError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


def cli(args: list[str] | None, run: bool = True):
    """Build (and with `run`, execute) the LightningCLI for `args`."""
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    # Docstrings under dataclass fields become --help text (LoraConfig.r, OptimConfig.lr...).
    set_parsing_settings(docstring_parse_attribute_docstrings=True)

    class PebrCLI(LightningCLI):
        """LightningCLI whose model and data are chosen by `class_path` in the config."""

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            trainer = config["trainer"]
            if trainer.get("logger") in (None, True):  # the user left the default
                trainer["logger"] = default_loggers(trainer.get("default_root_dir") or os.getcwd())

    return PebrCLI(
        model_class=None,
        datamodule_class=None,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
    )


def positive_int(text: str) -> int:
    """argparse type of the extra commands: a whole number >= 1, with a clear message."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def default_loggers(root: str | os.PathLike) -> list:
    """Config entries for CSV and TensorBoard loggers sharing `lightning_logs/version_N`.

    Lightning's own default is TensorBoard alone once tensorboard is installed; the
    CSV file beside it is what scripts and tests read without extra packages. Both
    get one version number, so checkpoints keep the single-logger layout
    `lightning_logs/version_N/checkpoints`. Entries stay `class_path` namespaces (not
    objects) so the saved `config.yaml` records them.
    """
    from jsonargparse import Namespace
    from lightning.pytorch.loggers import CSVLogger

    version = CSVLogger(root).version  # the next free version_N under root/lightning_logs
    return [
        Namespace(
            class_path=f"lightning.pytorch.loggers.{name}",
            init_args=Namespace(save_dir=str(root), version=version, **extra),
        )
        for name, extra in (("CSVLogger", {}), ("TensorBoardLogger", {"default_hp_metric": False}))
    ]


if __name__ == "__main__":
    raise SystemExit(main())
