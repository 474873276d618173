"""Algorithm variants chosen by class path, as a config names them.

A variant (an advantage estimator today) is a small class; a config picks it the way
LightningCLI picks a model:

    loss:
      advantage:
        class_path: pebr_lightning.algorithms.advantages.LeaveOneOut
        init_args: {}

so a user's own variant is a class in their own package, named by its path; nothing
in pebr_lightning lists the variants. The config keeps the path and the arguments as
a plain mapping, not the object: checkpoints store hyper-parameters and are loaded
with `weights_only=True`, which refuses any class it was not told about, and a user's
class cannot be on that list. (A mapping, not a dataclass with these two fields:
jsonargparse reads `class_path` in a typed field as a subclass to build.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pebr_lightning.class_paths import NotDotted, import_dotted
from pebr_lightning.errors import PebrError


def variant_spec(spec: Any, key: str) -> dict[str, Any]:
    """`spec` checked as a variant's config, {class_path: str, init_args: mapping}, and
    returned with init_args filled in; errors name `key`."""
    if not isinstance(spec, Mapping):
        raise PebrError(f"{key} must be a mapping with class_path (and init_args), got {spec!r}")
    unknown = sorted(set(spec) - {"class_path", "init_args"})
    if unknown:
        raise PebrError(f"{key} has unknown keys {unknown}; expected class_path and init_args")
    class_path, init_args = spec.get("class_path"), spec.get("init_args") or {}
    if not isinstance(class_path, str) or not class_path:
        raise PebrError(f"{key}.class_path must be a dotted path to a class, got {class_path!r}")
    if not isinstance(init_args, Mapping):
        raise PebrError(f"{key}.init_args must be a mapping, got {init_args!r}")
    return {"class_path": class_path, "init_args": dict(init_args)}


def build_variant(spec: Mapping[str, Any], base: type, key: str) -> Any:
    """Import, check and construct the variant `spec` ({class_path, init_args}) names.

    `base` is the protocol the object must satisfy (checked with isinstance, so a
    runtime-checkable Protocol or an ordinary base class); `key` is the config key the
    spec came from, e.g. `model.init_args.loss.advantage`, named in every error.
    """
    spec = variant_spec(spec, key)
    class_path, init_args = spec["class_path"], spec["init_args"]
    where = f"{key}: class_path {class_path!r}"
    try:
        cls = import_dotted(class_path)
    except NotDotted:
        raise PebrError(
            f"{where} is not a dotted path to a class, like my_pkg.module.MyClass"
        ) from None
    except Exception as err:
        raise PebrError(f"{where} failed to import: {type(err).__name__}: {err}") from err
    if not isinstance(cls, type):
        raise PebrError(f"{where} is a {type(cls).__name__}, not a class")
    try:
        obj = cls(**init_args)
    except Exception as err:
        raise PebrError(
            f"{where} could not be constructed with init_args {init_args!r}: "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(obj, base):
        raise PebrError(f"{where} is not a {base.__name__} ({base.__doc__.splitlines()[0]})")
    return obj
