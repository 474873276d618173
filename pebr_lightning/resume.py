"""Which checkpoint a run resumes from, checked before anything loads.

`--ckpt_path last` and `pebr schedule` take the newest checkpoint of a run folder that
reads (one cut short by a full disk or a kill is skipped, with a message); a path
given by hand is checked the same way, so a bad one fails with one line before any
model is built. Nothing here unpickles code: checkpoints load with weights_only and
a sharded folder's metadata through the allow-list reader (parallel/dcp_metadata.py).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pebr_lightning.errors import PebrError

Echo = Callable[[str], None]


def resolve_last(root: str | os.PathLike) -> str | None:
    """`--ckpt_path last`: the newest readable checkpoint under the root folder.

    Lightning's own "last" looks only in the new run's folder, which each run gets
    afresh (`lightning_logs/version_N`), so it would never find the interrupted one.
    Newest: the highest run version's `last.ckpt`, then its other checkpoints by step,
    then older versions; one that does not read (cut short by a full disk, say) is
    skipped with a message. None (start afresh, said on stderr) when none reads.
    """

    def say(line: str) -> None:
        print(f"--ckpt_path last: {line}", file=sys.stderr)

    found = newest_readable_checkpoint(Path(root), say)
    if found is None:
        say(f"no readable checkpoint under {root} yet; starting afresh")
        return None
    say(f"resuming from {found}")
    return str(found)


def check_checkpoint(path: str | os.PathLike) -> str | None:
    """Fail with one clear line, before any model loads, when `--ckpt_path` is not a
    readable checkpoint (missing, truncated, not a checkpoint, an incomplete sharded
    folder). Returns the module class path the checkpoint records, as text."""
    import torch

    from pebr_lightning.errors import load_failure_reason

    path = Path(path)
    hint = "pass another --ckpt_path, or `last` for the newest complete one"
    if path.is_dir():
        missing = [n for n in (".metadata", "meta.pt") if not (path / n).is_file()]
        if missing:
            raise PebrError(
                f"{path}: incomplete sharded checkpoint (no {', '.join(missing)}); {hint}"
            )
        from pebr_lightning.parallel.dcp_metadata import read_dcp_metadata

        read_dcp_metadata(path)  # DCP reads .metadata with pickle: refuse a crafted one first
        path = path / "meta.pt"  # hyper-parameters and loop state; weights in shards
    elif not path.is_file():
        raise PebrError(f"{path}: no such checkpoint; {hint}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle, zip and torch errors alike: the file is unusable
        reason = load_failure_reason(err)
        raise PebrError(f"{path}: not a readable checkpoint ({reason}); {hint}") from None
    state = data.get("state_dict") if isinstance(data, dict) else None
    if isinstance(state, dict):
        from pebr_lightning.models.finite import refuse_nonfinite

        refuse_nonfinite(state.items(), str(path))
    hparams = data.get("hyper_parameters") if isinstance(data, dict) else None
    recorded = hparams.get("_class_path") if isinstance(hparams, dict) else None
    return recorded if isinstance(recorded, str) else None


def shards_checkpoints(trainer: Any) -> bool:
    """Whether the trainer config's strategy reads sharded checkpoint folders (FSDP2)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from pebr_lightning.trainer_defaults import has_instance

    strategy = trainer.get("strategy")
    if isinstance(strategy, str):
        return False  # "auto", "ddp", ...: single-file checkpoints
    return has_instance([strategy], ModelParallelStrategy)


def latest_last_checkpoint(stage_dir: Path) -> Path | None:
    """The `last.ckpt` of the newest run version in a stage folder."""
    found = []
    for ckpt in stage_dir.glob("lightning_logs/version_*/checkpoints/last.ckpt"):
        match = re.fullmatch(r"version_(\d+)", ckpt.parent.parent.name)
        if match:
            found.append((int(match.group(1)), ckpt))
    return max(found)[1] if found else None


def checkpoint_candidates(root: Path) -> list[Path]:
    """Every complete-named checkpoint under `root`'s run versions, newest first.

    Newest = highest `version_N`, then `last.ckpt` before the others, then the higher
    `step=N` in the name. Temporary names (`.X.partial`, `X.partial`, `X.old`) are
    never candidates.
    """

    def key(ckpt: Path) -> tuple[int, int, int]:
        version = int(ckpt.parent.parent.name.removeprefix("version_"))
        step = re.search(r"step=(\d+)", ckpt.name)
        return (version, ckpt.name == "last.ckpt", int(step.group(1)) if step else -1)

    found = [
        ckpt
        for ckpt in root.glob("lightning_logs/version_*/checkpoints/*.ckpt")
        if re.fullmatch(r"version_\d+", ckpt.parent.parent.name) and not ckpt.name.startswith(".")
    ]
    return sorted(found, key=key, reverse=True)


def newest_readable_checkpoint(root: Path, echo: Echo = print) -> Path | None:
    """The newest of `checkpoint_candidates` that reads as a checkpoint; each one
    skipped (truncated, empty, an incomplete sharded folder) is said through `echo`."""
    for ckpt in checkpoint_candidates(root):
        try:
            check_checkpoint(ckpt)
        except PebrError as err:
            echo(f"skipping an unreadable checkpoint: {err}")
            continue
        return ckpt
    return None
