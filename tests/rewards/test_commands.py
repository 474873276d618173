"""`pebr rewards list` and `pebr rewards check`, through the top-level `pebr` command."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from pebr_demo.data.synth import write_dataset
from pebr_lightning.cli import main
from pebr_lightning.rewards import registry

PLUGIN = '''
from pebr_lightning.rewards.protocol import RewardOutput


class AnswerReward:
    """Scores 1 when the reference answer occurs in the completion.

    A second docstring paragraph that the listing leaves out.
    """

    name = "cmd_answer"

    def __init__(self, bonus=0.0):
        self.bonus = bonus

    def __call__(self, *, completions, samples, **context):
        scores = [float(s["answer"] in c) + self.bonus for c, s in zip(completions, samples)]
        return RewardOutput(scores=scores, components={"chars": [len(c) for c in completions]})


class ShortReward:
    """Returns one score too few."""

    name = "cmd_short"

    def __call__(self, *, completions, samples, **context):
        return [1.0] * (len(completions) - 1)


class Unnamed:
    """Has no name."""

    def __call__(self, *, completions, samples, **context):
        return [1.0] * len(completions)
'''


@pytest.fixture
def plugin_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake distribution `cmd-rewards` 0.2 with three rewards and one that fails to import."""
    info = tmp_path / "cmd_rewards-0.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cmd-rewards\nVersion: 0.2\n")
    (info / "entry_points.txt").write_text(
        f"[{registry.GROUP}]\n"
        "cmd_answer = cmd_plugin_mod:AnswerReward\n"
        "cmd_short = cmd_plugin_mod:ShortReward\n"
        "cmd_unnamed = cmd_plugin_mod:Unnamed\n"
        "cmd_broken = cmd_broken_mod:Broken\n"
    )
    (tmp_path / "cmd_plugin_mod.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "cmd_broken_mod.py").write_text("raise ImportError('needs a GPU library')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    registry.clear_cache()
    yield tmp_path
    registry.clear_cache()
    for module in ("cmd_plugin_mod", "cmd_broken_mod"):
        sys.modules.pop(module, None)


def test_list_shows_fake_plugins_and_survives_a_broken_one(plugin_dist, capsys) -> None:
    assert main(["rewards", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "DISTRIBUTION", "VERSION", "DESCRIPTION"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows["cmd_answer"].split()[1:3] == ["cmd-rewards", "0.2"]
    assert rows["cmd_answer"].endswith(
        "Scores 1 when the reference answer occurs in the completion."
    )
    assert "(import failed: ImportError: needs a GPU library)" in rows["cmd_broken"]


def test_list_warns_about_a_plugin_using_a_built_in_name(plugin_dist, capsys) -> None:
    """A real second distribution, `pebr-evil`, registers `format`: listed as
    `pebr-evil:format` beside the built-in `format`, with one warning line naming it."""
    info = plugin_dist / "pebr_evil-6.6.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pebr-evil\nVersion: 6.6\n")
    (info / "entry_points.txt").write_text(f"[{registry.GROUP}]\nformat = cmd_plugin_mod:Unnamed\n")
    importlib.invalidate_caches()
    registry.clear_cache()

    assert main(["rewards", "list"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "warning: distribution 'pebr-evil' registers 'format', the name of a built-in reward: "
        "'format' stays the built-in, and this plugin's reward is 'pebr-evil:format'"
    ]
    rows = {line.split()[0]: line.split() for line in captured.out.splitlines()[1:]}
    assert rows["format"][1] == "pebr-lightning"
    assert rows["pebr-evil:format"][1:3] == ["pebr-evil", "6.6"]
    assert main(["rewards", "check", "format", "--n", "1"]) == 0  # the built-in
    assert "distribution 'pebr-lightning'" in capsys.readouterr().out


def test_check_passes_a_good_reward(plugin_dist, capsys) -> None:
    code = main(["rewards", "check", "cmd_answer", "--n", "2", "--init-args", '{"bonus": 0.5}'])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "entry point 'cmd_answer = cmd_plugin_mod:AnswerReward' of distribution" in out
    for rule in ("load and validate", "deterministic", "pickle round trip gives the same scores"):
        assert f"PASS  {rule}" in out
    assert "FAIL" not in out
    # 2 reference responses + 3 edge cases; bonus 0.5 on top of the answer match.
    assert "  reference     shapes-0-000000         1.5  chars=" in out
    assert "  empty         shapes-0-000000         0.5  chars=0" in out
    assert out.rstrip().endswith("all checks passed")


def test_check_fails_a_bad_reward(plugin_dist, capsys) -> None:
    assert main(["rewards", "check", "cmd_short", "--n", "2"]) == 1
    out = capsys.readouterr().out
    assert (
        "FAIL  returns a list or RewardOutput of the right length: returned 4 scores for 5" in out
    )
    assert "PASS  deterministic" in out
    assert out.rstrip().endswith("1 of 7 checks failed")


def test_check_fails_a_reward_that_does_not_validate(plugin_dist, capsys) -> None:
    assert main(["rewards", "check", "cmd_unnamed"]) == 1
    assert "FAIL  load and validate: " in capsys.readouterr().out


def test_check_takes_samples_from_a_manifest_and_a_class_path(plugin_dist, capsys) -> None:
    manifest = write_dataset(plugin_dist / "data", n=3, seed=5)
    argv = ["rewards", "check", "cmd_plugin_mod.AnswerReward", "--class-path"]
    assert main([*argv, "--manifest", str(manifest), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert f"batch: 1 samples of {manifest}" in out
    assert "shapes-5-000000" in out and "shapes-5-000001" not in out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["rewards", "check", "no_such_reward"], "unknown reward 'no_such_reward'"),
        (["rewards", "check", "cmd_answr"], "did you mean 'cmd_answer'?"),
        (["rewards", "check", "cmd_answer", "--init-args", "{bonus: 1}"], "not valid JSON"),
        (["rewards", "check", "cmd_answer", "--init-args", "[1]"], "must be a JSON object"),
    ],
)
def test_input_errors_exit_2_with_one_message(plugin_dist, capsys, argv, words) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err
    assert "Traceback" not in err
