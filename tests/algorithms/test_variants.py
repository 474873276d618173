"""Algorithm variants by class path: built from YAML, checked with errors that name the
key, and stored in checkpoints as plain data."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from pebr_lightning.algorithms.advantages import AdvantageEstimator, LeaveOneOut
from pebr_lightning.algorithms.loss_config import GRPOLossConfig
from pebr_lightning.algorithms.variants import build_variant
from pebr_lightning.errors import PebrError, wrapped_user_error

REPO = Path(__file__).resolve().parents[2]
KEY = "model.init_args.loss.advantage"


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"class_path": "Nope"}, "'Nope' is not a dotted path to a class"),
        ({"class_path": "no_such_pkg.Est"}, "failed to import: ModuleNotFoundError"),
        ({"class_path": "math.pi"}, "is a float, not a class"),
        (
            {
                "class_path": "pebr_lightning.algorithms.advantages.LeaveOneOut",
                "init_args": {"x": 1},
            },
            "could not be constructed with init_args {'x': 1}: TypeError",
        ),
        ({"class_path": "collections.OrderedDict"}, "is not a AdvantageEstimator (Maps rewards"),
        ({"class_path": "a.B", "args": {}}, "unknown keys ['args']"),
        ({"init_args": {}}, ".class_path must be a dotted path to a class, got None"),
        ("a.B", "must be a mapping with class_path"),
    ],
    ids=[
        "no-dot",
        "no-module",
        "not-a-class",
        "bad-args",
        "wrong-kind",
        "typo-key",
        "no-path",
        "str",
    ],
)
def test_a_bad_variant_is_one_error_naming_the_key(spec, message):
    with pytest.raises(PebrError) as info:
        build_variant(spec, AdvantageEstimator, KEY)
    assert str(info.value).startswith(KEY), str(info.value)
    assert message in str(info.value)


def _overlay(tmp_path: Path, loss: str) -> Path:
    path = tmp_path / "variant.yaml"
    path.write_text(f"model:\n  init_args:\n    loss:\n{textwrap.indent(loss, ' ' * 6)}")
    return path


def test_rloo_and_a_users_own_estimator_are_chosen_from_yaml(tmp_path, monkeypatch):
    """Through LightningCLI, as `pebr fit --config` reads it; the user's class lives in
    a module of their own that no pebr file names."""
    from pebr_lightning.cli import cli

    base = str(REPO / "configs" / "demo" / "reasoning.yaml")
    rloo = _overlay(
        tmp_path, "advantage:\n  class_path: pebr_lightning.algorithms.advantages.LeaveOneOut\n"
    )
    built = cli(["--config", base, "--config", str(rloo)], run=False)
    assert isinstance(built.model.advantage, LeaveOneOut)
    # what checkpoints keep: the path, as data
    assert built.model.hparams["loss"]["advantage"]["class_path"].endswith(".LeaveOneOut")

    (tmp_path / "my_estimators.py").write_text(
        "class Sign:\n"
        "    def __init__(self, scale=1.0):\n"
        "        self.scale = scale\n"
        "    def __call__(self, rewards, group_size):\n"
        "        return self.scale * (rewards - rewards.view(-1, group_size).mean(-1)"
        ".repeat_interleave(group_size)).sign()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    own = _overlay(
        tmp_path, "advantage:\n  class_path: my_estimators.Sign\n  init_args: {scale: 2.0}\n"
    )
    built = cli(["--config", base, "--config", str(own)], run=False)
    assert type(built.model.advantage).__name__ == "Sign" and built.model.advantage.scale == 2.0
    out = built.model.advantage(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2)
    assert out.tolist() == [2.0, -2.0, 0.0, 0.0]


def _cli_error(tmp_path: Path, loss: str) -> str:
    """The one-line error `pebr fit` stops with for the demo reasoning config with `loss`
    overlaid."""
    from pebr_lightning.cli import cli

    base = str(REPO / "configs" / "demo" / "reasoning.yaml")
    with pytest.raises(BaseException) as info:
        cli(["--config", base, "--config", str(_overlay(tmp_path, loss))], run=False)
    cause = wrapped_user_error(info.value)
    assert cause is not None, info.value
    return str(cause)


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (
            "advantage_scale: none\n",
            "loss.advantage_scale (none) was replaced by loss.advantage; write advantage: "
            "{class_path: pebr_lightning.algorithms.advantages.GroupCentred}",
        ),
        (
            "loss_type: bnpo\n",
            "loss.loss_type (bnpo) was replaced by loss.reduction; write reduction: "
            "{class_path: pebr_lightning.algorithms.reductions.TokenMean}",
        ),
    ],
    ids=["advantage_scale", "loss_type"],
)
def test_a_former_key_stops_naming_the_new_one(loss, message, tmp_path):
    assert _cli_error(tmp_path, loss) == message


def test_a_config_pickled_before_the_change_loads_with_the_estimator_it_meant(tmp_path):
    """A GRPOLossConfig saved with advantage_scale (before 2026-12-05), read back the way
    checkpoints are read: weights_only, with pebr's config classes allowed."""
    from pebr_lightning.export.export import _torch_load

    old = GRPOLossConfig(beta=0.02)
    state = dict(old.__dict__)
    del state["advantage"]
    state["advantage_scale"] = "batch"
    object.__setattr__(old, "__dict__", state)  # the attributes an old pickle holds
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": {"loss": old}}, path)
    loaded = _torch_load(path)["hyper_parameters"]["loss"]
    assert loaded.beta == 0.02 and loaded.advantage_scale is None
    assert loaded.advantage == {
        "class_path": "pebr_lightning.algorithms.advantages.BatchNormalized",
        "init_args": {},
    }


@pytest.mark.parametrize(
    ("loss_type", "expected"), [("grpo", "SequenceMean"), ("dapo", "GlobalTokenMean")]
)
def test_a_config_pickled_with_loss_type_loads_with_the_reduction_it_meant(
    loss_type, expected, tmp_path
):
    from pebr_lightning.export.export import _torch_load

    old = GRPOLossConfig(beta=0.03)
    state = dict(old.__dict__)
    del state["reduction"]
    state["loss_type"] = loss_type
    object.__setattr__(old, "__dict__", state)  # the attributes a pre-2026-12-06 pickle holds
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": {"loss": old}}, path)
    loaded = _torch_load(path)["hyper_parameters"]["loss"]
    assert loaded.beta == 0.03 and loaded.loss_type is None
    assert loaded.reduction == {
        "class_path": f"pebr_lightning.algorithms.reductions.{expected}",
        "init_args": {},
    }
    assert type(loaded.build_reduction()).__name__ == expected


def test_a_reduction_of_your_own_is_chosen_by_class_path_and_used_by_the_update(
    tmp_path, monkeypatch, shapes_data
):
    """A reduction class in the user's own module, named in YAML: the module builds it
    and every update reduces through it (it counts its calls)."""
    from pebr_lightning.cli import cli

    (tmp_path / "my_reductions.py").write_text(
        "CALLS = []\n"
        "class Halved:\n"
        "    def __init__(self, factor=0.5):\n"
        "        self.factor = factor\n"
        "    def reduce(self, per_token, valid, counts):\n"
        "        CALLS.append(int(valid.sum()))\n"
        "        return self.factor * per_token.sum() / valid.sum().clamp(min=1)\n"
        "    def share(self, mask, tokens, seqs):\n"
        "        return float(mask.sum()) / max(tokens, 1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    own = _overlay(
        tmp_path, "reduction:\n  class_path: my_reductions.Halved\n  init_args: {factor: 0.25}\n"
    )
    base = str(REPO / "configs" / "demo" / "reasoning.yaml")
    args = [
        f"--data.init_args.train_manifest={shapes_data['train']}",
        "--data.init_args.batch_size=2",
        "--trainer.max_steps=1",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.callbacks=[]",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        # a reward with spread on a random model's text, so that the step is not skipped
        '--model.init_args.rewards=[{"class_path": '
        '"pebr_demo.testing.spread_reward.VowelShareReward", "weight": 1.0}]',
        "--model.init_args.sampling.max_new_tokens=8",
    ]
    built = cli(["--config", base, "--config", str(own), *args], run=False)
    reduction = built.model.loss_cfg.build_reduction()
    assert type(reduction).__name__ == "Halved" and reduction.factor == 0.25
    per_token = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    valid = torch.tensor([[True, True], [True, False]])
    assert reduction.reduce(per_token, valid, None).item() == pytest.approx(0.25 * 6 / 3)
    import my_reductions

    my_reductions.CALLS.clear()
    built.trainer.fit(built.model, datamodule=built.datamodule)
    # one step on 2 prompts x 8: every micro-batch was reduced through the user's class
    assert my_reductions.CALLS and all(tokens > 0 for tokens in my_reductions.CALLS)


def test_a_reduction_class_path_that_is_not_a_reduction_is_refused_at_construction(tmp_path):
    # an advantage estimator where a reduction belongs: a likely slip
    path = "pebr_lightning.algorithms.advantages.LeaveOneOut"
    cause = _cli_error(tmp_path, f"reduction:\n  class_path: {path}\n")
    assert f"model.init_args.loss.reduction: class_path '{path}'" in cause
    assert "is not a LossReduction" in cause
