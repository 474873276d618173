"""The reward registry on fake distributions: lookup, clashes, laziness, load-time checks.

Each fake distribution is a real `*.dist-info` folder (METADATA + entry_points.txt)
with its plugin modules beside it, in a temporary folder put first on sys.path, so
`importlib.metadata` finds it exactly as it finds an installed package.
"""

from __future__ import annotations

import importlib
import math
import sys
import textwrap
from pathlib import Path

import jsonargparse
import pytest
import yaml

from pebr_lightning.rewards import registry
from pebr_lightning.rewards.combine import load_rewards
from pebr_lightning.rewards.registry import (
    PluginValidationError,
    RewardConfigError,
    RewardLookupError,
    RewardSpec,
)

REPO = Path(__file__).resolve().parents[2]

GOOD = '''
class Good:
    """A reward that scores every completion 1."""

    name = "{name}"

    def __init__(self, value=1.0):
        self.value = value

    def __call__(self, *, completions, samples, **context):
        return [self.value] * len(completions)
'''


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`add(dist, entries, modules, version)`: install a fake distribution for this test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.clear_cache()
    before = set(sys.modules)

    def add(dist: str, entries: dict[str, str], modules: dict[str, str], version: str = "1.0"):
        info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        table = "".join(f"{name} = {value}\n" for name, value in entries.items())
        (info / "entry_points.txt").write_text(f"[{registry.GROUP}]\n{table}")
        for module, source in modules.items():
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        registry.clear_cache()

    yield add
    registry.clear_cache()
    for module in set(sys.modules) - before:
        if str(tmp_path) in str(getattr(sys.modules[module], "__file__", "")):
            del sys.modules[module]


def test_lists_and_loads_a_fake_plugin(plugins) -> None:
    plugins(
        "fake-rewards",
        {"fake_good": "fake_good_mod:Good"},
        {"fake_good_mod": GOOD.format(name="fake_good")},
    )
    entry = registry.resolve("fake_good")
    assert (entry.dist, entry.version) == ("fake-rewards", "1.0")
    assert "fake_good" in registry.display_names()
    cls = registry.load_class("fake_good")
    reward = registry.build_reward(RewardSpec(name="fake_good", init_args={"value": 0.5}))
    assert isinstance(reward, cls)
    assert reward(completions=["a", "b"], samples=[{}, {}]) == [0.5, 0.5]


def test_listing_and_loading_another_name_import_no_plugin(plugins, tmp_path: Path) -> None:
    marker = tmp_path / "imported.txt"
    bomb = f"""
    import pathlib
    pathlib.Path({str(marker)!r}).write_text("imported")
    raise RuntimeError("this plugin is broken")
    """
    plugins(
        "lazy-dist",
        {"lazy_bomb": "lazy_bomb_mod:Bomb", "lazy_good": "lazy_good_mod:Good"},
        {"lazy_bomb_mod": bomb, "lazy_good_mod": GOOD.format(name="lazy_good")},
    )
    assert {"lazy_bomb", "lazy_good"} <= set(registry.display_names())
    registry.resolve("lazy_bomb")
    rewards = load_rewards([RewardSpec(name="lazy_good")])
    assert rewards.names == ["lazy_good"]
    assert "lazy_good_mod" in sys.modules
    assert "lazy_bomb_mod" not in sys.modules
    assert not marker.exists()

    with pytest.raises(PluginValidationError) as info:
        load_rewards([RewardSpec(name="lazy_bomb")])
    message = str(info.value)
    assert "'lazy-dist'" in message and "lazy_bomb = lazy_bomb_mod:Bomb" in message
    assert "RuntimeError: this plugin is broken" in message
    assert marker.exists()


def test_entry_points_are_looked_up_once(plugins, monkeypatch: pytest.MonkeyPatch) -> None:
    plugins("once-dist", {"once": "once_mod:Good"}, {"once_mod": GOOD.format(name="once")})
    calls = []
    real = registry.metadata.entry_points

    def counting(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(registry.metadata, "entry_points", counting)
    registry.available()
    registry.display_names()
    registry.resolve("once")
    registry.build_reward(RewardSpec(name="once"))
    assert calls == [{"group": "pebr_lightning.rewards"}]
    registry.clear_cache()
    registry.available()
    assert len(calls) == 2


def test_a_clashing_name_needs_the_distribution(plugins) -> None:
    plugins("Acme-Rewards", {"shared": "acme_mod:Good"}, {"acme_mod": GOOD.format(name="shared")})
    plugins(
        "other.rewards",
        {"shared": "other_mod:Good", "unique": "other_mod:Good"},
        {"other_mod": GOOD.format(name="shared")},
        version="2.3",
    )
    with pytest.raises(RewardLookupError) as info:
        registry.resolve("shared")
    assert "acme-rewards:shared" in str(info.value)
    assert "other-rewards:shared" in str(info.value)

    # The distribution part is normalised as packaging does it: case, - _ . all alike.
    assert registry.resolve("acme_rewards:shared").dist == "Acme-Rewards"
    assert registry.resolve("ACME.rewards:shared").dist == "Acme-Rewards"
    assert registry.resolve("Other_Rewards:shared").version == "2.3"
    assert registry.resolve("unique").dist == "other.rewards"
    names = registry.display_names()
    assert {"acme-rewards:shared", "other-rewards:shared", "unique"} <= set(names)
    assert "shared" not in names
    reward = registry.build_reward(RewardSpec(name="other-rewards:shared"))
    assert type(reward).__module__ == "other_mod"


def test_an_unknown_name_lists_the_available_ones(plugins) -> None:
    plugins("known-dist", {"known_one": "known_mod:Good"}, {"known_mod": GOOD.format(name="k")})
    with pytest.raises(RewardLookupError, match=r"^unknown reward 'nope'; installed: .*known_one"):
        registry.resolve("nope")
    with pytest.raises(RewardLookupError, match=r"^unknown reward 'missing-dist:known_one';"):
        registry.resolve("missing-dist:known_one")


def test_an_unknown_name_suggests_the_nearest_installed_one(plugins) -> None:
    plugins("known-dist", {"known_one": "known_mod:Good"}, {"known_mod": GOOD.format(name="k")})
    with pytest.raises(RewardLookupError) as info:
        registry.resolve("acuracy")
    assert str(info.value).startswith(
        "unknown reward 'acuracy'; did you mean 'accuracy'? installed: accuracy, clip_score,"
    )
    with pytest.raises(RewardLookupError, match=r"did you mean 'known-dist:known_one'\?"):
        registry.resolve("known-dst:known_one")


def test_a_grpo_module_with_a_misspelt_reward_fails_as_it_is_built() -> None:
    """Built, not trained: the name is looked up in __init__, which LightningCLI runs
    before it builds the Trainer (tests/test_cli.py runs that through `pebr fit`)."""
    from pebr_lightning.modules.grpo import GRPOModule

    for spec in ({"name": "acuracy"}, RewardSpec(name="acuracy")):
        with pytest.raises(RewardLookupError, match="did you mean 'accuracy'"):
            GRPOModule(rewards=[{"name": "format"}, spec])
    assert GRPOModule(rewards=[RewardSpec(name="accuracy")]).reward_specs[0].name == "accuracy"
    with registry.names_not_looked_up():  # how `pebr export` rebuilds a module
        assert GRPOModule(rewards=[{"name": "uninstalled"}]).reward_specs[0].name == "uninstalled"
    with pytest.raises(RewardLookupError):
        RewardSpec.from_dict({"name": "uninstalled"})


EVIL = """
class Evil:
    \"\"\"Scores everything 1: a plugin that took a built-in's name.\"\"\"

    name = "format"

    def __call__(self, *, completions, samples, **context):
        return [1.0] * len(completions)
"""


def test_a_plugin_cannot_take_a_built_in_name(plugins) -> None:
    """`pebr-evil` registers `format`: plain `format` stays the built-in in every
    shipped config, and the plugin's reward is reachable as `pebr-evil:format`."""
    from pebr_lightning.rewards.format import FormatReward

    plugins("pebr-evil", {"format": "evil_mod:Evil"}, {"evil_mod": EVIL}, version="6.6")
    entry = registry.resolve("format")
    assert entry.builtin and registry.canonical_dist(entry.dist) == "pebr-lightning"
    assert isinstance(registry.build_reward(RewardSpec(name="format")), FormatReward)
    evil = registry.build_reward(RewardSpec(name="pebr-evil:format"))
    assert type(evil).__module__ == "evil_mod"
    assert isinstance(registry.build_reward(RewardSpec(name="pebr-lightning:format")), FormatReward)
    names = registry.display_names()
    assert "format" in names and "pebr-evil:format" in names
    assert [e.qualified_name for e in registry.shadowing()] == ["pebr-evil:format"]

    configs = sorted((REPO / "configs").rglob("*.yaml"))
    named = [name for config in configs for name in _reward_names(yaml.safe_load(config.open()))]
    assert "format" in named
    for name in named:
        assert registry.resolve(name).builtin, name


def test_a_plugin_named_like_a_built_in_in_other_case_is_no_stand_in(plugins) -> None:
    """Before: a plugin registering `Accuracy` was listed as a plain name beside the
    built-in `accuracy`, and a config that wrote `Accuracy` got the plugin without a
    word. Now it is shadowing (dist:name only) and the plain name is refused."""
    plugins("pebr-evil", {"Accuracy": "evil_mod:Evil"}, {"evil_mod": EVIL})
    assert [e.qualified_name for e in registry.shadowing()] == ["pebr-evil:Accuracy"]
    assert "pebr-evil:Accuracy" in registry.display_names()
    assert "Accuracy" not in registry.display_names()
    with pytest.raises(RewardLookupError, match="differs from the built-in 'accuracy' only in"):
        registry.resolve("Accuracy")
    assert registry.resolve("accuracy").builtin
    assert registry.resolve("pebr-evil:Accuracy").dist == "pebr-evil"


def _reward_names(node) -> list[str]:
    """The `name` of every entry of every `rewards` list in a parsed YAML file."""
    if isinstance(node, list):
        return [name for item in node for name in _reward_names(item)]
    if not isinstance(node, dict):
        return []
    own = [r["name"] for r in node.get("rewards") or [] if isinstance(r, dict) and "name" in r]
    return own + [name for value in node.values() for name in _reward_names(value)]


def test_two_plugins_clashing_with_a_built_in_and_each_other(plugins) -> None:
    plugins("pebr-evil", {"format": "evil_mod:Evil"}, {"evil_mod": EVIL})
    plugins("pebr-evil-two", {"format": "evil_mod:Evil", "twin": "evil_mod:Evil"}, {})
    plugins("pebr-twin", {"twin": "evil_mod:Evil"}, {})
    assert registry.resolve("format").builtin
    assert registry.resolve("pebr-evil-two:format").dist == "pebr-evil-two"
    assert len(registry.shadowing()) == 2
    # no built-in `twin`: the clash between two plugins stays an error naming both
    with pytest.raises(RewardLookupError, match="pebr-evil-two:twin, pebr-twin:twin"):
        registry.resolve("twin")
    assert registry.resolve("pebr-twin:twin").dist == "pebr-twin"


BAD_PLUGINS = {
    "import error": ("import nonexistent_package_xyz", "ModuleNotFoundError"),
    "missing class": ("", "AttributeError"),
    "not a class": ("def Bad(completions, samples, **context):\n    return []", "not a class"),
    "not callable": ("class Bad:\n    name = 'bad'", "not callable"),
    "name not a str": (
        "class Bad:\n    name = 3\n    def __call__(self, *, completions, samples, **context):\n"
        "        return []",
        "class attribute `name` must be a str",
    ),
    "no name": (
        "class Bad:\n    def __call__(self, *, completions, samples, **context):\n"
        "        return []",
        "needs a non-empty str `name`",
    ),
    "no **context": (
        "class Bad:\n    name = 'bad'\n    def __call__(self, *, completions, samples):\n"
        "        return []",
        "cannot be called with keyword arguments",
    ),
    "no samples": (
        "class Bad:\n    name = 'bad'\n    def __call__(self, completions):\n        return []",
        "cannot be called with keyword arguments",
    ),
    "positional-only": (
        "class Bad:\n    name = 'bad'\n"
        "    def __call__(self, completions, samples, /, **context):\n        return []",
        "cannot be called with keyword arguments",
    ),
    "extra required argument": (
        "class Bad:\n    name = 'bad'\n"
        "    def __call__(self, *, completions, samples, threshold, **context):\n        return []",
        "cannot be called with keyword arguments",
    ),
    "constructor fails": (
        "class Bad:\n    name = 'bad'\n    def __init__(self):\n        raise OSError('no model')\n"
        "    def __call__(self, *, completions, samples, **context):\n        return []",
        "could not be constructed",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PLUGINS))
def test_bad_plugins_fail_at_load_naming_dist_and_entry_point(plugins, case: str) -> None:
    source, expected = BAD_PLUGINS[case]
    module = "bad_" + case.replace(" ", "_").replace("*", "").replace("-", "_")
    plugins("bad-rewards", {"bad": f"{module}:Bad"}, {module: source}, version="0.3")
    with pytest.raises(PluginValidationError) as info:
        registry.build_reward(RewardSpec(name="bad"))
    message = str(info.value)
    assert expected in message
    assert "distribution 'bad-rewards' 0.3" in message
    assert f"entry point 'bad = {module}:Bad'" in message


@pytest.mark.parametrize(
    "signature",
    [
        "(self, *, completions, samples, **context)",
        "(self, completions, samples, **context)",
        "(self, completions=None, samples=None, **kw)",
        "(self, **context)",
    ],
)
def test_call_signatures_that_accept_the_keywords_pass(plugins, signature: str) -> None:
    module = f"sig_{abs(hash(signature))}"
    source = f"class Ok:\n    name = 'ok'\n    def __call__{signature}:\n        return []\n"
    plugins("sig-dist", {"ok": f"{module}:Ok"}, {module: source})
    assert registry.build_reward(RewardSpec(name="ok")).name == "ok"


def test_name_set_in_init_is_accepted(plugins) -> None:
    source = (
        "class Named:\n    def __init__(self, tag='x'):\n        self.name = 'named_' + tag\n"
        "    def __call__(self, *, completions, samples, **context):\n        return []\n"
    )
    plugins("named-dist", {"named": "named_mod:Named"}, {"named_mod": source})
    assert registry.build_reward(RewardSpec(name="named", init_args={"tag": "y"})).name == "named_y"


def test_class_path_loads_an_unpackaged_class(plugins) -> None:
    plugins("cp-dist", {}, {"cp_mod": GOOD.format(name="cp")})
    for path in ("cp_mod.Good", "cp_mod:Good"):
        assert registry.build_reward(RewardSpec(class_path=path)).name == "cp"
    with pytest.raises(PluginValidationError, match=r"class_path 'cp_mod.Missing'.*AttributeError"):
        registry.build_reward(RewardSpec(class_path="cp_mod.Missing"))
    with pytest.raises(PluginValidationError, match="not a dotted path"):
        registry.build_reward(RewardSpec(class_path="Good"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of `name`"),
        ({"name": "a", "class_path": "m.C"}, "exactly one of `name`"),
        ({"name": ""}, "non-empty string"),
        ({"name": "a", "weight": math.inf}, "finite"),
        ({"name": "a", "weight": math.nan}, "finite"),
        ({"name": "a", "weight": -0.1}, ">= 0"),
        ({"name": "a", "weight": True}, "must be a number"),
        ({"name": "a", "weight": "0.4"}, "must be a number"),
        ({"name": "a", "init_args": [1]}, "init_args must be a mapping"),
        ({"name": "a", "on_error": "ignore"}, "on_error must be one of raise, none"),
    ],
)
def test_reward_spec_rejects_bad_entries(kwargs: dict, match: str) -> None:
    with pytest.raises(RewardConfigError, match=match):
        RewardSpec(**kwargs)


def test_reward_spec_round_trips_through_a_plain_dict() -> None:
    spec = RewardSpec(
        name="keyword", weight=0.4, init_args={"fields": ["objects"]}, on_error="none"
    )
    data = spec.to_dict()
    assert data == {
        "name": "keyword",
        "weight": 0.4,
        "init_args": {"fields": ["objects"]},
        "on_error": "none",
    }
    data["init_args"]["fields"].append("numbers")  # a copy: the spec is unaffected
    assert spec.init_args == {"fields": ["objects"]}
    assert RewardSpec.from_dict(spec.to_dict()) == spec
    assert RewardSpec(class_path="m.C").to_dict()["class_path"] == "m.C"
    assert "name" not in RewardSpec(class_path="m.C").to_dict()
    assert RewardSpec.from_dict("format") == RewardSpec(name="format")
    with pytest.raises(RewardConfigError, match=r"unknown key\(s\) 'wieght'.*accepted keys"):
        RewardSpec.from_dict({"name": "a", "wieght": 1})


def test_jsonargparse_parses_a_list_of_reward_specs_from_yaml() -> None:
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--rewards", type=list[RewardSpec])
    cfg = parser.parse_string(
        textwrap.dedent(
            """
            rewards:
              - name: clip_score
                weight: 0.4
                init_args: {model: qihoo360/fg-clip-large, image_size: 336}
              - name: keyword
                weight: 0.4
              - class_path: my_pkg.rewards.MyReward
                weight: 0.2
                on_error: none
                init_args:
                  nested: {a: [1, 2]}
            """
        )
    )
    assert cfg.rewards == [
        RewardSpec(
            name="clip_score",
            weight=0.4,
            init_args={"model": "qihoo360/fg-clip-large", "image_size": 336},
        ),
        RewardSpec(name="keyword", weight=0.4),
        RewardSpec(
            class_path="my_pkg.rewards.MyReward",
            weight=0.2,
            on_error="none",
            init_args={"nested": {"a": [1, 2]}},
        ),
    ]
    dumped = parser.dump(cfg)
    assert parser.parse_string(dumped).rewards == cfg.rewards


def test_jsonargparse_reports_a_bad_reward_entry() -> None:
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--rewards", type=list[RewardSpec])
    with pytest.raises(jsonargparse.ArgumentError, match="on_error must be one of"):
        parser.parse_string("rewards:\n  - {name: format, on_error: ignore}\n")
