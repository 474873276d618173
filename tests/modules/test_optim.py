"""The four AdamW variants of OptimConfig.name: real steps on CPU, real bitsandbytes."""

from __future__ import annotations

import warnings
from pathlib import Path

import bitsandbytes.optim as bnb_optim
import pytest
import torch
from torch import nn

from pebr_lightning.errors import PebrError
from pebr_lightning.modules.optim import OptimConfig, configure_adamw

REPO = Path(__file__).resolve().parents[2]
NAMES = ["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"]
CLASSES = {
    "adamw": torch.optim.AdamW,
    "adamw_8bit": bnb_optim.AdamW8bit,
    "paged_adamw": bnb_optim.PagedAdamW,
    "paged_adamw_8bit": bnb_optim.PagedAdamW8bit,
}
LR, WD, EPS = 1e-2, 0.1, 1e-8


def linear() -> nn.Linear:
    """64 x 64 = 4,096 weights: just big enough for bitsandbytes' 8-bit state
    (smaller tensors keep 32-bit state, min_8bit_size)."""
    torch.manual_seed(0)
    return nn.Linear(64, 64)


def optimizer_for(layer: nn.Module, name: str) -> torch.optim.Optimizer:
    cfg = OptimConfig(name=name, lr=LR, weight_decay=WD, eps=EPS, schedule="constant")
    with warnings.catch_warnings():
        # Paged optimizers warn on CPU that they fall back to ordinary memory.
        warnings.simplefilter("ignore", UserWarning)
        return configure_adamw(list(layer.named_parameters()), cfg, total_steps=10)["optimizer"]


def step(layer: nn.Linear, optimizer: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    layer(x).pow(2).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        optimizer.step()


@pytest.mark.parametrize("name", NAMES)
def test_builds_the_named_class_with_the_configured_settings(name):
    optimizer = optimizer_for(linear(), name)
    assert type(optimizer) is CLASSES[name]
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (LR, (0.9, 0.999), EPS)


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_keep_biases_out_of_weight_decay(name):
    layer = linear()
    groups = optimizer_for(layer, name).param_groups
    assert [g["weight_decay"] for g in groups] == [WD, 0.0]
    assert groups[0]["params"] == [layer.weight]
    assert groups[1]["params"] == [layer.bias]


@pytest.mark.parametrize("name", NAMES)
def test_first_step_is_the_hand_worked_adamw_step(name):
    """Adam's first step, worked by hand: m1 = (1 - b1) g and v1 = (1 - b2) g^2, so the
    bias-corrected m^ = g and v^ = g^2, and the update is lr * g / (|g| + eps), i.e.
    lr * sign(g) = +-0.01 per element. Decoupled decay shrinks the weight first:
        w1 = w0 * (1 - lr * wd) - lr * g / (|g| + eps)     (wd = 0.1 for the weight)
        b1 = b0 - lr * g_b / (|g_b| + eps)                 (no decay on the bias)
    8-bit state cannot change this step: the update's size does not depend on |g|."""
    layer = linear()
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    optimizer = optimizer_for(layer, name)
    step(layer, optimizer, seed=1)
    g, g_b = layer.weight.grad, layer.bias.grad
    expected_w = w0 * (1 - LR * WD) - LR * g / (g.abs() + EPS)
    expected_b = b0 - LR * g_b / (g_b.abs() + EPS)
    torch.testing.assert_close(layer.weight.detach(), expected_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.bias.detach(), expected_b, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("name", "state_dtype", "tolerance"),
    [
        ("adamw", torch.float32, 1e-6),
        ("paged_adamw", torch.float32, 1e-6),
        # 8-bit moments drift from fp32 ones: measured 1.3% of the distance moved
        # after 10 steps with bitsandbytes 0.50.2 on CPU.
        ("adamw_8bit", torch.uint8, 0.05),
        ("paged_adamw_8bit", torch.uint8, 0.05),
    ],
)
def test_ten_steps_track_torch_adamw(name, state_dtype, tolerance):
    layer, reference = linear(), linear()
    w0 = layer.weight.detach().clone()
    optimizer, torch_adamw = optimizer_for(layer, name), optimizer_for(reference, "adamw")
    for seed in range(10):
        step(layer, optimizer, seed)
        step(reference, torch_adamw, seed)
    moved = (reference.weight - w0).norm()
    error = (layer.weight - reference.weight).norm()
    assert error <= tolerance * moved, (error / moved).item()
    assert moved > 10 * LR  # the weights did move: 10 steps of ~lr on 4,096 elements
    state = optimizer.state[layer.weight]
    first_moment = state["state1"] if "state1" in state else state["exp_avg"]
    assert first_moment.dtype == state_dtype  # the 8-bit names really hold 8-bit state


@pytest.mark.parametrize("name", NAMES)
def test_schedule_drives_the_learning_rate_of_every_name(name):
    layer = linear()
    cfg = OptimConfig(name=name, lr=LR, warmup_steps=4, schedule="constant")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        built = configure_adamw(list(layer.named_parameters()), cfg, total_steps=10)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert optimizer.param_groups[0]["lr"] == 0.0
    step(layer, optimizer, seed=0)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR / 4)


def test_unknown_name_is_rejected_by_the_dataclass():
    with pytest.raises(PebrError, match=r"optim\.name must be one of adamw, adamw_8bit.*'adam'"):
        OptimConfig(name="adam")


def test_unknown_name_is_rejected_by_the_cli_and_known_ones_parse(capsys):
    from pebr_lightning.cli import cli

    config = str(REPO / "configs" / "demo" / "sft.yaml")
    with pytest.raises(SystemExit) as info:
        cli(["--config", config, "--model.init_args.optim.name", "adam"], run=False)
    assert info.value.code != 0
    assert "optim.name" in capsys.readouterr().err
    built = cli(["--config", config, "--model.init_args.optim.name", "adamw_8bit"], run=False)
    assert built.model.optim.name == "adamw_8bit"


class _TwoTowers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.visual = nn.Linear(8, 8)
        self.language = nn.Linear(8, 8)


def test_lr_scale_trains_the_matched_parameters_at_their_factor():
    """Adam's first step moves every element by lr * factor (see the hand-worked test
    above, no decay here): 1e-2 for the language layer, 1e-3 for the visual one, also
    after the warm-up's LambdaLR has scaled each group."""
    model = _TwoTowers()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = OptimConfig(lr=LR, warmup_steps=2, schedule="constant", lr_scale={"^visual": 0.1})
    built = configure_adamw(list(model.named_parameters()), cfg, total_steps=10)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # stepping the schedule before any step
        scheduler.step()
        scheduler.step()  # warm-up over: each group at its full lr
    # Matrices then vectors; within each the unscaled group first (what printers show).
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([LR, LR * 0.1, LR, LR * 0.1])
    optimizer.zero_grad()
    model.language(model.visual(torch.randn(4, 8))).pow(2).sum().backward()
    optimizer.step()
    for name, param in model.named_parameters():
        moved = (param.detach() - before[name]).abs()
        expected = LR * (0.1 if name.startswith("visual") else 1.0)
        torch.testing.assert_close(moved, torch.full_like(moved, expected), atol=1e-7, rtol=0)


def test_lr_scale_key_that_matches_nothing_is_an_error_frozen_is_fine():
    cfg = OptimConfig(lr=LR, lr_scale={"vision_tower": 0.1})
    with pytest.raises(PebrError, match=r"'vision_tower' matches no parameter"):
        configure_adamw(list(_TwoTowers().named_parameters()), cfg, total_steps=10)
    model = _TwoTowers()
    model.visual.requires_grad_(False)  # as with a frozen vision tower or LoRA
    cfg = OptimConfig(lr=LR, lr_scale={"visual": 0.1})
    built = configure_adamw(list(model.named_parameters()), cfg, total_steps=10)
    assert [g["lr"] for g in built["optimizer"].param_groups] == [LR, LR]


@pytest.mark.parametrize(
    ("key", "factor", "message"), [("(", 0.1, "not a regular"), ("v", 0.0, "positive")]
)
def test_lr_scale_bad_values_are_rejected(key, factor, message):
    with pytest.raises(PebrError, match=message):
        OptimConfig(lr_scale={key: factor})
