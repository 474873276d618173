"""The training paths on an accelerator: GRPO and SFT fits, QLoRA, shared-prompt log-probs.

Marked `gpu`: skipped where there is no CUDA device, run by benchmarks/gpu_check.sh on
a GPU, and on the CPU with PEBR_TEST_DEVICE=cpu (the GPU check's CPU dry run), so the
same assertions hold on both. Each checks where the tensors live as well as what
training did to them: a fit that silently ran on the CPU would fail here.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from pebr_lightning.cli import main
from pebr_lightning.data.collate import PromptCollator, RecordDataset
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.data.prompts import PromptConfig
from pebr_lightning.engines.hf import sample_group
from pebr_lightning.models.families.qwen_vl import QwenVL
from pebr_lightning.models.policy import LANGUAGE_PROJECTIONS, build_policy, unwrap
from pebr_lightning.models.rollout import (
    SamplingConfig,
    completion_logprobs,
    eos_token_ids,
)

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo"
# Spread on random text, so every group has a non-zero advantage and every step updates.
SPREAD = {"class_path": "pebr_demo.testing.spread_reward.VowelShareReward", "weight": 1.0}
LINEAR_4BIT = "bitsandbytes.nn.modules.Linear4bit"


class WhereAndWhat(L.Callback):
    """Writes, at the first training step, each parameter's device and each linear's class."""

    def __init__(self, path: str) -> None:
        """
        Args:
            path: JSON file: {"devices": {param: device type}, "linears": {name: class}}.
        """
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx:
            return
        self.path.write_text(
            json.dumps(
                {
                    "devices": {n: p.device.type for n, p in pl_module.named_parameters()},
                    "linears": {
                        n: f"{type(m).__module__}.{type(m).__name__}"
                        for n, m in pl_module.named_modules()
                        if isinstance(m, torch.nn.Linear)
                    },
                }
            )
        )


def fit(config: Path, tmp_path: Path, device: str, *extra: str) -> dict:
    """`pebr fit` on `device`; the parameter snapshot, placement and logged rows."""
    snapshot, where = tmp_path / "snapshot.pt", tmp_path / "where.json"
    code = main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.accelerator",
            device,
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.callbacks+=pebr_demo.testing.ParameterSnapshot",
            f"--trainer.callbacks.path={snapshot}",
            f"--trainer.callbacks+={__name__}.WhereAndWhat",
            f"--trainer.callbacks.path={where}",
            *extra,
        ]
    )
    assert code == 0
    (metrics,) = tmp_path.rglob("metrics.csv")
    return {
        **torch.load(snapshot),
        **json.loads(where.read_text()),
        "rows": list(csv.DictReader(metrics.open())),
    }


def grpo_args(shapes_data: dict[str, Path]) -> list[str]:
    return [
        "--model.init_args.rewards",
        json.dumps(
            [{"name": "accuracy", "weight": 0.9}, {"name": "format", "weight": 0.1}, SPREAD]
        ),
        "--model.init_args.sampling.group_size",
        "4",
        "--model.init_args.sampling.max_new_tokens",
        "16",
        "--data.init_args.train_manifest",
        str(shapes_data["train"]),
        "--data.init_args.batch_size",
        "2",
        "--trainer.max_steps",
        "2",
    ]


def assert_finite(rows: list[dict[str, str]]) -> None:
    for row in rows:
        for key, value in row.items():
            if value:
                assert math.isfinite(float(value)), (key, value)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_grpo_fit_trains_every_policy_weight_on_the_device(
    precision, device, tmp_path, shapes_data
):
    run = fit(
        DEMO / "perception.yaml",  # the whole model (reasoning.yaml freezes the vision tower)
        tmp_path,
        device,
        "--trainer.precision",
        precision,
        *grpo_args(shapes_data),
    )
    assert set(run["devices"].values()) == {device}  # policy and KL reference
    trainable = set(run["trainable"])
    assert trainable == {n for n in run["before"] if n.startswith("policy.")}
    for name, before in run["before"].items():
        assert (not torch.equal(before, run["after"][name])) == (name in trainable), name
    assert_finite(run["rows"])
    logged = {k for row in run["rows"] for k, v in row.items() if v}
    assert {"train/grad_norm", "reward/accuracy/mean", "rollout/tokens_per_s"} <= logged


def test_sft_fit_lowers_the_loss_on_the_device(device, tmp_path, shapes_data):
    run = fit(
        DEMO / "sft.yaml",
        tmp_path,
        device,
        "--data.init_args.train_manifest",
        str(shapes_data["train"]),
        "--data.init_args.val_manifest",
        str(shapes_data["val"]),
        "--data.init_args.batch_size",
        "8",
        "--data.init_args.num_workers",
        "0",
        "--model.init_args.optim.warmup_steps",
        "0",
        "--trainer.max_steps",
        "12",
        "--trainer.val_check_interval",
        "6",
        "--trainer.limit_val_batches",
        "1",
    )
    assert set(run["devices"].values()) == {device}
    losses = [float(r["train/loss"]) for r in run["rows"] if r.get("train/loss")]
    assert len(losses) == 12
    # from random init (ln 640 = 6.5 nats a token) the first steps fall fast
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert_finite(run["rows"])


def test_qlora_fit_quantizes_on_the_device_and_trains_only_lora(device, tmp_path, shapes_data):
    run = fit(
        DEMO / "reasoning.yaml",
        tmp_path,
        device,
        "--trainer.precision",
        "bf16-mixed",
        # bfloat16 weights, as configs/qlora-24gb: bitsandbytes casts frozen biases to the
        # compute dtype in place, which would round float32 ones (a change not made by training)
        "--model.init_args.policy.dtype",
        "bfloat16",
        "--model.init_args.policy.quantization",
        json.dumps({"bits": 4, "quant_type": "nf4", "compute_dtype": "bfloat16"}),
        "--model.init_args.policy.lora",
        json.dumps({"r": 4, "alpha": 8, "dropout": 0.0}),
        *grpo_args(shapes_data),
    )
    quantized = {n for n, cls in run["linears"].items() if cls == LINEAR_4BIT}
    pattern = re.compile(r"policy\." + LANGUAGE_PROJECTIONS + r"\.base_layer")
    assert quantized == {n for n in run["linears"] if pattern.fullmatch(n)}
    assert len(quantized) == 14  # 2 layers x 7 projections
    assert set(run["devices"].values()) == {device}  # the packed 4-bit weights included
    trainable = set(run["trainable"])
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    for name, before in run["before"].items():
        changed = not torch.equal(before.float(), run["after"][name].float())
        assert changed == (name in trainable), name
    assert_finite(run["rows"])


def test_shared_prompt_logprobs_and_gradients_equal_the_full_forward(
    device, tiny_path, shapes_data
):
    """The shared-prompt loss forward (each prompt once, its KV cache reused by its G
    completions) against G full forwards, on the device, in float32."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    # TF32 would round the two paths' different matmul shapes differently
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        built = build_policy(str(tiny_path), freeze_vision=False)
        model = built.model.to(device)
        base = unwrap(model)
        dataset = RecordDataset(load_manifest(shapes_data["train"]).records)
        items = [dataset[i] for i in range(3)]
        for i, item in enumerate(items):  # different lengths: different left padding
            item["record"] = {
                **item["record"],
                "question": item["record"]["question"] + " Why?" * i,
            }
        batch = PromptCollator(built.processor, PromptConfig())(items)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        tok = built.processor.tokenizer
        with torch.no_grad():
            rollout = sample_group(
                model.eval(),
                base,
                batch,
                SamplingConfig(group_size=3, max_new_tokens=10, temperature=1.0),
                eos_token_ids(tok, QwenVL.end_tokens),
                tok.pad_token_id,
                generator=torch.Generator(device=device).manual_seed(0),
            )
        assert rollout.completion_ids.device.type == device
        model.train()
        rows = torch.arange(rollout.completion_ids.shape[0], device=device)
        weights = torch.linspace(-1.0, 1.0, rollout.completion_ids.numel(), device=device)
        results = {}
        for share in (False, True):
            model.zero_grad(set_to_none=True)
            logp = completion_logprobs(base, batch, rollout, rows, None, 1.0, share_prompt=share)
            (logp * weights.view_as(logp)).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[share] = (logp.detach(), grads)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    mask = rollout.completion_mask.bool()
    assert mask.sum() > 0
    torch.testing.assert_close(
        results[True][0][mask], results[False][0][mask], atol=2e-5, rtol=1e-4
    )
    full, shared = results[False][1], results[True][1]
    assert set(full) == set(shared) and any("visual" in n for n in full)
    for name, grad in full.items():
        torch.testing.assert_close(shared[name], grad, atol=1e-5, rtol=1e-3, msg=name)
    torch.testing.assert_close(results[True][0][mask], rollout.logprobs[mask], atol=2e-5, rtol=1e-4)
