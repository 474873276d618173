"""Find reward plugins by name, import only the ones a config names, check them on load.

Rewards are classes registered under the entry-point group `pebr_lightning.rewards`
(name -> `module:Class`); the built-in rewards register there through this
project's own pyproject.toml, exactly as a third-party package would. Discovery is
separate from activation: the entry-point table is read once, on first use, and a
plugin module is imported only when a config (or `pebr rewards list`) names it, so a
plugin that is slow or broken to import costs nothing unless it is used.

A config names a reward as `name`, or as `dist:name` when two distributions provide
the same name (`dist` compared the way packaging normalises names), or with
`class_path: my_pkg.rewards.MyReward` for a class that is not packaged. The built-in
names are reserved: plain `format` is always the built-in, and a plugin that registers
`format` too is reachable only as `its-dist:format`. A name is looked up (not
imported) when GRPOModule is built, so a misspelt one stops a run before training,
naming the nearest installed one. Every loaded class is checked against the contract
in protocol.py and a failure is reported as a `PluginValidationError` naming the
distribution and entry point. docs/plugins.md is the author's guide.

    pebr rewards list
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal

from jsonargparse.typing import register_type

from pebr_lightning.class_paths import NotDotted, import_dotted
from pebr_lightning.entry_points import BUILTIN_DIST, canonical_dist
from pebr_lightning.errors import PebrError

GROUP = "pebr_lightning.rewards"
# BUILTIN_DIST (entry_points.py): the names this project registers are reserved, so
# that a plugin registering one cannot make a shipped config ambiguous.
ON_ERROR_CHOICES = ("raise", "none")
SPEC_KEYS = ("name", "class_path", "weight", "init_args", "on_error", "timeout_s")

_entries: list[RewardEntry] | None = None
# Off inside `names_not_looked_up()`: export rebuilds modules whose rewards it never runs.
_look_up_names: ContextVar[bool] = ContextVar("pebr_look_up_reward_names", default=True)


class PluginValidationError(PebrError):
    """A reward plugin cannot be imported or does not follow the reward contract."""


class RewardLookupError(PebrError):
    """A configured reward name matches no installed reward, or more than one."""


class RewardConfigError(PebrError, ValueError):
    """A reward entry of a config is malformed (a ValueError too, for jsonargparse)."""


@dataclass(frozen=True)
class RewardEntry:
    """One registered reward: where it comes from, without importing it."""

    name: str
    """The entry-point name, e.g. `format`."""
    dist: str | None
    """The providing distribution as its metadata spells it; None if unknown."""
    version: str | None
    """The distribution's version."""
    entry_point: metadata.EntryPoint
    """The entry point itself (`name = module:Class`)."""

    @property
    def builtin(self) -> bool:
        """Registered by this project itself (BUILTIN_DIST)."""
        return self.dist is not None and canonical_dist(self.dist) == BUILTIN_DIST

    @property
    def qualified_name(self) -> str:
        """`dist:name` with the distribution name normalised; just `name` without a dist."""
        return f"{canonical_dist(self.dist)}:{self.name}" if self.dist else self.name

    @property
    def origin(self) -> str:
        """Where this reward comes from, in the words errors use."""
        dist = f"distribution {self.dist!r}" if self.dist else "an unknown distribution"
        if self.dist and self.version:
            dist += f" {self.version}"
        return f"entry point '{self.name} = {self.entry_point.value}' of {dist}"

    def load(self) -> type:
        """Import the class and check it against the reward contract."""
        try:
            target = self.entry_point.load()
        except Exception as err:
            raise PluginValidationError(
                f"reward {self.name!r} ({self.origin}) failed to import: "
                f"{type(err).__name__}: {err}"
            ) from err
        validate_reward_class(target, self.origin)
        return target


@dataclass
class RewardSpec:
    """One reward of a config: which class, its weight, its arguments, its fault policy.

    In YAML, a list of these:

        rewards:
          - {name: clip_score, weight: 0.4, init_args: {model: qihoo360/fg-clip-large}}
          - {class_path: my_pkg.rewards.MyReward, weight: 0.1, on_error: none}
    """

    name: str | None = None
    """Registered name (`pebr rewards list`), or `dist:name` where two distributions clash."""
    class_path: str | None = None
    """Dotted import path of a reward class that is not registered (instead of `name`)."""
    weight: float = 1.0
    """Weight in the summed reward; 0 computes and logs the reward without training on it."""
    init_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the reward's constructor."""
    on_error: Literal["raise", "none"] = "raise"
    """What a reward fault does (it raises, or returns NaN, a non-number, a wrong length):
    `raise` stops with an error naming the samples; `none` scores those samples None."""
    timeout_s: float | None = None
    """Seconds one call (one batch) may take; longer is a fault handled by `on_error`. The
    call then runs in a worker thread, which is abandoned, not stopped, when it overruns
    (docs/RELIABILITY.md). None: no limit, the call runs in the training thread."""

    def __post_init__(self) -> None:
        if (self.name is None) == (self.class_path is None):
            raise RewardConfigError(
                "a reward entry needs exactly one of `name` (a registered reward) and "
                f"`class_path` (a dotted import path), got name={self.name!r}, "
                f"class_path={self.class_path!r}"
            )
        for key in ("name", "class_path"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise RewardConfigError(f"reward {key} must be a non-empty string, got {value!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise RewardConfigError(
                f"reward {self.label}: weight must be a number, got {self.weight!r}"
            )
        self.weight = float(self.weight)
        if not math.isfinite(self.weight) or self.weight < 0:
            raise RewardConfigError(
                f"reward {self.label}: weight must be finite and >= 0, got {self.weight}"
                " (a penalty is a reward that returns negative scores)"
            )
        if not isinstance(self.init_args, dict):
            raise RewardConfigError(
                f"reward {self.label}: init_args must be a mapping, got {self.init_args!r}"
            )
        if self.on_error not in ON_ERROR_CHOICES:
            raise RewardConfigError(
                f"reward {self.label}: on_error must be one of {', '.join(ON_ERROR_CHOICES)},"
                f" got {self.on_error!r}"
            )
        if self.timeout_s is not None:
            if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)):
                raise RewardConfigError(
                    f"reward {self.label}: timeout_s must be a number or null, "
                    f"got {self.timeout_s!r}"
                )
            self.timeout_s = float(self.timeout_s)
            if not self.timeout_s > 0 or not math.isfinite(self.timeout_s):
                raise RewardConfigError(
                    f"reward {self.label}: timeout_s must be > 0 and finite (or null for no "
                    f"limit), got {self.timeout_s}"
                )

    @property
    def label(self) -> str:
        """The name or class path, for messages."""
        return repr(self.name if self.name is not None else self.class_path)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint or a YAML dump; records the registry name, not a path."""
        data: dict[str, Any] = {"name": self.name} if self.name is not None else {}
        if self.class_path is not None:
            data["class_path"] = self.class_path
        data["weight"] = self.weight
        data["init_args"] = copy.deepcopy(self.init_args)
        data["on_error"] = self.on_error
        if self.timeout_s is not None:
            data["timeout_s"] = self.timeout_s
        return data

    @classmethod
    def from_dict(cls, data: Any) -> RewardSpec:
        """A config's reward entry, checked: `parse`, then a registered name is looked up
        (not imported). GRPOModule's `__init__` calls this, so a misspelt or missing
        reward stops `pebr fit` before the Trainer is built."""
        spec = cls.parse(data)
        if spec.name is not None and _look_up_names.get():
            resolve(spec.name)
        return spec

    @classmethod
    def parse(cls, data: Any) -> RewardSpec:
        """The inverse of `to_dict`; unknown keys are an error naming the accepted ones."""
        if isinstance(data, RewardSpec):
            return data
        if isinstance(data, str):  # a bare name in a list: `rewards: [format, accuracy]`
            return cls(name=data)
        if not isinstance(data, dict):
            raise RewardConfigError(f"a reward entry must be a mapping, got {data!r}")
        unknown = sorted(set(data) - set(SPEC_KEYS))
        if unknown:
            raise RewardConfigError(
                f"unknown key(s) {', '.join(map(repr, unknown))} in reward entry {data!r};"
                f" accepted keys: {', '.join(SPEC_KEYS)}"
            )
        return cls(**data)


# A reward spec has fields called `class_path` and `init_args`, which jsonargparse
# would otherwise read as a subclass specification; as a registered type, a YAML
# mapping goes straight to `RewardSpec.parse`. Not `from_dict`: jsonargparse would turn a
# lookup error into a parser error with usage text; raised from GRPOModule's `__init__`
# (which calls `from_dict`), it reaches the CLI as one `error:` line.
register_type(
    RewardSpec,
    serializer=RewardSpec.to_dict,
    deserializer=RewardSpec.parse,
    deserializer_exceptions=(RewardConfigError, TypeError),
)


def available() -> list[RewardEntry]:
    """Every registered reward, sorted by name then distribution; imports no plugin."""
    global _entries
    if _entries is None:
        found = []
        for ep in metadata.entry_points(group=GROUP):
            dist = getattr(ep, "dist", None)
            found.append(
                RewardEntry(
                    name=ep.name,
                    dist=dist.name if dist is not None else None,
                    version=dist.version if dist is not None else None,
                    entry_point=ep,
                )
            )
        _entries = sorted(found, key=lambda e: (e.name, canonical_dist(e.dist or "")))
    return list(_entries)


@contextmanager
def names_not_looked_up() -> Iterator[None]:
    """Build reward specs without checking that their names are installed: for code
    that rebuilds a module to read its weights (`pebr export`) and runs no reward."""
    token = _look_up_names.set(False)
    try:
        yield
    finally:
        _look_up_names.reset(token)


def clear_cache() -> None:
    """Forget the entry-point table, so that the next lookup reads it again (for tests)."""
    global _entries
    _entries = None


def display_names() -> list[str]:
    """The names a config can use: plain where unique and for built-ins, `dist:name`
    where names clash (a plugin using a built-in's name is reachable only that way)."""
    entries = available()
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.name] = counts.get(entry.name, 0) + 1
    shadows = {id(e) for e in shadowing()}
    return [
        e.name if e.builtin or (counts[e.name] == 1 and id(e) not in shadows) else e.qualified_name
        for e in entries
    ]


def shadowing() -> list[RewardEntry]:
    """Plugin entries registered under a built-in reward's name, or that name in other
    case (`Accuracy`): reachable as dist:name only, so no case slip picks a plugin."""
    entries = available()
    reserved = {e.name.casefold() for e in entries if e.builtin}
    return [e for e in entries if e.name.casefold() in reserved and not e.builtin]


def resolve(name: str) -> RewardEntry:
    """The entry registered as `name` or `dist:name`, without importing it.

    A plain built-in name always means the built-in, whatever plugins register.
    """
    entries = available()
    if ":" in name:
        dist, _, short = name.partition(":")
        matches = [
            e
            for e in entries
            if e.name == short and e.dist and canonical_dist(e.dist) == canonical_dist(dist)
        ]
    else:
        matches = [e for e in entries if e.name == name]
        matches = [e for e in matches if e.builtin] or matches
        builtin = [e.name for e in entries if e.builtin and e.name.casefold() == name.casefold()]
        if builtin and not any(e.builtin for e in matches):
            plugins = ", ".join(repr(e.qualified_name) for e in matches) or "none installed"
            raise RewardLookupError(
                f"reward name {name!r} differs from the built-in {builtin[0]!r} only in case: "
                f"write {builtin[0]!r} for the built-in, or a plugin's as dist:name ({plugins})"
            )
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        choices = ", ".join(e.qualified_name for e in matches)
        raise RewardLookupError(
            f"reward name {name!r} is provided by {len(matches)} distributions; "
            f"name one of them as dist:name: {choices}"
        )
    names = display_names()
    candidates = [e.qualified_name for e in entries] if ":" in name else names
    close = difflib.get_close_matches(name, candidates, n=1)
    hint = f" did you mean {close[0]!r}?" if close else ""
    raise RewardLookupError(
        f"unknown reward {name!r};{hint} installed: {', '.join(names) or '(none)'} "
        f"(entry-point group {GROUP!r}; `pebr rewards list` shows where each comes from)"
    )


def load_class(name: str) -> type:
    """Import and check the class registered as `name` (or `dist:name`)."""
    return resolve(name).load()


def import_class_path(class_path: str) -> type:
    """Import and check the class at a dotted path (`pkg.mod.Class` or `pkg.mod:Class`)."""
    origin = f"class_path {class_path!r}"
    try:
        target = import_dotted(class_path)
    except NotDotted:
        raise PluginValidationError(
            f"{origin} is not a dotted path to a class, like my_pkg.rewards.MyReward"
        ) from None
    except Exception as err:
        raise PluginValidationError(
            f"reward {origin} failed to import: {type(err).__name__}: {err}"
        ) from err
    validate_reward_class(target, origin)
    return target


def build_reward(spec: RewardSpec) -> Any:
    """Import, check and construct the reward a spec names."""
    if spec.name is not None:
        entry = resolve(spec.name)
        cls, origin = entry.load(), entry.origin
    else:
        assert spec.class_path is not None
        cls, origin = import_class_path(spec.class_path), f"class_path {spec.class_path!r}"
    try:
        reward = cls(**spec.init_args)
    except Exception as err:
        raise PluginValidationError(
            f"reward {spec.label} ({origin}) could not be constructed with init_args "
            f"{spec.init_args!r}: {type(err).__name__}: {err}"
        ) from err
    validate_reward_instance(reward, origin)
    return reward


def validate_reward_class(target: Any, origin: str) -> None:
    """Raise PluginValidationError unless `target` is a reward class (see protocol.py)."""
    where = f"reward {origin}"
    if not inspect.isclass(target):
        raise PluginValidationError(
            f"{where} points to a {type(target).__name__}, not a class; rewards are callable "
            "classes so that they pickle into worker processes"
        )
    name = getattr(target, "name", None)
    if name is not None and not isinstance(name, str) and not hasattr(name, "__get__"):
        raise PluginValidationError(
            f"{where}: class attribute `name` must be a str, got {type(name).__name__}"
        )
    call = _find_call(target)
    if call is None:
        raise PluginValidationError(
            f"{where}: class {target.__qualname__} is not callable: it defines no __call__"
        )
    problem = _signature_problem(call)
    if problem:
        raise PluginValidationError(
            f"{where}: {target.__qualname__}.__call__ {problem}; expected "
            "`def __call__(self, *, completions, samples, **context)`"
        )


def validate_reward_instance(reward: Any, origin: str) -> None:
    """Raise PluginValidationError unless a constructed reward has a non-empty str `name`."""
    name = getattr(reward, "name", None)
    if not isinstance(name, str) or not name:
        got = "has none" if name is None else f"got {name!r}"
        raise PluginValidationError(
            f"reward {origin}: the reward needs a non-empty str `name` ({got}); set a class "
            'attribute `name = "my_reward"` or assign `self.name` in __init__'
        )


def _find_call(cls: type) -> Any:
    """The `__call__` a class defines or inherits (not the metaclass's), or None."""
    for klass in cls.__mro__:
        if "__call__" in vars(klass):
            return vars(klass)["__call__"]
    return None


def _signature_problem(call: Any) -> str | None:
    """Why `__call__` cannot take (completions=..., samples=..., **context), or None."""
    drop_first = True
    if isinstance(call, staticmethod):
        call, drop_first = call.__func__, False
    elif isinstance(call, classmethod):
        call = call.__func__
    if not callable(call):
        return f"is a {type(call).__name__}, not a function"
    try:
        sig = inspect.signature(call)
    except (TypeError, ValueError):
        return None  # a builtin without a signature: nothing to check
    params = list(sig.parameters.values())
    if drop_first:
        if not params or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            return f"has signature {sig}, with no `self` parameter"
        params = params[1:]
    sig = sig.replace(parameters=params)
    try:
        sig.bind(completions=[], samples=[], pebr_unknown_context_key=None)
    except TypeError as err:
        return f"has signature {sig}, which cannot be called with keyword arguments ({err})"
    return None
