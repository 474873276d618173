"""What a run gets when its config leaves the trainer's loggers, plugins and
callbacks to us: the defaults a Lightning and Hugging Face user expects to find.

`fill_trainer_defaults` works on the parsed config (jsonargparse namespaces), before
anything is built, so that the saved config.yaml records every entry it adds as a
`class_path`, and `pebr fit --print_config` shows them.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# Loggers whose `version` is a `version_N` folder under save_dir/name.
VERSIONED_LOGGERS = (
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.TensorBoardLogger",
)


def fill_trainer_defaults(trainer: Any, assign_versions: bool = True) -> list:
    """Fill in what a run gets when the config leaves it to us; returns the logger
    entries given a version here (to be unset again in the saved config).

    - loggers: CSV + TensorBoard when the config says nothing (`logger` unset or true);
      entries without a version share the next free `version_N` (each logger would
      otherwise pick its own, and a saved config would name an old one).
    - AtomicCheckpointIO among the plugins, unless another CheckpointIO is named.
    - a LearningRateMonitor when anything logs, so the LR curve is in TensorBoard.
    - pebr's ProgressBar (the training figures on Lightning's bar, silent without a
      terminal) unless the bar is off or another progress bar is named.
    """
    root = trainer.get("default_root_dir") or os.getcwd()
    if trainer.get("logger") in (None, True):  # the user left the default
        trainer["logger"] = default_loggers(root)
    versioned = share_logger_version(trainer["logger"], root) if assign_versions else []
    trainer["plugins"] = with_atomic_checkpoints(trainer.get("plugins"))
    callbacks = class_entries(trainer.get("callbacks"))
    from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar

    if trainer.get("logger") not in (False, None, []) and not has_instance(
        callbacks, LearningRateMonitor
    ):
        callbacks.append(
            entry("lightning.pytorch.callbacks.LearningRateMonitor", logging_interval="step")
        )
    if trainer.get("enable_progress_bar") is not False and not has_instance(callbacks, ProgressBar):
        callbacks.append(entry("pebr_lightning.callbacks.ProgressBar"))
    trainer["callbacks"] = callbacks
    return versioned


def entry(class_path: str, **init_args: Any) -> Any:
    """A `class_path` config entry, as jsonargparse writes it (kept in config.yaml)."""
    from jsonargparse import Namespace

    return Namespace(class_path=class_path, init_args=Namespace(**init_args))


def class_entries(items: Any) -> list:
    """A trainer list setting (callbacks, plugins, loggers) as a list."""
    return [] if items is None else list(items) if isinstance(items, list) else [items]


def entry_class(item: Any) -> type | None:
    """The class an entry (object, class or `class_path` namespace) stands for."""
    from jsonargparse import Namespace

    if isinstance(item, (Namespace, dict)) and item.get("class_path"):
        module, _, name = item["class_path"].rpartition(".")
        found = getattr(importlib.import_module(module), name, None)
        return found if isinstance(found, type) else None
    return item if isinstance(item, type) else type(item)


def has_instance(items: list, base: type) -> bool:
    """Whether any entry is (or builds) a subclass of `base`."""
    return any(issubclass(cls, base) for cls in map(entry_class, items) if cls is not None)


def with_atomic_checkpoints(plugins: Any) -> list:
    """The trainer's plugins plus AtomicCheckpointIO, unless they name a CheckpointIO.

    Entries stay `class_path` namespaces, so the saved config.yaml records the plugin.
    """
    from lightning.pytorch.plugins.io import CheckpointIO

    items = class_entries(plugins)
    if has_instance(items, CheckpointIO):
        return items  # the user's choice of checkpoint writer stands
    return [*items, entry("pebr_lightning.callbacks.checkpoint_io.AtomicCheckpointIO")]


def default_loggers(root: str | os.PathLike) -> list:
    """Config entries for CSV and TensorBoard loggers under `root/lightning_logs`.

    Lightning's own default is TensorBoard alone once tensorboard is installed; the
    CSV file beside it is what scripts and tests read without extra packages. Their
    version is left unset: `share_logger_version` gives both the same one, so
    checkpoints keep the single-logger layout `lightning_logs/version_N/checkpoints`.
    Entries stay `class_path` namespaces (not objects) so config.yaml records them.
    """
    return [
        entry(f"lightning.pytorch.loggers.{name}", save_dir=str(root), version=None, **extra)
        for name, extra in (("CSVLogger", {}), ("TensorBoardLogger", {"default_hp_metric": False}))
    ]


def share_logger_version(loggers: Any, root: str | os.PathLike) -> list:
    """Give the logger entries whose version is unset the next free `version_N` of
    their folder, the same N for all of them; returns the entries changed."""
    from jsonargparse import Namespace
    from lightning.pytorch.loggers import CSVLogger

    changed, versions = [], {}
    for item in class_entries(loggers):
        if not isinstance(item, (Namespace, dict)) or not item.get("class_path"):
            continue
        cls = entry_class(item)
        if not any(issubclass(cls, entry_class(entry(name))) for name in VERSIONED_LOGGERS):
            continue  # a logger whose `version` means something else (a run id)
        args = item.get("init_args")
        if args is None or "version" not in args or args["version"] is not None:
            continue
        save_dir = str(args.get("save_dir") or root)
        name = args.get("name") or "lightning_logs"
        if (save_dir, name) not in versions:
            versions[save_dir, name] = CSVLogger(save_dir, name=name).version
        args["version"] = versions[save_dir, name]
        changed.append(item)
    return changed
