"""Named parts that installed packages add through Python entry points.

Rewards and rollout engines have registries of their own, with their own checks
(rewards/registry.py, engines/base.py). The groups here are simpler: a name stands for
one object, loaded when it is asked for. The embedded demo (the `pebr_demo` package of
this repository) fills every group through its entry points in pyproject.toml, and the
core never imports it, so a user's own package can stand beside it or replace it:

- `pebr_lightning.models`: a model name -> `f(name) -> folder` of a transformers model.
  `policy.model: tiny-qwen2.5-vl` builds and caches the demo's toy VLM this way.
- `pebr_lightning.clip_models`: a name -> `f(name) -> folder` that open_clip loads as
  `local-dir:<folder>` (the clip_score reward's `model`).
- `pebr_lightning.datasets`: a name -> an object with `write(out_dir, n, seed) -> manifest
  path`, `written_differently(manifest, n, seed) -> reason | None` and `splits`
  (split -> record count) (data/synthetic.py; `pebr data synth`, a schedule's `synth`).
- `pebr_lightning.eval_metrics`: a name -> `f(records, texts, correct) -> {metric: value}`,
  run by every greedy evaluation on its predictions (evaluation/greedy.py); a metric
  that does not apply to the records returns {}.

Entry points are read on each call, not cached: a package installed while a process
runs (a test that writes a `.dist-info`) is seen at once, and every caller here runs
once per load or evaluation.
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any

from pebr_lightning.errors import PebrError

BUILTIN_DIST = "pebr-lightning"
"""This project's own distribution (pyproject.toml), which the engine and reward
registries let no plugin shadow."""

MODELS = "pebr_lightning.models"
CLIP_MODELS = "pebr_lightning.clip_models"
DATASETS = "pebr_lightning.datasets"
EVAL_METRICS = "pebr_lightning.eval_metrics"


def canonical_dist(name: str) -> str:
    """A distribution name as packaging normalises it: lower case, runs of `-_.` as `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_builtin(ep: metadata.EntryPoint) -> bool:
    """Whether this project itself registers `ep`."""
    dist = getattr(ep, "dist", None)
    return dist is not None and canonical_dist(dist.name) == BUILTIN_DIST


def builtin_first(group: str) -> dict[str, metadata.EntryPoint]:
    """Name -> entry point of `group`, this project's own registration winning over a
    plugin's for the same name (the engine and model-family registries: a plugin
    cannot shadow a built-in name)."""
    found: dict[str, metadata.EntryPoint] = {}
    for ep in sorted(metadata.entry_points(group=group), key=lambda e: e.name):
        if ep.name not in found or is_builtin(ep):
            found[ep.name] = ep
    return found


def names(group: str) -> list[str]:
    """The names registered in `group`, sorted."""
    return sorted({ep.name for ep in metadata.entry_points(group=group)})


def load(group: str, name: str, what: str) -> Any:
    """The object registered as `name` in `group`; `what` names the kind in the error.

    Two distributions registering one name is an error, not a silent pick: which one
    won would depend on the order of sys.path."""
    found = [ep for ep in metadata.entry_points(group=group) if ep.name == name]
    if not found:
        known = ", ".join(names(group)) or "none installed"
        raise PebrError(f"unknown {what} {name!r} (entry-point group {group}: {known})")
    targets = sorted({ep.value for ep in found})
    if len(targets) > 1:
        raise PebrError(
            f"{what} {name!r} is registered more than once in entry-point group {group}: "
            f"{', '.join(targets)}; uninstall one of them"
        )
    try:
        return found[0].load()
    except Exception as err:  # an import error inside a plugin: name the plugin
        raise PebrError(
            f"{what} {name!r} (entry point {found[0].value} in group {group}) "
            f"cannot be loaded: {type(err).__name__}: {err}"
        ) from err


def load_all(group: str, what: str) -> dict[str, Any]:
    """Every object registered in `group`, by name, in name order."""
    return {name: load(group, name, what) for name in names(group)}
