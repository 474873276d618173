"""GRPO optimises: it raises a reward it can move, and lowers the same reward negated.

RL code fails silently: a flipped advantage sign or a loss mask shifted by one token
still trains, logs finite numbers and passes every shape check. These runs fail on
such bugs because they check the direction and the place of learning, from the
embedded tiny model (random init, fully trained, 30 steps of 4 prompts x 8):

- the vowel share of 12-token completions (testing/spread_reward.py) must rise, and
  fall when the reward is negated: a flipped advantage sign swaps the two;
- the first (and only) token starting with a vowel must become likely: the loss
  mask is the whole signal there, so a mask shifted one token either way leaves
  nothing to learn from.

Planted by hand when these were written (CHANGELOG, docs/RESULTS.md): negating the
advantages in `policy_update` failed both directions (0.36 -> 0.12 when told to
raise); padding the loss mask one token to the right held the single-token reward at
0.10 -> 0.15 against 0.12 -> 0.58. Log-probs taken one position late (the state
after a token instead of before it) are *not* caught here: with tied embeddings the
tiny model learns these rewards as token preferences either way, so that bug is
pinned by the exact log-prob tests (tests/models/test_shared_prompt.py).
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest

from pebr_lightning.data.datamodule import ManifestDataModule
from pebr_lightning.models.policy import PolicySpec
from pebr_lightning.models.rollout import SamplingConfig
from pebr_lightning.modules.grpo import GRPOLossConfig, GRPOModule
from pebr_lightning.modules.grpo_update import UpdateConfig
from pebr_lightning.modules.optim import OptimConfig

STEPS = 30
WINDOW = 6  # steps averaged at each end: single steps are noisy
MARGIN = 0.04  # vowel-share points between the first and last window


def train(
    tiny_path,
    shapes_data,
    tmp_path: Path,
    reward: str,
    max_new_tokens: int,
    advantage: str = "GroupNormalized",
    **init_args,
) -> list[float]:
    """The mean reward of each step of a short GRPO run with one reward of testing/."""
    name = {"VowelShareReward": "vowel_share", "LeadingVowelReward": "leading_vowel"}[reward]
    module = GRPOModule(
        policy=PolicySpec(model=str(tiny_path), lora=None),
        rewards=[
            {
                "class_path": f"pebr_demo.testing.spread_reward.{reward}",
                "weight": 1.0,
                "init_args": init_args,
            }
        ],
        sampling=SamplingConfig(
            group_size=8, temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens
        ),
        loss=GRPOLossConfig(
            beta=0.0,
            advantage={"class_path": f"pebr_lightning.algorithms.advantages.{advantage}"},
        ),
        optim=OptimConfig(lr=2e-3, weight_decay=0.0, schedule="constant"),
        log_samples_every_n_steps=0,
        update=UpdateConfig(micro_batch_size=32),
    )
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = ManifestDataModule(train_manifest=str(shapes_data["train"]), batch_size=4)
    trainer.fit(module, datamodule=data)
    (path,) = tmp_path.rglob("metrics.csv")
    by_step = {}
    for row in csv.DictReader(path.open()):
        if row.get(f"reward/{name}/mean"):
            by_step[int(row["step"])] = float(row[f"reward/{name}/mean"])
    values = [by_step[s] for s in sorted(by_step)]
    assert len(values) == STEPS, f"expected a logged reward per step, got {len(values)}"
    return values


def first_last(values: list[float]) -> tuple[float, float]:
    return sum(values[:WINDOW]) / WINDOW, sum(values[-WINDOW:]) / WINDOW


@pytest.mark.parametrize(
    "negate, advantage",
    [(False, "GroupNormalized"), (True, "GroupNormalized"), (False, "LeaveOneOut")],
    ids=["raise", "lower", "raise-rloo"],
)
def test_grpo_moves_a_movable_reward_in_the_direction_it_is_told(
    negate, advantage, tiny_path, shapes_data, tmp_path
):
    """With GRPO's advantages (the default) and with RLOO's, chosen by class path."""
    rewards = train(
        tiny_path,
        shapes_data,
        tmp_path,
        "VowelShareReward",
        max_new_tokens=12,
        advantage=advantage,
        negate=negate,
    )
    # The logged reward is what the trainer maximised; compare the share itself.
    first, last = first_last([-r for r in rewards] if negate else rewards)
    if negate:
        assert last < first - MARGIN, f"vowel share should fall: {first:.3f} -> {last:.3f}"
    else:
        assert last > first + MARGIN, f"vowel share should rise: {first:.3f} -> {last:.3f}"


def test_grpo_credits_the_token_the_reward_is_about(tiny_path, shapes_data, tmp_path):
    """One-token completions scored 1 when the token starts with a vowel (about 1 in 8
    of the tiny vocabulary's tokens at the start)."""
    first, last = first_last(
        train(tiny_path, shapes_data, tmp_path, "LeadingVowelReward", max_new_tokens=1)
    )
    assert last > first + 0.2, f"leading-vowel rate should rise: {first:.3f} -> {last:.3f}"
