"""Objects named by dotted path, the way configs name classes (`pkg.mod.Class` or
`pkg.mod:Class`): one reading for rewards, algorithm variants and trainer entries."""

from __future__ import annotations

import importlib
from typing import Any


class NotDotted(ValueError):
    """The path has no module part or no attribute part."""


def import_dotted(class_path: str) -> Any:
    """The object at `class_path`. Raises NotDotted for a path without both parts;
    whatever importing the module or reading the attribute raises passes through."""
    module_name, sep, attr = class_path.partition(":")
    if not sep:
        module_name, _, attr = class_path.rpartition(".")
    if not module_name or not attr:
        raise NotDotted(class_path)
    return getattr(importlib.import_module(module_name), attr)
